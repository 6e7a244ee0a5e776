// Several sio-push nodes on one Redis (Debian's redis-server, AOF with appendfsync always) behind
// a real HAProxy (round robin; long-polling sticky by cookie, as a browser deployment needs),
// driven by socket.io-client 2.x and 4.x: messages cross nodes live, a device's newest socket
// wins across nodes, shared rooms span nodes, and neither a `kill -9` of a node nor of Redis
// under load loses a message answered 200. Every wait is bounded.
import { test, before, after, describe } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import {
  VERSIONS, startWebsite, startNode, startRedis, freePort, oldEnv, client, ready, send, ackOf, argsOf, until, within,
} from "./helpers.mjs";

const USERS = 24;
let website, redis;
const clusters = [];

before(async () => {
  website = await startWebsite();
  for (let u = 0; u < USERS; u++) website.tokens.set(`t${u}`, [`user_${u}`, "staff"]);
  redis = await startRedis(["--appendonly", "yes", "--appendfsync", "always"]);
});
after(async () => {
  for (const c of clusters) await c.cleanup();
  await redis?.stop();
  await website?.close();
});

/** HAProxy in front of `nodes`: round robin, a node out once its /readyz fails, polling sticky by cookie. */
async function startHaproxy(nodes) {
  const dir = mkdtempSync(path.join(tmpdir(), "sio-push-haproxy-"));
  const port = await freePort();
  const config = `
global
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
  option redispatch
  retries 2
frontend push
  bind 127.0.0.1:${port}
  default_backend nodes
backend nodes
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  cookie SIO_NODE insert indirect nocache
  default-server inter 200ms fall 1 rise 2
${nodes.map((n, i) => `  server n${i} 127.0.0.1:${n.port} check cookie n${i}`).join("\n")}
`;
  writeFileSync(path.join(dir, "haproxy.cfg"), config);
  const child = spawn("haproxy", ["-db", "-f", path.join(dir, "haproxy.cfg")], { stdio: ["ignore", "ignore", "pipe"] });
  const proxy = { child, port, url: `http://127.0.0.1:${port}`, log: "" };
  child.stderr.on("data", (c) => (proxy.log += c));
  proxy.exited = new Promise((r) => child.on("exit", r));
  // Ready once every node answered through it.
  await within((async () => {
    const seen = new Set();
    while (seen.size < nodes.length) {
      const res = await fetch(`${proxy.url}/readyz`).catch(() => null);
      const cookie = res?.headers.get("set-cookie");
      if (res?.status === 200 && cookie) seen.add(cookie.split(";")[0]);
      else await new Promise((r) => setTimeout(r, 50));
    }
  })(), "HAProxy to reach every node", 15000);
  proxy.stop = async () => {
    child.kill("SIGTERM");
    await within(proxy.exited, "HAProxy to stop");
    rmSync(dir, { recursive: true, force: true });
  };
  return proxy;
}

/** `count` nodes on the test Redis under their own key prefix, and HAProxy in front. */
async function startCluster(name, count = 2, extra = {}) {
  const env = oldEnv(website, {
    SIO_PUSH_STORE__BACKEND: "redis",
    SIO_PUSH_STORE__REDIS_URL: redis.url,
    SIO_PUSH_STORE__KEY_PREFIX: `cluster-${name}`,
    SIO_PUSH_STORE__REDIS_TIMEOUT_MS: "1000",
    SIO_PUSH_SERVER__REQUEST_TIMEOUT_SECS: "5",
    ...extra,
  });
  const nodes = await Promise.all(Array.from({ length: count }, () => startNode(env)));
  const proxy = await startHaproxy(nodes);
  const cluster = {
    nodes,
    proxy,
    async cleanup() {
      await proxy.stop().catch(() => {});
      await Promise.all(nodes.map((n) => n.cleanup()));
    },
  };
  clusters.push(cluster);
  return cluster;
}

/** The cookie HAProxy pins a polling client with, as a browser would have kept it. */
async function stickyCookie(proxy) {
  const res = await fetch(`${proxy.url}/readyz`);
  return res.headers.get("set-cookie").split(";")[0];
}

/**
 * A client that acks everything and counts every `m` message by its number, live or in a
 * `_batch`; with `reconnect` it comes back after a lost connection, as an app does.
 */
