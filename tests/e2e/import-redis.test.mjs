// Cutover from the old service: its Redis (Debian's redis-server), filled by the test in the old
// layout, is imported with `sio-push import-redis` configured only by the old environment; then
// real socket.io clients of both generations get every queued message in their `_batch`, in
// send order across events, exactly once, also after a second import.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { BIN, startWebsite, startServer, startRedis, oldEnv, ready, ackOf } from "./helpers.mjs";

const USERS = 12; // user_0..11: device "d" on even users, the device "" (no deviceId) on odd ones
const PER_USER = 60;
const EVENTS = ["order", "chat", "news"];
let website, redis, dataDir;

before(async () => {
  website = await startWebsite();
  for (let u = 0; u < USERS; u++) website.tokens.set(`t${u}`, [`user_${u}`]);
  redis = await startRedis();
  dataDir = mkdtempSync(path.join(tmpdir(), "sio-push-import-"));
});
after(async () => {
  await website?.close();
  await redis?.stop();
  rmSync(dataDir, { recursive: true, force: true });
});

/** Runs commands through `redis-cli --pipe` (the RESP protocol, so JSON needs no quoting). */
function redisPipe(commands) {
  const resp = commands
    .map((args) => `*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join(""))
    .join("");
  const out = spawnSync("redis-cli", ["-s", redis.socket, "--pipe"], { input: resp, encoding: "utf8" });
  assert.equal(out.status, 0, out.stdout + out.stderr);
  assert.match(out.stdout, /errors: 0, replies: \d+/);
}

/** A flake id made `ms` milliseconds after 2026-01-01, as flake-idgen lays them out. */
function flake(ms, seq = 0) {
  return ((BigInt(1767225600000 + ms) << 22n) | BigInt(seq)).toString();
}

async function cli(args, env) {
  try {
    const { stdout, stderr } = await promisify(execFile)(BIN, args, { env: { PATH: process.env.PATH, ...env } });
    return { code: 0, stdout, stderr };
  } catch (e) {
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

test("import-redis carries the old service's queues over, in send order, once", async () => {
  // Each user's messages go round the events, so one device's lists interleave in time.
  const sent = [];
  const commands = [];
  for (let u = 0; u < USERS; u++) {
    const device = u % 2 === 0 ? "d" : "";
    sent.push([]);
    for (let i = 0; i < PER_USER; i++) {
      const event = EVENTS[(i * 7 + u) % EVENTS.length];
      const entry = JSON.stringify([event, { u, i, text: "é\n\"" }]);
      commands.push(["RPUSH", `/shop:socket.io:user_${u}:${device}:${event}`, `${flake(i * 1000 + u)}:${entry}`]);
      sent[u].push(`${u}/${i}`);
    }
    // Half of them were disconnected when the old service stopped: their lists have a TTL.
    if (u % 4 < 2) EVENTS.forEach((e) => commands.push(["PEXPIRE", `/shop:socket.io:user_${u}:${device}:${e}`, "1800000"]));
  }
  commands.push(["RPUSH", "/shop:socket.io:user_1:a:b:order", `${flake(5)}:["order",1]`]);
  commands.push(["RPUSH", "/other:socket.io:user_1:d:order", `${flake(6)}:["order",1]`]);
  redisPipe(commands);

  const env = oldEnv(website, { REDIS_URL: redis.url, SIO_PUSH_DATA_DIR: dataDir });
  const first = await cli(["import-redis"], env);
  assert.equal(first.code, 0, first.stderr);
  assert.match(first.stderr, new RegExp(`site shop: ${USERS} devices \\(6 disconnected\\), ${USERS * PER_USER} queued messages`));
  assert.match(first.stderr, /left: 1 keys of site "other"/);
  assert.match(first.stderr, /left: \/shop:socket\.io:user_1:a:b:order: cannot be split/);
  const again = await cli(["import-redis"], env);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /: 0 records written, \d+ already there/);

  const server = await startServer(oldEnv(website, { REDIS_URL: redis.url }), { dataDir });
  try {
    for (let u = 0; u < USERS; u++) {
      const version = u % 3 === 0 ? "v2" : "v4";
      const c = await ready(version, server, { token: `t${u}`, ...(u % 2 === 0 ? { deviceId: "d" } : {}) });
      const batch = await c.waitFor("_batch");
      const got = batch[1].map(([event, data]) => {
        assert.equal(event, EVENTS[(data.i * 7 + u) % EVENTS.length]);
        assert.equal(data.text, "é\n\"");
        return `${data.u}/${data.i}`;
      });
      assert.deepEqual(got, sent[u], `user_${u} (${version})`);
      ackOf(batch)();
      c.close();
    }
  } finally {
    await server.cleanup();
  }
});

test("an imported data dir moves to the Redis store with backup and restore, in send order", async () => {
  // The old service's flake ids (over 2^53) come along; restore gives the messages new ids in the
  // same order, as the Redis store counts below 2^53.
  const moved = mkdtempSync(path.join(tmpdir(), "sio-push-import-moved-"));
  const file = path.join(moved, "backup.snapshot");
  const sledEnv = oldEnv(website, { REDIS_URL: redis.url, SIO_PUSH_DATA_DIR: path.join(moved, "data") });
  const redisEnv = oldEnv(website, {
    SIO_PUSH_STORE__BACKEND: "redis",
    SIO_PUSH_STORE__REDIS_URL: redis.url,
    SIO_PUSH_STORE__KEY_PREFIX: "moved",
  });
  try {
    assert.equal((await cli(["import-redis"], sledEnv)).code, 0);
    const backup = await cli(["backup", "--data-dir", path.join(moved, "data"), "--output", file], sledEnv);
    assert.equal(backup.code, 0, backup.stderr);
    const restore = await cli(["restore", "--input", file], redisEnv);
    assert.equal(restore.code, 0, restore.stderr);
    assert.match(restore.stderr, new RegExp(`into Redis \\(key prefix moved\\): ${USERS} devices, ${USERS * PER_USER} queued messages`));
    const again = await cli(["restore", "--input", file], redisEnv);
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, /site shop already has devices in Redis \(key prefix moved\).*Nothing was changed/s);

    const server = await startServer(redisEnv, { dataDir: path.join(moved, "unused") });
    try {
      for (let u = 0; u < USERS; u++) {
        const version = u % 3 === 0 ? "v4" : "v2";
        const c = await ready(version, server, { token: `t${u}`, ...(u % 2 === 0 ? { deviceId: "d" } : {}) });
        const batch = await c.waitFor("_batch");
        const got = batch[1].map(([, data]) => `${data.u}/${data.i}`);
        const expected = Array.from({ length: PER_USER }, (_, i) => `${u}/${i}`);
        assert.deepEqual(got, expected, `user_${u} (${version})`);
        c.close();
      }
    } finally {
      await server.cleanup();
    }
  } finally {
    rmSync(moved, { recursive: true, force: true });
  }
});
