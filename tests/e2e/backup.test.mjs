// Backups on the real binary: `sio-push backup` through the admin API while sends go on, and of
// a stopped data dir; `restore` into a fresh dir, then real socket.io clients of both
// generations get what was queued; refusals of damaged files and of a running service's data
// dir; `verify` finding damage, and `serve` refusing to start on it.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { BIN, startWebsite, startServer, ready, send, within } from "./helpers.mjs";

const TOKEN = "admin-token-0123456789";
const USERS = 8; // user_0..7, device "d"; even users on socket.io-client 2.x, odd on 4.x
const BEFORE = 200; // sent and answered before the backup starts
const SENDERS = 8; // loops sending while it runs
let website, work, configPath;

before(async () => {
  website = await startWebsite();
  for (let u = 0; u < USERS; u++) website.tokens.set(`t${u}`, [`user_${u}`, "crowd"]);
  work = mkdtempSync(path.join(tmpdir(), "sio-push-backup-"));
  configPath = path.join(work, "config.toml");
  writeFileSync(
    configPath,
    [
      `[server]\nlisten = "127.0.0.1:0"\ndevice_ttl_secs = 0\n`,
      `[admin]\nlisten = "127.0.0.1:0"\ntoken = "${TOKEN}"\n`,
      `[sites.shop]\nauth_url = "${website.url}/auth"\napi_key = "secret-key"\nuser_room_prefix = "user_"\n`,
    ].join("\n"),
  );
});
after(async () => {
  await website?.close();
  rmSync(work, { recursive: true, force: true });
});

