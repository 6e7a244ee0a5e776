// Bounded against strangers and broken callers (issue 16, first part): names over the limit and
// reserved events get a 4xx naming them, a client with such a name is refused with a clear
// error, a lying Content-Length is refused at once, every error answer has a body, logs cannot
// be forged or made unbounded from outside, and blank settings are startup errors.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { createRequire } from "node:module";
import { BIN, VERSIONS, startWebsite, startServer, oldEnv, client, ready, send, within, ackOf, disconnected, logged, queueIsEmpty } from "./helpers.mjs";

const run = promisify(execFile);
const WebSocket = createRequire(import.meta.url)("ws");
let website, server;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t1", ["user_1"]);
  website.tokens.set("t-long-room", ["user_1", "r".repeat(2000)]);
  server = await startServer(oldEnv(website));
});
after(async () => {
  await server?.cleanup();
  await website?.close();
});

/** Writes `request` raw and resolves with the whole answer and how long it took. */
function raw(request, { holdOpenMs = 0 } = {}) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    let answer = "";
    const socket = net.connect(server.port, "127.0.0.1", () => socket.write(request));
    socket.on("data", (d) => (answer += d));
    socket.on("end", () => resolve({ answer, ms: Date.now() - started }));
    socket.on("error", reject);
    if (holdOpenMs) setTimeout(() => socket.end(), holdOpenMs);
  });
}

test("/send: names over server.max_name_bytes get a 400 naming the limit, not a 503", async () => {
  const huge = "r".repeat(500 * 1024);
  for (const [body, want] of [
    [{ rooms: [huge], event: "e" }, /A room name in 'rooms' of 512000 bytes is longer than server\.max_name_bytes \(1024\)/],
    [{ rooms: ["user_1"], event: "e".repeat(1025) }, /'event' of 1025 bytes is longer than server\.max_name_bytes \(1024\)/],
  ]) {
    const res = await send(server, { body });
    assert.equal(res.status, 400, res.text);
    assert.match(res.text, want);
  }
  assert.equal((await send(server, { body: { rooms: ["r".repeat(1024)], event: "e" } })).status, 200, "at the limit");
});

test("/send: socket.io's reserved event names and sio-push's own get a 400 naming the name", async () => {
  const reserved = ["connect", "connect_error", "disconnect", "disconnecting", "error", "connecting", "reconnect", "ping", "newListener", "_batch", "_resync", "_settings"];
  for (const event of reserved) {
    const res = await send(server, { body: { rooms: ["user_1"], event } });
    assert.equal(res.status, 400, event);
    assert.equal(res.text, `'event' "${event}" is reserved: socket.io clients handle it themselves.`);
  }
});

for (const version of VERSIONS) {
  test(`${version}: a deviceId or an auth room over the limit is refused with a clear error, and nothing is registered`, async () => {
    const long = client(version, server, { token: "t1", deviceId: "d".repeat(1025) });
    assert.equal(await long.refusal(), "Auth error: deviceId of 1025 bytes is longer than server.max_name_bytes (1024).");
    long.close();
    const room = client(version, server, { token: "t-long-room", deviceId: `${version}-room` });
    assert.equal(await room.refusal(), "Auth error: A room name from the auth endpoint of 2000 bytes is longer than server.max_name_bytes (1024).");
    room.close();
    assert.ok(!/device connected[^\n]*d{1025}/.test(server.log));
  });
}

for (const version of VERSIONS) {
  test(`${version}: past max_devices_per_user a user room forgets the device that disconnected first, and refuses a new one while all are connected`, async () => {
    const capped = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_DEVICES_PER_USER: "2" }));
    try {
      const user = `user_cap_${version}`;
      const token = `t-cap-${version}`;
      website.tokens.set(token, [user]);
      const opts = (device) => ({ token, deviceId: `${version}-${device}` });
      for (const device of ["a", "b"]) {
        const c = await ready(version, capped, opts(device));
        c.close();
        await disconnected(capped, `${version}-${device}`);
      }
      assert.equal((await send(capped, { body: { rooms: [user], event: "m", args: [1] } })).status, 200);
      // A third device makes room: `a`, which left first, is forgotten with its queue.
      const c = await ready(version, capped, opts("c"));
      await logged(capped, new RegExp(`device forgotten with its queue[^\\n]*\\bdevice("?:"|=)${version}-a\\b`), "a forgotten");
      const b = await ready(version, capped, opts("b"));
      const batch = await b.waitFor("_batch");
      assert.deepEqual(batch[1], [["m", 1]], "b kept its queue");
      ackOf(batch)?.();
      // b and c connected: a new device is disconnected before `_settings`, and says why in the log.
      const d = client(version, capped, opts("d"));
      const gone = within(new Promise((resolve) => d.socket.on("disconnect", resolve)), "d disconnected");
      await d.connected;
      assert.equal(await gone, "io server disconnect");
      assert.ok(!d.events.some((e) => e[0] === "_settings"), "no _settings for a device that was not registered");
      await logged(capped, new RegExp(`new device refused and disconnected[^\\n]*${version}-d[^\\n]*max_devices_per_user`), "d refused");
      d.close();
      // `a` was forgotten: once c leaves, it comes back as a new device with nothing queued.
      c.close();
      await disconnected(capped, `${version}-c`);
      assert.ok(await queueIsEmpty(version, capped, opts("a"), user), "a's queue went with it");
      b.close();
    } finally {
      await capped.cleanup();
    }
  });
}

