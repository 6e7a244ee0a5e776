// Floods a stranger can make before any auth, sized to this machine: thousands of idle
// connections, a slowloris, idle keep-alive connections, sessions up to the connection cap, a
// stream of handshakes that never join a site. While each runs, /healthcheck and /send must
// answer within a second; after, the server's memory is reported (diagnostics), not asserted.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import net from "node:net";
import { startWebsite, startServer, oldEnv, client, ready, send, within } from "./helpers.mjs";

let website;

before(async () => {
  website = await startWebsite();
  for (let i = 0; i < 40; i++) website.tokens.set(`t${i}`, [`user_${i}`]);
});
after(() => website?.close());

/** The server's resident memory, in MiB. */
function rssMiB(server) {
  const kib = Number(readFileSync(`/proc/${server.child.pid}/status`, "utf8").match(/VmRSS:\s+(\d+)/)[1]);
  return Math.round(kib / 102.4) / 10;
}

/** /healthcheck and a /send, each on a new connection, within a second. */
async function stillServing(server) {
  const started = Date.now();
  const health = await within(fetch(`${server.url}/healthcheck`, { headers: { Connection: "close" } }), "/healthcheck", 1000);
  assert.equal(health.status, 200);
  const sent = await within(send(server, { body: { rooms: "user_0", event: "e" }, headers: { Connection: "close" } }), "/send", 1000);
  assert.equal(sent.status, 200);
  return Date.now() - started;
}

/**
 * Opens `n` TCP connections that send nothing, 100 at a time (more at once overflow this
 * machine's listen backlog of 128, and the kernel then leaves some clients believing they are
 * connected to a server that never saw them); resolves once all are connected or refused.
 */
async function idle(server, n) {
  const sockets = [];
  let closedByServer = 0;
  for (let opened = 0; opened < n; opened += 100) {
    await Promise.all(
      Array.from({ length: Math.min(100, n - opened) }, () => new Promise((resolve) => {
        const s = net.connect(server.port, "127.0.0.1", resolve);
        s.on("error", resolve);
        s.on("close", () => closedByServer++);
        sockets.push(s);
      })),
    );
  }
  return { sockets, closed: () => closedByServer, destroy: () => sockets.forEach((s) => s.destroy()) };
}

test("thousands of idle connections: the caps hold, health checks and /send answer, idle ones are closed", async (t) => {
  const server = await startServer(oldEnv(website, {
    SIO_PUSH_SERVER__MAX_CONNECTIONS: "500",
    SIO_PUSH_SERVER__HEADER_READ_TIMEOUT_SECS: "3",
  }));
  try {
    const baseline = rssMiB(server);
    const flood = await idle(server, 2000);
    const during = rssMiB(server);
    const took = await stillServing(server);
    const metrics = await (await fetch(`${server.url}/metrics`, { headers: { Connection: "close" } })).text();
    const open = Number(metrics.match(/^sio_push_connections_open (\d+)/m)[1]);
    t.diagnostic(`2,000 idle connections: ${open} held, RSS ${baseline} -> ${during} MiB; health and /send answered in ${took} ms`);
    assert.ok(open <= 500 + 64 + 8, `${open} connections held, over the caps`);
    // Every idle one is closed by the server within the header deadline (or at once, over the caps).
    await within(new Promise((resolve) => {
      const check = () => (flood.closed() === 2000 ? resolve() : setTimeout(check, 50));
      check();
    }), "the server to close every idle connection", 15000);
    flood.destroy();
    const afterwards = rssMiB(server);
    t.diagnostic(`after they closed: RSS ${afterwards} MiB`);
    await stillServing(server);
  } finally {
    await server.cleanup();
  }
});

test("a slowloris and an idle keep-alive connection are closed after header_read_timeout_secs", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__HEADER_READ_TIMEOUT_SECS: "2" }));
  try {
    const started = Date.now();
    const slow = net.connect(server.port, "127.0.0.1");
    const request = "GET /healthcheck HTTP/1.1\r\nHost: x\r\nX-Slow: " + "a".repeat(100);
    let i = 0;
    const drip = setInterval(() => i < request.length && slow.write(request[i++]), 200);
    const slowClosed = new Promise((resolve) => slow.on("close", resolve));
    slow.on("error", () => {});
    assert.ok((await stillServing(server)) < 1000);
    await within(slowClosed, "the slowloris to be closed", 6000);
    clearInterval(drip);
    const after = Date.now() - started;
    assert.ok(after >= 1500 && after < 5000, `closed after ${after} ms`);
    // A keep-alive connection that stays idle after its request.
    const keep = net.connect(server.port, "127.0.0.1", () => keep.write("GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n"));
    let answer = "";
    keep.on("data", (d) => (answer += d));
    const keptAt = Date.now();
    await within(new Promise((resolve) => keep.on("close", resolve)), "the idle keep-alive connection to be closed", 6000);
    assert.match(answer, /^HTTP\/1\.1 200/);
    assert.ok(Date.now() - keptAt >= 1500, "kept open for the deadline");
  } finally {
    await server.cleanup();
  }
});

