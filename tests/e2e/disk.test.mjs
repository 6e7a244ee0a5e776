// Disk full: the data dir on a small filesystem (a size-limited tmpfs mounted for this test, so
// it needs root, as the whole suite does). Below min_free_disk_bytes /send answers 507 with a
// reason, nothing stored before is damaged, and sending works again once space is freed.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { startWebsite, startServer, oldEnv, ready, send, ackOf, disconnected } from "./helpers.mjs";

let website, mountpoint;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-full", ["user_9"]);
  mountpoint = mkdtempSync(path.join(tmpdir(), "sio-push-small-"));
  execFileSync("mount", ["-t", "tmpfs", "-o", "size=48m", "tmpfs", mountpoint]);
});
after(async () => {
  await website?.close();
  if (mountpoint) {
    execFileSync("umount", [mountpoint]);
    rmSync(mountpoint, { recursive: true, force: true });
  }
});

test("a full disk gets 507 with a reason, keeps what was stored, and recovers when space is freed", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MIN_FREE_DISK_BYTES: String(16 * 1024 * 1024) }), {
    dataDir: path.join(mountpoint, "data"),
  });
  try {
    const opts = { token: "t-full", deviceId: "d" };
    (await ready("v4", server, opts)).close();
    await disconnected(server, "d");
    assert.equal((await send(server, { body: { rooms: "user_9", event: "before", args: [1] } })).status, 200);

    // Something else fills the disk to under 16 MiB free.
    const filler = path.join(mountpoint, "filler");
    writeFileSync(filler, Buffer.alloc(36 * 1024 * 1024));
    const full = await send(server, { body: { rooms: "user_9", event: "during", args: [2] } });
    assert.equal(full.status, 507);
    assert.equal(full.text, "Message not stored: the data disk is almost full.");
    await server.logged(/disk almost full: \d+ bytes free, min_free_disk_bytes is 16777216/);
    assert.equal((await fetch(`${server.url}/healthcheck`)).status, 200, "the service keeps serving");

    rmSync(filler);
    assert.equal((await send(server, { body: { rooms: "user_9", event: "after", args: [3] } })).status, 200);
    const c = await ready("v2", server, opts);
    const batch = await c.waitFor("_batch");
    assert.deepEqual(batch[1], [["before", 1], ["after", 3]]);
    ackOf(batch)();
    c.close();
  } finally {
    await server.cleanup();
  }
});
