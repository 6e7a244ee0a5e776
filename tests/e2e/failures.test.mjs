// Failures that stop instead of losing, against the real binary: a failed fdatasync (injected at
// the C library with LD_PRELOAD) stops the service with a non-zero exit, and the next start has
// every message answered 200; a data dir that sled left with a half-written snapshot opens; a
// kill -9 during start, again and again, never leaves a data dir that cannot be opened.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { BIN, startWebsite, startServer, oldEnv, ready, send, ackOf, disconnected, within } from "./helpers.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
let website, scratch, shim;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t1", ["user_1"]);
  scratch = mkdtempSync(path.join(tmpdir(), "sio-push-failures-"));
  shim = path.join(scratch, "failsync.so");
  execFileSync("gcc", ["-shared", "-fPIC", "-O2", "-o", shim, path.join(here, "fixtures", "failsync.c"), "-ldl"]);
});
after(async () => {
  await website?.close();
  rmSync(scratch, { recursive: true, force: true });
});

/** Registers device `d1` of user_1 and leaves it offline, so that messages queue for it. */
async function offlineDevice(server) {
  const c = await ready("v4", server, { token: "t1", deviceId: "d1" });
  c.close();
  await disconnected(server, "d1");
}

/** The messages of the device's `_batch` (acked), by their first argument. */
async function batchOf(server) {
  const c = await ready("v4", server, { token: "t1", deviceId: "d1" });
  const batch = await c.waitFor("_batch");
  ackOf(batch)();
  c.close();
  return batch[1].map((entry) => entry[1]);
}

/** GET `pathname`; `null` if the server no longer answers. */
async function probe(server, pathname) {
  try {
    const res = await fetch(`${server.url}${pathname}`);
    return { status: res.status, text: await res.text() };
  } catch {
    return null;
  }
}

test("a failed fdatasync stops the service: 503, unready, a non-zero exit; a restart has every message answered 200", async () => {
  const dataDir = mkdtempSync(path.join(scratch, "data-"));
  const trigger = path.join(scratch, "fail-syncs-now");
  const server = await startServer(oldEnv(website, { LD_PRELOAD: shim, FAILSYNC_TRIGGER: trigger }), { dataDir });
  const answered = [];
  try {
    await offlineDevice(server);
    for (let i = 0; i < 20; i++) {
      const res = await send(server, { body: { rooms: "user_1", event: "e", args: [i] } });
      assert.equal(res.status, 200, res.text);
      answered.push(i);
    }
    writeFileSync(trigger, "");
    const failed = await send(server, { body: { rooms: "user_1", event: "e", args: [20] } });
    assert.equal(failed.status, 503, failed.text);
    assert.match(failed.text, /storage unavailable/);
    // Until it is gone, it says it is neither healthy nor ready.
    for (const pathname of ["/healthcheck", "/readyz"]) {
      const res = await probe(server, pathname);
      if (res) assert.equal(res.status, 503, `${pathname}: ${res.text}`);
    }
    const exit = await within(server.exited, "sio-push to exit by itself", 25000);
    assert.notEqual(exit.code, 0, "a non-zero exit, for systemd to restart it");
    assert.match(server.log, /store stopped/);
    assert.match(server.log, /fdatasync of the write-ahead log failed/);
  } finally {
    await server.stop().catch(() => server.kill()); // the data dir stays for the restart
  }
  rmSync(trigger, { force: true });
  const restarted = await startServer(oldEnv(website), { dataDir });
  try {
    const got = await batchOf(restarted);
    // The unanswered one may be there too (its record reached the page cache): never a loss.
    assert.deepEqual(got.filter((i) => i < 20), answered, "every message answered 200, in order");
    assert.ok(got.every((i) => i <= 20), `${got}`);
  } finally {
    await restarted.cleanup();
  }
});

test("a data dir with a snapshot file sled left half-written opens, with its messages", async () => {
  const dataDir = mkdtempSync(path.join(scratch, "data-"));
  const server = await startServer(oldEnv(website), { dataDir });
  await offlineDevice(server);
  for (let i = 0; i < 5; i++) assert.equal((await send(server, { body: { rooms: "user_1", event: "e", args: [i] } })).status, 200);
  const { code } = await server.stop();
  assert.equal(code, 0);
  // What a kill during sled's own snapshot leaves: sled took it for the newest snapshot.
  writeFileSync(path.join(dataDir, "snap.FFFFFFFFFFFFFF00.generating"), "half a snapshot");
  const again = await startServer(oldEnv(website), { dataDir });
  try {
    assert.match(again.log, /removing a snapshot file sled left unfinished/);
    assert.deepEqual(await batchOf(again), [0, 1, 2, 3, 4]);
  } finally {
    await again.cleanup();
  }
});

test("kill -9 during start, again and again, never leaves a data dir that cannot be opened", async () => {
  const dataDir = mkdtempSync(path.join(scratch, "data-"));
  const env = { ...oldEnv(website), PATH: process.env.PATH, PORT: "0", SIO_PUSH_DATA_DIR: dataDir, SIO_PUSH_SERVER__MIN_FREE_DISK_BYTES: "33554432" };
  const server = await startServer(oldEnv(website), { dataDir });
  await offlineDevice(server);
  const MESSAGES = 2000;
  for (let i = 0; i < MESSAGES; i += 50) {
    const batch = Array.from({ length: 50 }, (_, k) => send(server, { body: { rooms: "user_1", event: "e", args: [i + k] } }));
    for (const res of await Promise.all(batch)) assert.equal(res.status, 200);
  }
  await server.kill(); // leaves the write-ahead log to replay at every start below
  const KILLS = 25;
  for (let k = 0; k < KILLS; k++) {
    const child = spawn(BIN, ["serve"], { env, stdio: ["ignore", "ignore", "ignore"] });
    const exited = new Promise((resolve) => child.on("exit", resolve));
    // From at once to well into recovery (replay, sled's snapshot, the checkpoint).
    await new Promise((resolve) => setTimeout(resolve, (k * 37) % 400));
    child.kill("SIGKILL");
    await within(exited, "the killed start to exit");
  }
  const last = await startServer(oldEnv(website), { dataDir });
  try {
    // Sent 50 at a time, so the queue's order is the order they were stored in, not `i`'s.
    const got = (await batchOf(last)).sort((a, b) => a - b);
    assert.deepEqual(got, Array.from({ length: MESSAGES }, (_, i) => i), "every message, once");
  } finally {
    await last.cleanup();
  }
});