test("many new devices of one user at once, both generations, 10 rounds: exactly max_devices_per_user of them are registered", async () => {
  const capped = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_DEVICES_PER_USER: "4" }));
  try {
    for (let round = 0; round < 10; round++) {
      const user = `user_race_${round}`;
      website.tokens.set(`t-race-${round}`, [user]);
      // Each either gets `_settings` (registered) or is disconnected by the server before it.
      const clients = Array.from({ length: 12 }, (_, i) => {
        const c = client(VERSIONS[i % 2], capped, { token: `t-race-${round}`, deviceId: `r${i}` });
        c.outcome = new Promise((resolve) => {
          c.listeners.push((args) => args[0] === "_settings" && resolve("registered"));
          c.socket.on("disconnect", () => resolve("refused"));
        });
        return c;
      });
      const outcomes = await within(Promise.all(clients.map((c) => c.outcome)), `round ${round}`);
      assert.equal(outcomes.filter((o) => o === "registered").length, 4, `round ${round}: ${outcomes}`);
      // A message to the user reaches exactly those four.
      assert.equal((await send(capped, { body: { rooms: [user], event: "m", args: [round] } })).status, 200);
      const registered = clients.filter((_, i) => outcomes[i] === "registered");
      await Promise.all(registered.map((c) => c.waitFor("m")));
      clients.forEach((c) => c.close());
    }
  } finally {
    await capped.cleanup();
  }
});

test("a message for many devices is stored once: 400 KB to 100 devices writes far less than 100 copies, and each device gets it whole", async () => {
  const devices = Array.from({ length: 100 }, (_, i) => ({ token: `t-crowd-${i}`, deviceId: "phone" }));
  devices.forEach((d, i) => website.tokens.set(d.token, [`user_crowd_${i}`, "crowd"]));
  for (let i = 0; i < devices.length; i += 25) {
    const opened = await Promise.all(devices.slice(i, i + 25).map((d) => ready("v4", server, d)));
    opened.forEach((c) => c.close());
  }
  const written = () => Number(readFileSync(`/proc/${server.child.pid}/io`, "utf8").match(/^write_bytes: (\d+)/m)[1]);
  const big = "x".repeat(400_000);
  const before = written();
  const res = await send(server, { body: { rooms: ["crowd"], event: "big", args: [big] } });
  assert.equal(res.status, 200, res.text);
  const bytes = written() - before;
  assert.ok(bytes < 8_000_000, `${bytes} bytes written for one message (100 copies would be 40 MB)`);
  // Each device gets it whole; acks by some leave it for the others.
  for (const [i, version] of [[0, "v2"], [1, "v4"], [99, "v4"]]) {
    const c = await ready(version, server, devices[i]);
    const batch = await c.waitFor("_batch");
    assert.deepEqual(batch[1], [["big", big]]);
    ackOf(batch)?.();
    c.close();
  }
  assert.ok(await queueIsEmpty("v4", server, devices[0], "user_crowd_0"), "acked");
  const c = await ready("v2", server, devices[50]);
  assert.equal((await c.waitFor("_batch"))[1][0][1].length, big.length, "still queued for the others");
  c.close();
});

test("a Content-Length over max_body_bytes is refused at once with 413, whatever follows", async () => {
  const { answer, ms } = await within(
    raw(
      "POST /send?site=shop&apiKey=secret-key HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
        "Content-Length: 10000000\r\nConnection: close\r\n\r\n{}",
    ),
    "the 413",
  );
  assert.match(answer, /^HTTP\/1\.1 413/);
  assert.match(answer, /Request body is larger than 1048576 bytes \(server\.max_body_bytes\)\./);
  assert.ok(ms < 1000, `answered in ${ms} ms, without waiting for the body`);
});