function collector(version, target, opts) {
  const c = client(version, target, opts);
  c.got = new Map();
  const count = (n) => c.got.set(n, (c.got.get(n) ?? 0) + 1);
  c.listeners.push((args) => {
    if (args[0] === "m") count(argsOf(args)[0]);
    if (args[0] === "_batch") for (const [event, n] of argsOf(args)[0]) if (event === "m") count(n);
    if (args[0] === "m" || args[0] === "_batch") ackOf(args)?.();
  });
  return c;
}

/** `count` collectors of both generations on websocket that reconnect as apps do, all settled. */
async function reconnectingCollectors(target, count, prefix) {
  const clients = [];
  for (let u = 0; u < count; u++) {
    const opts = { token: `t${u}`, deviceId: `${prefix}${u}`, transports: ["websocket"], reconnect: true };
    clients.push(collector(VERSIONS[u % 2], target, opts));
  }
  await Promise.all(clients.map((c) => c.connected.then(() => c.waitFor("_settings"))));
  return clients;
}

/** POSTs message `n` to `target` as a website that retries (same Idempotency-Key) until 200. */
async function sendUntilAccepted(target, body, key, { tries = 100 } = {}) {
  for (let i = 0; i < tries; i++) {
    const res = await send(target, { body, headers: { "Idempotency-Key": key } }).catch((e) => ({ status: 0, text: String(e) }));
    if (res.status === 200) return i;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`message ${key} never accepted`);
}

/** Waits until the node's log says the device connected (so its record names that node). */
function connectedOn(node, device, from) {
  return node.logged(new RegExp(`device connected[^\\n]*device=${device}\\b`), from);
}

const ADMIN_TOKEN = "admin-token-for-the-cluster-test";

/** GET /api/status of a node's admin API. */
async function status(node) {
  const res = await fetch(`${node.adminUrl}/api/status`, { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } });
  assert.equal(res.status, 200);
  return res.json();
}

