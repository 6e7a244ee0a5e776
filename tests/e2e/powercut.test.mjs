// Power cuts, not only kill -9. The server runs with its data dir on lossyfs
// (tests/lossyfs: a FUSE file system that keeps a file's writes only once the file is fsynced,
// and a new or renamed name only once its directory is), under concurrent sends. A cut stops
// the disk at a random moment, or at a random write of a checkpoint (sled's `db` is written only
// then); the server is killed, the disk comes back as it was durable, `sio-push verify` must
// pass on it and the server must start on it. After several cuts real socket.io clients of both
// generations must get every message ever answered 200, once, each sender's in send order.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { promisify } from "node:util";
import { BIN, startWebsite, startServer, oldEnv, ready, send, within } from "./helpers.mjs";

const LOSSYFS = process.env.SIO_PUSH_LOSSYFS_BIN || path.resolve(import.meta.dirname, "../../target/release/sio-push-lossyfs");
const USERS = 8; // user_0..7, device "d"; even users on socket.io-client 2.x, odd on 4.x
const SENDERS = 6;
const CUTS = 12; // even ones at a random moment, odd ones at a random write of a checkpoint
const BIG = "x".repeat(140 * 1024); // over sled's inline limit (segment / 4): a blob file

let website, work, mnt, fs;

/** Starts lossyfs on `dir`; `ask(command)` resolves with the next line it prints. */
async function startLossyFs(dir) {
  const child = spawn(LOSSYFS, [dir], { stdio: ["pipe", "pipe", "inherit"] });
  const lines = [];
  const waiters = [];
  createInterface({ input: child.stdout }).on("line", (line) => {
    const w = waiters.findIndex((w) => w.pattern.test(line));
    if (w >= 0) waiters.splice(w, 1)[0].resolve(line);
    else lines.push(line);
  });
  const exited = new Promise((resolve) => child.on("exit", resolve));
  const next = (pattern, ms) => {
    const i = lines.findIndex((line) => pattern.test(line));
    if (i >= 0) return Promise.resolve(lines.splice(i, 1)[0]);
    return within(new Promise((resolve) => waiters.push({ pattern, resolve })), `lossyfs to print ${pattern}`, ms);
  };
  await Promise.race([
    next(/^mounted$/, 10000),
    exited.then((code) => { throw new Error(`lossyfs exited (${code}) before mounting on ${dir}: is this root, with /dev/fuse?`); }),
  ]);
  return {
    ask: (command, pattern, ms) => (child.stdin.write(`${command}\n`), next(pattern, ms)),
    next,
    close: () => (child.stdin.end(), within(exited, "lossyfs to unmount", 10000)),
  };
}

before(async () => {
  website = await startWebsite();
  for (let u = 0; u < USERS; u++) website.tokens.set(`t${u}`, [`user_${u}`, "crowd"]);
  work = mkdtempSync(path.join(tmpdir(), "sio-push-powercut-"));
  mnt = mkdtempSync(path.join(tmpdir(), "sio-push-lossyfs-"));
  fs = await startLossyFs(mnt);
});
after(async () => {
  await fs?.close();
  await website?.close();
  rmSync(mnt, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

/** Who message `n` goes to: every tenth to the shared room, the others to one user. */
function targets(n) {
  return n % 10 === 0 ? [...Array(USERS).keys()] : [n % USERS];
}

async function post(server, n) {
  const rooms = n % 10 === 0 ? ["crowd"] : [`user_${n % USERS}`];
  const args = n % 50 === 7 ? [n, BIG] : [n];
  return send(server, { body: { rooms, event: "m", args } });
}

async function verify(dataDir, env) {
  try {
    const { stdout } = await promisify(execFile)(BIN, ["verify", "--data-dir", dataDir, "--scratch", work], {
      env: { PATH: process.env.PATH, ...env },
    });
    return { code: 0, out: stdout };
  } catch (e) {
    return { code: e.code, out: `${e.stdout}${e.stderr}` };
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test("every message answered 200 survives power cuts at random moments and inside checkpoints", async () => {
  const dataDir = path.join(mnt, "data");
  const env = oldEnv(website);
  let server = await startServer(env, { dataDir });
  const answered = new Map(); // n -> the sender loop that sent it
  let next = 0;
  try {
    for (let u = 0; u < USERS; u++) (await ready(u % 2 === 0 ? "v2" : "v4", server, { token: `t${u}`, deviceId: "d" })).close();
    for (let cut = 0; cut < CUTS; cut++) {
      let stop = false;
      const loops = Array.from({ length: SENDERS }, async (_, loop) => {
        while (!stop) {
          const n = next++;
          const status = await post(server, n).then((r) => r.status, () => "error");
          if (status === 200) answered.set(n, loop);
        }
      });
      const sentBefore = next;
      if (cut % 2 === 0) {
        await sleep(100 + Math.random() * 500);
        await fs.ask("cut", /^cut$/);
      } else {
        // A checkpoint writes `db` several times and then syncs it: cut before one of them.
        await fs.ask(`cut-at-write db ${1 + Math.floor(Math.random() * 6)}`, /^armed$/);
        await fs.next(/^cut db$/, 20000);
      }
      await server.kill();
      stop = true;
      await Promise.all(loops);
      assert.ok(next > sentBefore, `cut ${cut}: sends went on until the cut`);
      await fs.ask("power-on", /^on /);
      const checked = await verify(dataDir, env);
      assert.equal(checked.code, 0, `cut ${cut}: verify after the power came back:\n${checked.out}`);
      assert.match(checked.out, /no damage found/);
      server = await startServer(env, { dataDir });
    }
    const stats = await fs.ask("stats", /^stats /);
    console.log(`power cuts: ${CUTS} cuts, ${next} sends, ${answered.size} answered 200; lossyfs ${stats}`);

    for (let u = 0; u < USERS; u++) {
      const version = u % 2 === 0 ? "v2" : "v4";
      const c = await ready(version, server, { token: `t${u}`, deviceId: "d" });
      const batch = await c.waitFor("_batch");
      c.close();
      const got = batch[1].map((entry) => (assert.equal(entry[0], "m"), entry[1]));
      assert.equal(new Set(got).size, got.length, `user_${u} (${version}): no message twice`);
      for (const n of got) assert.ok(n < next && targets(n).includes(u), `user_${u}: ${n} was sent to it`);
      const present = new Set(got);
      const lost = [...answered.keys()].filter((n) => targets(n).includes(u) && !present.has(n));
      assert.deepEqual(lost, [], `user_${u} (${version}): messages answered 200 and lost`);
      // Each sender sent one message after another: its messages are in the order it sent them.
      for (let loop = 0; loop < SENDERS; loop++) {
        const mine = got.filter((n) => answered.get(n) === loop);
        assert.deepEqual(mine, [...mine].sort((a, b) => a - b), `user_${u}: sender ${loop}'s messages in send order`);
      }
    }
  } finally {
    await server.cleanup();
  }
});
