// Limits and failing neighbours: queue caps, a slow or dead auth endpoint, a failing presence
// callback, JSON logs. Each limit is set through the SIO_PUSH_SERVER__* environment.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { startWebsite, startServer, oldEnv, client, ready, send, ackOf, disconnected, within, VERSIONS } from "./helpers.mjs";

let website;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-gina", ["user_7"]);
});
after(() => website?.close());

test("a full queue drops its oldest messages and the device gets _resync on its next connect", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_QUEUE_LEN: "3" }));
  try {
    for (const version of VERSIONS) {
      const opts = { token: "t-gina", deviceId: `${version}-full` };
      (await ready(version, server, opts)).close();
      await disconnected(server, opts.deviceId);
      for (let i = 1; i <= 5; i++) {
        assert.equal((await send(server, { body: { rooms: "user_7", event: "n", args: [i] } })).status, 200);
      }
      await server.logged(new RegExp(`queue full[^\\n]*device=${opts.deviceId}`));
      const c = await ready(version, server, opts);
      const batch = await c.waitFor("_batch");
      assert.deepEqual(batch[1], [["n", 3], ["n", 4], ["n", 5]]);
      assert.ok(c.events.some((e) => e[0] === "_resync"), "told it missed messages");
      ackOf(batch)();
      c.close();
    }
  } finally {
    await server.cleanup();
  }
});

test("an auth endpoint that hangs refuses with 'Auth error: timed out ...' after auth_timeout_ms", async () => {
  const hanging = http.createServer(() => {}); // never answers
  await new Promise((r) => hanging.listen(0, "127.0.0.1", r));
  const server = await startServer(
    oldEnv(website, { AUTH_URL: `http://127.0.0.1:${hanging.address().port}/auth`, SIO_PUSH_SERVER__AUTH_TIMEOUT_MS: "300" }),
  );
  try {
    for (const version of VERSIONS) {
      const c = client(version, server, { token: "t-gina" });
      assert.match(await c.refusal(), /^Auth error: timed out/);
      c.close();
    }
  } finally {
    await server.cleanup();
    hanging.closeAllConnections();
    await new Promise((r) => hanging.close(r));
  }
});

test("a dead auth endpoint refuses with 'Auth error: ...' and the service keeps serving", async () => {
  const closed = http.createServer();
  await new Promise((r) => closed.listen(0, "127.0.0.1", r));
  const port = closed.address().port;
  await new Promise((r) => closed.close(r));
  const server = await startServer(oldEnv(website, { AUTH_URL: `http://127.0.0.1:${port}/auth` }));
  try {
    for (const version of VERSIONS) {
      const c = client(version, server, { token: "t-gina" });
      assert.match(await c.refusal(), /^Auth error: /);
      c.close();
    }
    assert.equal((await fetch(`${server.url}/healthcheck`)).status, 200);
  } finally {
    await server.cleanup();
  }
});

test("a failing presence callback is logged and never affects the client", async () => {
  const server = await startServer(oldEnv(website, { UPDATE_USER_URL: "http://127.0.0.1:9/users/:id" }));
  try {
    const c = await ready("v4", server, { token: "t-gina", deviceId: "presence-down" });
    await send(server, { body: { rooms: "user_7", event: "still", args: [1] } });
    ackOf(await c.waitFor("still"))();
    c.close();
    await disconnected(server, "presence-down");
    await server.logged(/presence callback failed/);
  } finally {
    await server.cleanup();
  }
});

test("log_format = json writes one JSON object per line", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__LOG_FORMAT: "json" }));
  try {
    const c = await ready("v2", server, { token: "t-gina", deviceId: "json-logs" });
    c.close();
    await disconnected(server, "json-logs");
    const lines = server.log.trim().split("\n");
    const parsed = lines.map((l) => JSON.parse(l));
    const connected = parsed.find((l) => l.message === "device connected");
    assert.equal(connected.site, "shop");
    assert.equal(connected.room, "user_7");
    assert.equal(connected.device, "json-logs");
  } finally {
    await server.cleanup();
  }
});