test("sessions up to max_connections: the next session is refused, /send and health checks answer from the reserve", async () => {
  const server = await startServer(oldEnv(website, { SIO_PUSH_SERVER__MAX_CONNECTIONS: "20" }));
  try {
    const held = [];
    for (let i = 0; i < 20; i++) held.push(await ready("v4", server, { token: `t${i}`, deviceId: "cap", transports: ["websocket"] }));
    const over = client("v4", server, { token: "t30", deviceId: "cap", transports: ["websocket"] });
    await assert.rejects(over.connected);
    over.close();
    assert.ok((await stillServing(server)) < 1000);
    const full = await fetch(`${server.url}/socket.io/?EIO=4&transport=polling`);
    assert.equal(full.status, 503);
    assert.match(await full.text(), /Server full: too many connections \(server\.max_connections\)/);
    held.pop().close();
    await within(new Promise((resolve) => {
      const retry = () => {
        const c = client("v4", server, { token: "t31", deviceId: "cap", transports: ["websocket"] });
        c.connected.then(() => (c.close(), resolve()), () => (c.close(), setTimeout(retry, 100)));
      };
      retry();
    }), "a session once a place is free");
    held.forEach((c) => c.close());
  } finally {
    await server.cleanup();
  }
});

test("a stream of handshakes that never join a site: answered, then closed after connect_timeout_secs", async (t) => {
  const server = await startServer(oldEnv(website, {
    SIO_PUSH_SERVER__AUTH_TIMEOUT_MS: "1000",
    SIO_PUSH_SERVER__CONNECT_TIMEOUT_SECS: "3",
  }));
  try {
    const baseline = rssMiB(server);
    const started = Date.now();
    let opened = 0;
    while (Date.now() - started < 2000) {
      const batch = await Promise.all(
        Array.from({ length: 50 }, () => fetch(`${server.url}/socket.io/?EIO=${opened % 2 ? 3 : 4}&transport=polling`).then((r) => r.text())),
      );
      opened += batch.length;
    }
    const during = rssMiB(server);
    assert.ok((await stillServing(server)) < 1000);
    // Past connect_timeout_secs, and past the next check for free memory to give back (10 s).
    await new Promise((resolve) => setTimeout(resolve, 11000));
    const afterwards = rssMiB(server);
    t.diagnostic(`${opened} handshakes in 2 s: RSS ${baseline} -> ${during} MiB, ${afterwards} MiB once they timed out`);
    await stillServing(server);
  } finally {
    await server.cleanup();
  }
});

test("sessions that have not joined a site are capped: past max_unauthenticated_sessions a new one is closed at once, said once a second", async () => {
  const server = await startServer(oldEnv(website, {
    SIO_PUSH_SERVER__MAX_UNAUTHENTICATED_SESSIONS: "50",
    SIO_PUSH_SERVER__AUTH_TIMEOUT_MS: "1000",
    SIO_PUSH_SERVER__CONNECT_TIMEOUT_SECS: "3",
  }));
  const metric = async (name) => {
    const text = await (await fetch(`${server.url}/metrics`)).text();
    return Number(text.match(new RegExp(`^${name} (\\d+)`, "m"))?.[1] ?? NaN);
  };
  try {
    // Two real clients join a site: they do not count.
    const joined = await Promise.all(["v2", "v4"].map((version, i) => ready(version, server, { token: `t${i}`, deviceId: `joined-${version}` })));
    await Promise.all(
      Array.from({ length: 80 }, (_, i) => fetch(`${server.url}/socket.io/?EIO=${i % 2 ? 3 : 4}&transport=polling`).then((r) => r.text())),
    );
    await within(
      (async () => {
        while (!/sessions closed at once: server\.max_unauthenticated_sessions reached/.test(server.log)) await new Promise((r) => setTimeout(r, 50));
      })(),
      "the log line",
      3000,
    );
    assert.equal(await metric("sio_push_sessions_unauthenticated"), 50);
    assert.equal(await metric("sio_push_sessions_refused_total"), 30);
    // One line a second at most, each with how many: together, every refusal.
    const lines = server.log.split("\n").filter((l) => /sessions closed at once/.test(l));
    assert.ok(lines.length <= 2, lines.join("\n"));
    assert.equal(lines.reduce((n, l) => n + Number(l.match(/refused("?:"?|=)(\d+)/)[2]), 0), 30);
    await stillServing(server);
    // While full, a new client is closed at once; once the strangers' sessions time out, it joins.
    for (const version of ["v2", "v4"]) {
      await assert.rejects(client(version, server, { token: "t5", deviceId: `late-${version}` }).connected);
    }
    // The strangers' sessions end at connect_timeout_secs (3 s); the gauge says when.
    await within(
      (async () => {
        while ((await metric("sio_push_sessions_unauthenticated")) !== 0) await new Promise((r) => setTimeout(r, 100));
      })(),
      "the sessions to time out",
      10000,
    );
    for (const version of ["v2", "v4"]) (await ready(version, server, { token: "t5", deviceId: `late-${version}` })).close();
    joined.forEach((c) => c.close());
  } finally {
    await server.cleanup();
  }
});
