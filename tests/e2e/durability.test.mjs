// PROTOCOL.md Part B: what survives restarts and crashes, and device expiry.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as delay } from "node:timers/promises";
import { startWebsite, startServer, oldEnv, ready, send, ackOf, disconnected, queueIsEmpty, VERSIONS } from "./helpers.mjs";

let website;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-erin", ["user_5", "Ops"]);
  website.tokens.set("t-frank", ["user_6"]);
});
after(() => website?.close());

for (const version of VERSIONS) {
  test(`${version}: a restart (SIGTERM) keeps queues and the registry`, async () => {
    const first = await startServer(oldEnv(website));
    const opts = { token: "t-erin", deviceId: `${version}-restart` };
    (await ready(version, first, opts)).close();
    await disconnected(first, opts.deviceId);
    assert.equal((await send(first, { body: { rooms: ["user_5"], event: "before", args: [1] } })).status, 200);
    const exit = await first.stop();
    assert.deepEqual(exit, { code: 0, signal: null }, first.log);

    const second = await startServer(oldEnv(website), { dataDir: first.dataDir });
    try {
      // Shared-room expansion uses the room list known before the restart.
      assert.equal((await send(second, { body: { rooms: ["ops"], event: "after", args: [2] } })).status, 200);
      const c = await ready(version, second, opts);
      const batch = await c.waitFor("_batch");
      assert.deepEqual(batch[1], [["before", 1], ["after", 2]]);
      ackOf(batch)();
      c.close();
    } finally {
      await second.cleanup();
    }
  });

  test(`${version}: kill -9 right after 200 loses nothing`, async () => {
    const first = await startServer(oldEnv(website));
    const opts = { token: "t-frank", deviceId: `${version}-crash` };
    (await ready(version, first, opts)).close();
    await disconnected(first, opts.deviceId);
    // Concurrent requests share fsyncs; every one of them must survive.
    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) => send(first, { body: { rooms: ["user_6"], event: i % 2 ? "odd" : "even", args: [i] } })),
    );
    assert.ok(results.every((r) => r.status === 200));
    await first.kill();

    const second = await startServer(oldEnv(website), { dataDir: first.dataDir });
    try {
      const c = await ready(version, second, opts);
      const batch = await c.waitFor("_batch");
      const got = batch[1].map((entry) => entry[1]).sort((a, b) => a - b);
      assert.deepEqual(got, Array.from({ length: 50 }, (_, i) => i));
      ackOf(batch)();
      c.close();
    } finally {
      await second.cleanup();
    }
  });
}

test("_batch lists messages in send order across events", async () => {
  const server = await startServer(oldEnv(website));
  try {
    const opts = { token: "t-frank", deviceId: "order" };
    (await ready("v4", server, opts)).close();
    await disconnected(server, opts.deviceId);
    const events = ["a", "b", "c"];
    for (let i = 0; i < 30; i++) {
      assert.equal((await send(server, { body: { rooms: "user_6", event: events[i % 3], args: [i] } })).status, 200);
    }
    const c = await ready("v2", server, opts);
    const batch = await c.waitFor("_batch");
    assert.deepEqual(batch[1], Array.from({ length: 30 }, (_, i) => [events[i % 3], i]));
    ackOf(batch)();
    c.close();
  } finally {
    await server.cleanup();
  }
});

test("device_ttl: a device disconnected longer than the TTL is forgotten; a connected one never expires", async () => {
  const server = await startServer(oldEnv(website, { DEVICE_TTL: "1" }));
  try {
    const gone = { token: "t-frank", deviceId: "ttl-gone" };
    const stays = { token: "t-frank", deviceId: "ttl-stays" };
    (await ready("v4", server, gone)).close();
    await disconnected(server, gone.deviceId);
    const connected = await ready("v4", server, stays);
    // Let real time pass beyond the 1 s TTL (this is the thing under test, not synchronisation).
    await delay(2200);
    assert.equal((await send(server, { body: { rooms: "user_6", event: "late", args: [] } })).status, 200);
    ackOf(await connected.waitFor("late"))();
    connected.close();
    await server.logged(/device expired[^\n]*device=ttl-gone/);
    assert.ok(await queueIsEmpty("v4", server, gone, "user_6"), "the expired device's queue is gone");
  } finally {
    await server.cleanup();
  }
});

test("DEVICE_TTL=0 keeps devices forever", async () => {
  const server = await startServer(oldEnv(website, { DEVICE_TTL: "0" }));
  try {
    const opts = { token: "t-frank", deviceId: "ttl-zero" };
    const c = await ready("v4", server, opts);
    assert.deepEqual(c.events.find((e) => e[0] === "_settings")[1], { device_ttl: 0 });
    c.close();
    await disconnected(server, opts.deviceId);
    await send(server, { body: { rooms: "user_6", event: "kept", args: [] } });
    const again = await ready("v4", server, opts);
    const batch = await again.waitFor("_batch");
    assert.deepEqual(batch[1], [["kept"]]);
    ackOf(batch)();
    again.close();
  } finally {
    await server.cleanup();
  }
});