test("Idempotency-Key: a retry, even after kill -9, is answered like the first and stores nothing new", async () => {
  const first = await startServer(oldEnv(website));
  const opts = { token: "t-gina", deviceId: "idem" };
  (await ready("v4", first, opts)).close();
  await disconnected(first, opts.deviceId);
  const body = { rooms: "user_7", event: "charge", args: [{ order: 42 }] };
  const headers = { "Idempotency-Key": "order-42" };
  assert.deepEqual(await send(first, { body, headers }), { status: 200, text: "OK" });
  assert.deepEqual(await send(first, { body, headers }), { status: 200, text: "OK" });
  // The website times out, the service dies, the website retries against the restarted service.
  await first.kill();
  const second = await startServer(oldEnv(website), { dataDir: first.dataDir });
  try {
    assert.deepEqual(await send(second, { body, headers }), { status: 200, text: "OK" });
    const reused = await send(second, { body: { ...body, args: [{ order: 43 }] }, headers });
    assert.equal(reused.status, 422);
    assert.match(reused.text, /Idempotency-Key was already used for a different request/);
    const bad = await send(second, { body, headers: { "Idempotency-Key": "has space" } });
    assert.equal(bad.status, 400);
    const c = await ready("v2", second, opts);
    const batch = await c.waitFor("_batch");
    assert.deepEqual(batch[1], [["charge", { order: 42 }]], "stored once");
    ackOf(batch)();
    c.close();
  } finally {
    await second.cleanup();
  }
});

test("a site over its rate limit gets 429 with Retry-After; messages over max_message_bytes get 413", async () => {
  const server = await startServer(oldEnv(website, {
    SIO_PUSH_SITES__SHOP__RATE_LIMIT_PER_SEC: "1",
    SIO_PUSH_SITES__SHOP__RATE_LIMIT_BURST: "3",
    SIO_PUSH_SERVER__MAX_MESSAGE_BYTES: "1000",
  }));
  try {
    const statuses = [];
    for (let i = 0; i < 5; i++) {
      const res = await fetch(`${server.url}/send?site=shop&apiKey=secret-key`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ rooms: "user_7", event: "e", args: [i] }),
      });
      statuses.push(res.status);
      if (res.status === 429) {
        assert.match(res.headers.get("retry-after"), /^[1-9]\d*$/);
        assert.match(await res.text(), /Rate limit of this site exceeded/);
      }
    }
    assert.deepEqual(statuses, [200, 200, 200, 429, 429]);
  } finally {
    await server.cleanup();
  }
  const small = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_MESSAGE_BYTES: "1000" }));
  try {
    const res = await send(small, { body: { rooms: "user_7", event: "e", args: ["x".repeat(2000)] } });
    assert.equal(res.status, 413);
    assert.match(res.text, /max_message_bytes is 1000/);
  } finally {
    await small.cleanup();
  }
});

test("allowed_origins: browsers elsewhere are refused, listed origins and origin-less apps connect; polling CORS follows", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SITES__SHOP__ALLOWED_ORIGINS: '["https://shop.example"]' }));
  try {
    for (const version of VERSIONS) {
      const evil = client(version, server, { token: "t-gina", transports: ["websocket"], extraHeaders: { Origin: "https://evil.example" } });
      assert.equal(await evil.refusal(), "Origin not allowed");
      evil.close();
      const good = client(version, server, { token: "t-gina", deviceId: "origin", transports: ["websocket"], extraHeaders: { Origin: "https://shop.example" } });
      await good.connected;
      good.close();
      const app = client(version, server, { token: "t-gina", deviceId: "origin-app" });
      await app.connected;
      app.close();
    }
    const handshake = (origin) => fetch(`${server.url}/socket.io/?EIO=4&transport=polling`, { headers: { Origin: origin } });
    const listed = await handshake("https://shop.example");
    assert.equal(listed.headers.get("access-control-allow-origin"), "https://shop.example");
    assert.equal(listed.headers.get("access-control-allow-credentials"), "true");
    assert.equal((await handshake("https://evil.example")).headers.get("access-control-allow-origin"), null);
    const send = await fetch(`${server.url}/send?site=shop&apiKey=secret-key`, { method: "POST", headers: { Origin: "https://shop.example", "Content-Type": "application/json" }, body: '{"rooms":"user_7","event":"e"}' });
    assert.equal(send.headers.get("access-control-allow-origin"), null, "/send is for servers: no CORS");
    assert.equal(send.headers.get("access-control-allow-credentials"), null, "no CORS header at all on /send");
    assert.equal(send.headers.get("vary"), null, "no CORS header at all on /send");
  } finally {
    await server.cleanup();
  }
});