test("every error answer names its reason: 404, 405, and a request that outlasts request_timeout_secs", async () => {
  const notFound = await fetch(`${server.url}/nope`);
  assert.equal(notFound.status, 404);
  assert.equal(await notFound.text(), "Not Found.");
  const wrongMethod = await fetch(`${server.url}/send`);
  assert.equal(wrongMethod.status, 405);
  assert.equal(await wrongMethod.text(), "Method Not Allowed.");
  const slow = await startServer(oldEnv(website, { SIO_PUSH_SERVER__REQUEST_TIMEOUT_SECS: "1" }));
  try {
    // Promises 100 bytes, sends 10, and waits.
    const request = "POST /send?site=shop&apiKey=secret-key HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
      "Content-Length: 100\r\nConnection: close\r\n\r\n{\"rooms\":";
    const { answer } = await within(
      new Promise((resolve, reject) => {
        let text = "";
        const socket = net.connect(slow.port, "127.0.0.1", () => socket.write(request));
        socket.on("data", (d) => (text += d));
        socket.on("end", () => resolve({ answer: text }));
        socket.on("error", reject);
      }),
      "the timeout's answer",
    );
    assert.match(answer, /^HTTP\/1\.1 503/);
    assert.match(answer, /Request not done within 1 s \(server\.request_timeout_secs\)/);
  } finally {
    await slow.cleanup();
  }
});

test("values from outside cannot forge log lines or make them unbounded; error replies stay short", async () => {
  const forged = "dev\nINFO sio_push::forged_line site=shop";
  const c = await ready("v4", server, { token: "t1", deviceId: forged });
  c.close();
  await server.logged(/device connected[^\n]*device=dev\\nINFO/);
  assert.ok(!server.log.split("\n").some((line) => line.startsWith("INFO sio_push::forged")), "no line of its own");
  const key = `k\nINFO forged${"x".repeat(30000)}`;
  const form = `rooms=user_1&event=e&${encodeURIComponent(key)}=1&${encodeURIComponent(key)}[a]=2`;
  const res = await send(server, { body: form });
  assert.equal(res.status, 400);
  assert.ok(res.text.length < 400, `a ${res.text.length}-byte reply`);
  assert.match(res.text, /more bytes\]/);
  assert.ok(!res.text.includes("\n"));
  const longest = Math.max(...server.log.split("\n").map((line) => line.length));
  assert.ok(longest < 8 * 1024, `longest log line ${longest} bytes`);
});

test("blank settings that would misplace data or drop the site are startup errors naming them", async () => {
  const base = { PATH: process.env.PATH, ...oldEnv(website), PORT: "0" };
  const cases = [
    [{ SIO_PUSH_DATA_DIR: "" }, /server\.data_dir/],
    [{ SIO_PUSH_DATA_DIR: "/tmp/unused", API_KEY: "   " }, /sites\.shop\.api_key/],
    [{ SIO_PUSH_DATA_DIR: "/tmp/unused", SITE_NAME: "" }, /SITE_NAME/],
  ];
  for (const [extra, want] of cases) {
    // In a scratch directory: a build that took the empty data dir for the current one would
    // write its files there.
    const cwd = mkdtempSync(path.join(tmpdir(), "sio-push-blank-"));
    const failed = await run(BIN, ["serve"], { env: { ...base, ...extra }, cwd, timeout: 10000 }).then(
      () => null,
      (e) => e,
    );
    assert.ok(failed, `${JSON.stringify(extra)} must not start`);
    rmSync(cwd, { recursive: true, force: true });
    assert.equal(failed.code, 2);
    assert.match(failed.stderr, want);
  }
});

/** A raw engine.io websocket session (no socket.io client): resolves once open. */
function rawSession(target, eio) {
  const socket = new WebSocket(`ws://127.0.0.1:${target.port}/socket.io/?EIO=${eio}&transport=websocket`);
  const closed = new Promise((resolve) => socket.on("close", (code) => resolve({ code, at: Date.now() })));
  socket.on("error", () => {});
  return new Promise((resolve, reject) => {
    socket.on("open", () => resolve({ socket, closed }));
    socket.on("error", reject);
  });
}

test("a websocket message over max_client_message_bytes closes its connection before it is buffered", async () => {
  for (const eio of [3, 4]) {
    const { socket, closed } = await within(rawSession(server, eio), "a raw session");
    // One well-formed socket.io event of 2 MiB, to the root namespace (which a 2.x session has
    // joined at its handshake, and which ignores it): read whole, it would be buffered.
    socket.send(`42["big","${"x".repeat(2 * 1024 * 1024)}"]`);
    await within(closed, "the server to close the connection");
    const health = await fetch(`${server.url}/healthcheck`);
    assert.equal(health.status, 200);
  }
  // An ordinary client is unaffected.
  const c = await ready("v4", server, { token: "t1", deviceId: "after-big" });
  c.close();
});