/** Runs the CLI; resolves with its exit code and output, whatever the code. */
async function cli(args, env = {}) {
  try {
    const { stdout, stderr } = await promisify(execFile)(BIN, args, { env: { PATH: process.env.PATH, ...env } });
    return { code: 0, stdout, stderr };
  } catch (e) {
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** Who message `n` goes to: every tenth to the shared room, the others to one user. */
function targets(n) {
  return n % 10 === 0 ? [...Array(USERS).keys()] : [n % USERS];
}

async function post(server, n) {
  const rooms = n % 10 === 0 ? ["crowd"] : [`user_${n % USERS}`];
  return send(server, { body: { rooms, event: "m", args: [n] } });
}

/** Connects every device and returns, per user, the message numbers of its `_batch` in order. */
async function batches(server) {
  const out = [];
  for (let u = 0; u < USERS; u++) {
    const c = await ready(u % 2 === 0 ? "v2" : "v4", server, { token: `t${u}`, deviceId: "d" });
    const batch = await c.waitFor("_batch");
    out.push(batch[1].map((entry) => (assert.equal(entry[0], "m"), entry[1])));
    c.close();
  }
  return out;
}

/** Registers every device (connect, then leave) so that messages queue for it. */
async function register(server) {
  for (let u = 0; u < USERS; u++) (await ready(u % 2 === 0 ? "v2" : "v4", server, { token: `t${u}`, deviceId: "d" })).close();
}

test("a backup under concurrent sends restores every message answered 200 before it, in send order", async () => {
  const dataDir = mkdtempSync(path.join(work, "live-"));
  const server = await startServer({}, { dataDir, args: ["--config", configPath] });
  const file = path.join(work, "live.snapshot");
  const answered = new Set();
  let next = 0;
  try {
    await register(server);
    for (; next < BEFORE; next++) {
      assert.equal((await post(server, next)).status, 200);
      answered.add(next);
    }
    const started = next;
    let stop = false;
    const loops = Array.from({ length: SENDERS }, async () => {
      while (!stop) {
        const n = next++;
        if ((await post(server, n)).status === 200) answered.add(n);
      }
    });
    const backup = await cli(["backup", "--config", configPath, "--admin-url", server.adminUrl, "--output", file]);
    stop = true;
    await Promise.all(loops);
    assert.equal(backup.code, 0, backup.stderr);
    assert.match(backup.stderr, /^wrote .*live\.snapshot: 8 devices, \d+ queued messages/);
    assert.ok(next > started, "sends went on while the backup ran");
    assert.ok(!existsSync(`${file}.partial`));
  } finally {
    await server.cleanup();
  }

  const fresh = path.join(work, "restored");
  const restore = await cli(["restore", "--config", configPath, "--input", file, "--data-dir", fresh]);
  assert.equal(restore.code, 0, restore.stderr);
  const verify = await cli(["verify", "--config", configPath, "--data-dir", fresh]);
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
  assert.match(verify.stdout, /8 devices, \d+ queued messages/);
  assert.match(verify.stdout, /no damage found/);

  const restored = await startServer({}, { dataDir: fresh, args: ["--config", configPath] });
  try {
    const got = await batches(restored);
    for (let u = 0; u < USERS; u++) {
      const expected = [...Array(BEFORE).keys()].filter((n) => targets(n).includes(u));
      // Those were sent one after another: all there, in send order, ahead of the concurrent ones.
      assert.deepEqual(got[u].slice(0, expected.length), expected, `user_${u}: everything sent before the backup`);
      for (const n of got[u]) {
        assert.ok(n < next && targets(n).includes(u), `user_${u}: ${n} was sent to it`);
        assert.ok(answered.has(n) || n >= BEFORE, `${n} was answered`);
      }
    }
  } finally {
    await restored.cleanup();
  }
});

test("restore refuses a damaged or cut file, a running service's dir, and a full dir without --force", async () => {
  const dataDir = mkdtempSync(path.join(work, "refuse-"));
  const server = await startServer({}, { dataDir, args: ["--config", configPath] });
  const file = path.join(work, "small.snapshot");
  try {
    await register(server);
    for (let n = 0; n < 30; n++) assert.equal((await post(server, n)).status, 200);
    assert.equal((await cli(["backup", "--config", configPath, "--admin-url", server.adminUrl, "-o", file])).code, 0);
    const running = await cli(["restore", "--config", configPath, "-i", file, "--data-dir", dataDir, "--force"]);
    assert.notEqual(running.code, 0);
    assert.match(running.stderr, /in use by a running service: stop it first/);
    const offline = await cli(["backup", "--config", configPath, "--data-dir", dataDir, "-o", `${file}.2`]);
    assert.notEqual(offline.code, 0);
    assert.match(offline.stderr, /in use by a running service: stop it first/);
    const verify = await cli(["verify", "--data-dir", dataDir]);
    assert.notEqual(verify.code, 0);
    assert.match(verify.stderr, /in use by a running service/);
  } finally {
    await server.stop();
  }

  const bytes = readFileSync(file);
  const damaged = Buffer.from(bytes);
  damaged[Math.floor(bytes.length / 2)] ^= 0x01;
  writeFileSync(`${file}.damaged`, damaged);
  writeFileSync(`${file}.cut`, bytes.subarray(0, bytes.length - 10));
  const target = path.join(work, "never");
  for (const bad of [`${file}.damaged`, `${file}.cut`]) {
    const r = await cli(["restore", "--config", configPath, "-i", bad, "--data-dir", target]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /is not a usable backup; nothing was changed/);
    assert.match(r.stderr, /line \d+: /);
    assert.ok(!existsSync(target) && !existsSync(`${target}.restoring`), "nothing written");
  }

  // The stopped dir: backed up directly, then replaced only with --force, its contents kept aside.
  const offline = await cli(["backup", "--config", configPath, "--data-dir", dataDir, "-o", `${file}.offline`]);
  assert.equal(offline.code, 0, offline.stderr);
  assert.match(offline.stderr, /8 devices, 51 queued messages/); // 27 to one user, 3 to all eight
  const full = await cli(["restore", "--config", configPath, "-i", `${file}.offline`, "--data-dir", dataDir]);
  assert.notEqual(full.code, 0);
  assert.match(full.stderr, /is not empty; .*--force/);
  const forced = await cli(["restore", "--config", configPath, "-i", `${file}.offline`, "--data-dir", dataDir, "--force"]);
  assert.equal(forced.code, 0, forced.stderr);
  const aside = readdirSync(work).filter((name) => name.startsWith(`${path.basename(dataDir)}.before-restore-`));
  assert.equal(aside.length, 1, "the earlier contents were kept aside");
  const again = await startServer({}, { dataDir, args: ["--config", configPath] });
  try {
    const got = await batches(again);
    assert.deepEqual(got[1], [...Array(30).keys()].filter((n) => targets(n).includes(1)));
  } finally {
    await again.cleanup();
  }
});

test("verify reports damage, and serve refuses to start on it, pointing at verify and restore", async () => {
  const dataDir = mkdtempSync(path.join(work, "damage-"));
  const server = await startServer({}, { dataDir, args: ["--config", configPath] });
  await register(server);
  for (let n = 0; n < 20; n++) assert.equal((await post(server, n)).status, 200);
  await server.stop();
  const clean = await cli(["verify", "--data-dir", dataDir]);
  assert.equal(clean.code, 0, clean.stdout + clean.stderr);
  assert.match(clean.stdout, /8 devices, 34 queued messages/);

  truncateSync(path.join(dataDir, "db"), 100);
  const damaged = await cli(["verify", "--data-dir", dataDir]);
  assert.equal(damaged.code, 1, damaged.stdout);
  assert.match(damaged.stdout, /DAMAGE: the store does not open/);
  assert.match(damaged.stderr, /restore the last backup/);
  const refused = await within(
    startServer({}, { dataDir, args: ["--config", configPath] }).then(
      () => assert.fail("serve started on a damaged data dir"),
      (e) => e.message,
    ),
    "serve to refuse",
    20000,
  );
  assert.match(refused, /sio-push verify --data-dir .* checks it, and `sio-push restore --force`/);
  rmSync(dataDir, { recursive: true, force: true });
});