test("a client that stops reading is disconnected when its buffer fills; its messages stay queued", async () => {
  const { default: WebSocket } = await import("ws");
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_BUFFER_PACKETS: "16" }));
  try {
    const url = `${server.url.replace("http", "ws")}/socket.io/?EIO=4&transport=websocket&token=t-gina&deviceId=slow`;
    const ws = new WebSocket(url);
    // Speak just enough socket.io to join /shop, then stop reading from the TCP socket.
    await within(new Promise((resolve, reject) => {
      ws.on("error", reject);
      ws.on("message", (data) => {
        const text = data.toString();
        if (text.startsWith("0{")) ws.send("40/shop,");
        if (text.startsWith('42/shop,["_settings"')) {
          ws._socket.pause();
          resolve();
        }
      });
    }), "the raw client to join /shop");
    const slow = /slow consumer[^\n]*device=slow\b/;
    const big = "x".repeat(64 * 1024);
    let sent = 0;
    while (!slow.test(server.log) && sent < 400) {
      const res = await send(server, { body: { rooms: "user_7", event: "bulk", args: [sent, big] } });
      assert.equal(res.status, 200);
      sent++;
    }
    await server.logged(slow);
    ws.terminate();
    await disconnected(server, "slow");
    const c = await ready("v4", server, { token: "t-gina", deviceId: "slow" });
    const batch = await c.waitFor("_batch");
    assert.deepEqual(batch[1].map((entry) => entry[1]), Array.from({ length: sent }, (_, i) => i), "every message is still queued");
    ackOf(batch)();
    c.close();
  } finally {
    await server.cleanup();
  }
});

test("a reconnect storm queues at max_concurrent_auth instead of flooding the website", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_CONCURRENT_AUTH: "4" }));
  website.authDelayMs = 50;
  website.maxAuthInFlight = 0;
  try {
    const storm = Array.from({ length: 40 }, (_, i) => client(i % 2 ? "v2" : "v4", server, { token: "t-gina", deviceId: `storm-${i}` }));
    await within(Promise.all(storm.map((c) => c.connected)), "every client of the storm to connect", 20000);
    assert.ok(website.maxAuthInFlight <= 4, `at most max_concurrent_auth calls at once (saw ${website.maxAuthInFlight})`);
    assert.ok(website.maxAuthInFlight >= 2, "the storm did make concurrent calls");
    storm.forEach((c) => c.close());
  } finally {
    website.authDelayMs = 0;
    await server.cleanup();
  }
});

test("max_sockets_per_device: a socket beyond the cap evicts the oldest; the next newest takes over", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_SOCKETS_PER_DEVICE: "2" }));
  try {
    const opts = { token: "t-gina", deviceId: "many" };
    const first = await ready("v4", server, opts);
    const firstGone = within(new Promise((r) => first.socket.once("disconnect", r)), "the oldest socket to be disconnected");
    const second = await ready("v2", server, opts);
    const third = await ready("v4", server, opts);
    assert.equal(await firstGone, "io server disconnect");
    await server.logged(/too many sockets for one device[^\n]*device=many/);
    await send(server, { body: { rooms: "user_7", event: "live", args: [1] } });
    ackOf(await third.waitFor("live"))();
    // The newest leaves: the one before it gets live messages, and the device is still connected.
    third.close();
    await server.logged(/socket left[^\n]*device=many/);
    await send(server, { body: { rooms: "user_7", event: "live", args: [2] } });
    ackOf(await second.waitFor("live", (a) => a[1] === 2))();
    second.close();
    await disconnected(server, "many");
    // Only the last socket's departure disconnected the device.
    assert.equal(server.log.match(/device disconnected[^\n]*device=many\b/g).length, 1);
  } finally {
    await server.cleanup();
  }
});