test("sessions that never join a site are closed after connect_timeout_secs, both protocol generations", async () => {
  const quick = await startServer(oldEnv(website, { SIO_PUSH_SERVER__AUTH_TIMEOUT_MS: "500", SIO_PUSH_SERVER__CONNECT_TIMEOUT_SECS: "2" }));
  try {
    const started = Date.now();
    const sessions = await Promise.all([3, 4, 3, 4].map((eio) => within(rawSession(quick, eio), "a raw session")));
    const closed = await Promise.all(sessions.map((s) => within(s.closed, "the idle session to be closed", 8000)));
    for (const { at } of closed) {
      const after = at - started;
      assert.ok(after >= 1500 && after < 6000, `closed after ${after} ms`);
    }
    assert.match(quick.log, /no site's namespace joined within connect_timeout_secs/);
    // A client that does join stays.
    const c = await ready("v2", quick, { token: "t1", deviceId: "stays" });
    await new Promise((r) => setTimeout(r, 2500));
    assert.ok(c.socket.connected, "a joined 2.x client is not closed by the deadline");
    c.close();
  } finally {
    await quick.cleanup();
  }
});

test("the auth waiting room: bounded, refused with a clear error, and a client that leaves takes its call with it", async (t) => {
  // A website whose auth endpoint hangs, and counts what it is asked.
  let asked = 0;
  const hung = await new Promise((resolve) => {
    const s = http.createServer(() => asked++); // never answers
    s.listen(0, "127.0.0.1", () => resolve(s));
  });
  const env = oldEnv(website, {
    AUTH_URL: `http://127.0.0.1:${hung.address().port}/auth`,
    SIO_PUSH_SERVER__MAX_CONCURRENT_AUTH: "2",
    SIO_PUSH_SERVER__MAX_AUTH_QUEUE: "5",
    SIO_PUSH_SERVER__AUTH_TIMEOUT_MS: "500",
    SIO_PUSH_SERVER__CONNECT_TIMEOUT_SECS: "10",
  });
  const busy = await startServer(env);
  try {
    // 12 at once: 2 get a slot (and hang), 5 wait, and the queue being full, the rest are
    // refused at once. The waiters are refused once auth_timeout_ms has passed without a free
    // slot; two of them may get the slots the first two free, and time out in their call instead.
    const first = Array.from({ length: 12 }, (_, i) => client("v4", busy, { token: `t${i}`, deviceId: `wait-${i}` }));
    const refusals = await Promise.all(first.map((c) => c.refusal()));
    const full = /^Auth error: too many connections waiting for authentication \(server\.max_auth_queue is 5\); retry later$/;
    const noSlot = /^Auth error: no auth slot free within auth_timeout_ms \(500 ms\); retry later$/;
    const timedOut = /^Auth error: timed out/;
    assert.ok(refusals.every((r) => full.test(r) || noSlot.test(r) || timedOut.test(r)), refusals.join("\n"));
    // 5 when all arrive within auth_timeout_ms, as here; fewer if a slot came free meanwhile.
    const refusedAtOnce = refusals.filter((r) => full.test(r)).length;
    assert.ok(refusedAtOnce >= 1 && refusedAtOnce <= 5, refusals.join("\n"));
    assert.ok(refusals.filter((r) => noSlot.test(r)).length >= 3, refusals.join("\n"));
    first.forEach((c) => c.close());
    // 40 clients that leave after 200 ms: only the 2 calls that had a slot were made.
    asked = 0;
    const leavers = Array.from({ length: 40 }, (_, i) => client("v2", busy, { token: `l${i}`, deviceId: `leave-${i}` }));
    leavers.forEach((c) => c.connected.catch(() => {})); // they leave before any answer
    await new Promise((r) => setTimeout(r, 200));
    leavers.forEach((c) => c.close());
    await busy.logged(/client left while being authenticated/);
    // Eight auth timeouts later: a queue that was not emptied would have made 16 more calls. A
    // few may still be made, for waiters whose close the server had not read yet when a slot
    // came free.
    await new Promise((r) => setTimeout(r, 4000));
    t.diagnostic(`${asked} auth calls for 40 clients that left after 200 ms`);
    assert.ok(asked <= 10, `${asked} auth calls for 40 clients that left`);
  } finally {
    await busy.cleanup();
    hung.closeAllConnections();
    hung.close();
  }
});