let cluster;
describe("two nodes, direct", () => {
  before(async () => {
    cluster = await startCluster("direct", 2, { SIO_PUSH_ADMIN__LISTEN: "127.0.0.1:0", SIO_PUSH_ADMIN__TOKEN: ADMIN_TOKEN });
  });

  for (const version of VERSIONS) {
    test(`${version}: a message sent to one node reaches the other node's client live; offline, it is in the _batch at either node`, async () => {
      const [a, b] = cluster.nodes;
      for (let round = 0; round < 20; round++) {
        const [here, there] = round % 2 ? [a, b] : [b, a];
        const opts = { token: "t1", deviceId: `${version}-cross` };
        const c = await ready(version, here, opts);
        const live = `live-${round}`;
        assert.equal((await send(there, { body: { rooms: ["user_1"], event: "x", args: [live] } })).status, 200);
        const got = await c.waitFor("x", (e) => e[1] === live);
        ackOf(got)();
        const from = here.log.length;
        c.close();
        await here.logged(/device disconnected/, from);
        const offline = `offline-${round}`;
        assert.equal((await send(here, { body: { rooms: ["user_1"], event: "x", args: [offline] } })).status, 200);
        const back = await ready(version, there, opts);
        const batch = await back.waitFor("_batch");
        assert.deepEqual(argsOf(batch)[0], [["x", offline]], `round ${round}: only what was not acked`);
        ackOf(batch)();
        back.close();
        await there.logged(/_batch acked/, 0);
      }
    });

    test(`${version}: the newest socket of a device wins across nodes`, async () => {
      const [a, b] = cluster.nodes;
      for (let round = 0; round < 20; round++) {
        const [older, newer] = round % 2 ? [a, b] : [b, a];
        const opts = { token: "t2", deviceId: `${version}-takeover` };
        const first = await ready(version, older, opts);
        const from = newer.log.length;
        const second = await ready(version, newer, opts);
        await connectedOn(newer, opts.deviceId, from);
        for (const via of [older, newer]) {
          const marker = `r${round}-via-${via.port}`;
          assert.equal((await send(via, { body: { rooms: ["user_2"], event: "x", args: [marker] } })).status, 200);
          ackOf(await second.waitFor("x", (e) => e[1] === marker))();
        }
        assert.equal(first.events.filter((e) => e[0] === "x").length, 0, `round ${round}: the older socket got nothing`);
        first.close();
        second.close();
        await newer.logged(/device disconnected[^\n]*takeover/, from);
      }
    });
  }

  for (const version of VERSIONS) {
    test(`${version}: sends that alternate between the nodes arrive in send order, so resync acks never see a false gap`, async () => {
      const [a, b] = cluster.nodes;
      const clients = [];
      for (let u = 12; u < 20; u++) {
        const c = await ready(version, u % 2 ? a : b, { token: `t${u}`, deviceId: `alt-${version}-${u}` });
        c.listeners.push((args) => args[0] === "m" && ackOf(args)?.());
        clients.push(c);
      }
      const TOTAL = 150;
      for (let n = 0; n < TOTAL; n++) {
        const res = await send(n % 2 ? a : b, { resync: true, body: { rooms: ["staff"], event: "m", args: [n] } });
        assert.equal(res.status, 200);
      }
      for (const c of clients) {
        await until(c, () => c.events.filter((e) => e[0] === "m").length === TOTAL, `${version} gets all ${TOTAL}`);
        const got = c.events.filter((e) => e[0] === "m").map((e) => argsOf(e)[0]);
        assert.deepEqual(got, Array.from({ length: TOTAL }, (_, n) => n), "each once, in send order");
        assert.equal(c.events.filter((e) => e[0] === "_resync").length, 0, "no false _resync");
        c.close();
      }
    });
  }

  test("each node's status shows its own sockets and node id beside the service's devices and queues", async () => {
    const [a, b] = cluster.nodes;
    const clients = [];
    for (let u = 0; u < 5; u++) clients.push(await ready(VERSIONS[u % 2], u < 3 ? a : b, { token: "t21", deviceId: `status-${u}` }));
    assert.equal((await send(a, { body: { rooms: ["user_21"], event: "x", args: [1] } })).status, 200);
    await Promise.all(clients.map((c) => c.waitFor("x")));
    // Read both until no ack of an earlier test lands between the two reads (bounded).
    let sa, sb, shopA, shopB;
    for (let i = 0; i < 50; i++) {
      [sa, sb] = [await status(a), await status(b)];
      [shopA, shopB] = [sa.sites[0], sb.sites[0]];
      if (shopA.queued_messages === shopB.queued_messages && shopA.connected_devices === shopB.connected_devices) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(sa.node && sb.node && sa.node !== sb.node, "each node names itself");
    assert.deepEqual([shopA.sockets, shopB.sockets], [3, 2], "sockets: the node's own");
    assert.equal(shopA.connected_devices, shopB.connected_devices, "connected devices: the service's");
    assert.equal(shopA.queued_messages, shopB.queued_messages, "queues: the service's");
    assert.ok(shopA.connected_devices >= 5 && shopA.queued_messages >= 5, JSON.stringify(shopA));
    for (const c of clients) c.close();
  });

  test("a shared room reaches its users on every node, whichever node gets the /send", async () => {
    const [a, b] = cluster.nodes;
    const clients = [];
    for (let u = 3; u < 11; u++) {
      const version = VERSIONS[u % 2];
      clients.push(await ready(version, u % 2 ? a : b, { token: `t${u}`, deviceId: `shared-${u}` }));
    }
    for (let i = 0; i < 10; i++) {
      const via = i % 2 ? a : b;
      assert.equal((await send(via, { body: { rooms: ["STAFF"], event: "x", args: [`s${i}`] } })).status, 200);
    }
    for (const c of clients) {
      await until(c, () => c.events.filter((e) => e[0] === "x").length === 10, `${c.version} gets all 10`);
      const got = c.events.filter((e) => e[0] === "x");
      assert.deepEqual(got.map((e) => e[1]), Array.from({ length: 10 }, (_, i) => `s${i}`), "each once, in order");
      got.forEach((e) => ackOf(e)());
      c.close();
    }
  });
});

describe("behind HAProxy", () => {
  test("clients of both generations on websocket (round robin) and polling (sticky by cookie) get every message once, in order", async () => {
    const { nodes, proxy } = await startCluster("proxy");
    const target = { url: proxy.url, port: proxy.port };
    const clients = [];
    for (let u = 0; u < USERS; u++) {
      const version = VERSIONS[u % 2];
      const polling = u % 4 >= 2;
      const opts = polling
        ? { token: `t${u}`, deviceId: `p${u}`, transports: ["polling"], extraHeaders: { Cookie: await stickyCookie(proxy) } }
        : { token: `t${u}`, deviceId: `w${u}`, transports: ["websocket"] };
      clients.push(collector(version, target, opts));
    }
    await Promise.all(clients.map((c) => c.connected.then(() => c.waitFor("_settings"))));
    for (const node of nodes) assert.match(node.log, /device connected/, "every node holds some of the clients");
    for (let n = 0; n < 30; n++) {
      assert.equal((await send(target, { body: { rooms: ["staff"], event: "m", args: [n] } })).status, 200);
    }
    for (const c of clients) {
      await until(c, () => c.got.size === 30, `${c.version} client gets all 30`, 15000);
      assert.ok([...c.got.values()].every((times) => times === 1), "each message once");
      const order = c.events.filter((e) => e[0] === "m").map((e) => argsOf(e)[0]);
      assert.deepEqual(order, [...order].sort((x, y) => x - y), "in send order");
      c.close();
    }
  });

  test("a node killed with kill -9 under load loses nothing: its clients come back through HAProxy and get their _batch", async () => {
    const { nodes, proxy } = await startCluster("kill", 2, { DEVICE_TTL: "3600" });
    const target = { url: proxy.url, port: proxy.port };
    const clients = await reconnectingCollectors(target, 16, "k");
    const TOTAL = 150;
    let retried = 0;
    const sender = (async () => {
      for (let n = 0; n < TOTAL; n++) {
        retried += await sendUntilAccepted(target, { rooms: ["staff"], event: "m", args: [n] }, `kill-${n}`);
        if (n === 50) nodes[0].child.kill("SIGKILL");
      }
    })();
    await within(sender, "every message accepted (retried through the balancer)", 60000);
    for (const c of clients) {
      await until(c, () => c.got.size === TOTAL, `${c.version} client gets all ${TOTAL} (has ${c.got.size})`, 30000);
      c.close();
    }
    assert.match(nodes[1].log, /_batch sent/, "clients of the dead node got their queue from the other");
    console.log(`kill -9: ${TOTAL} messages to 16 clients, 0 lost; ${retried} retries of /send while the node was down`);
  });

  test("Redis killed under load: 503 and unready while it is down, nothing answered 200 lost, service back by itself", async () => {
    const { nodes, proxy } = await startCluster("redis-restart");
    const target = { url: proxy.url, port: proxy.port };
    const clients = await reconnectingCollectors(target, 12, "r");
    const TOTAL = 120;
    let outage;
    const sender = (async () => {
      for (let n = 0; n < TOTAL; n++) {
        await sendUntilAccepted(target, { rooms: ["staff"], event: "m", args: [n] }, `redis-${n}`, { tries: 300 });
        if (n === 40) outage = takeRedisDown();
      }
    })();
    async function takeRedisDown() {
      await redis.stop({ kill: true });
      // While it is down: /send answers 503 in time, /readyz 503, a new client is refused.
      const node = nodes[0];
      await within((async () => {
        while ((await fetch(`${node.url}/readyz`)).status !== 503) await new Promise((r) => setTimeout(r, 100));
      })(), "/readyz to answer 503", 10000);
      const started = Date.now();
      const res = await send(node, { body: { rooms: ["staff"], event: "m", args: [-1] } });
      assert.equal(res.status, 503, res.text);
      assert.match(res.text, /unreachable/);
      assert.ok(Date.now() - started < 5500, `answered within request_timeout_secs (${Date.now() - started} ms)`);
      const refused = await client("v4", node, { token: "t20", deviceId: "while-down" }).refusal();
      assert.match(refused, /storage is unreachable/);
      assert.ok(clients.every((c) => c.socket.connected), "connected sockets stay connected");
      await redis.start();
      await within((async () => {
        while ((await fetch(`${node.url}/readyz`)).status !== 200) await new Promise((r) => setTimeout(r, 100));
      })(), "/readyz to answer 200 again", 15000);
    }
    await within(sender, "every message accepted", 90000);
    await within(outage, "the outage checks", 30000);
    for (const c of clients) {
      await until(c, () => c.got.size === TOTAL, `${c.version} client gets all ${TOTAL} (has ${c.got.size})`, 30000);
      c.close();
    }
  });
});
