// Test harness: the real sio-push binary, a real HTTP mock of the customer's website, and real
// socket.io clients (2.x and 4.x). Every wait is bounded.
import { execFileSync, spawn } from "node:child_process";
import { EventEmitter } from "node:events";
import http from "node:http";
import net from "node:net";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.SIO_PUSH_BIN || path.resolve(here, "../../target/release/sio-push");
const clients = { v2: require("socket.io-client-v2"), v4: require("socket.io-client-v4") };
export const VERSIONS = ["v2", "v4"];
export const WAIT_MS = 5000;
// With SIO_PUSH_E2E_LOG_DIR set, every server's log and every token a mock website handed out
// are kept there, for scan-logs.mjs to check that no secret ever reached a log.
const LOG_DIR = process.env.SIO_PUSH_E2E_LOG_DIR;
let kept = 0;
function keep(name, text) {
  if (LOG_DIR) writeFileSync(path.join(LOG_DIR, `${process.pid}-${kept++}-${name}`), text);
}

/** Resolves with `promise`, or rejects after `ms` naming `what`. */
export function within(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * The customer's website: GET /auth answers from `tokens` (token -> {status, body} or a room
 * list), PUT /users/:id records presence callbacks. Every request is recorded.
 */
export async function startWebsite() {
  // authDelayMs slows the auth endpoint down; authInFlight/maxAuthInFlight count concurrency.
  const site = { tokens: new Map(), requests: [], waiters: [], authDelayMs: 0, authInFlight: 0, maxAuthInFlight: 0 };
  site.server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", async () => {
      if (req.method === "GET" && req.url.startsWith("/auth") && site.authDelayMs) {
        site.maxAuthInFlight = Math.max(site.maxAuthInFlight, ++site.authInFlight);
        await new Promise((r) => setTimeout(r, site.authDelayMs));
        site.authInFlight--;
      }
      const record = { method: req.method, url: req.url, headers: req.headers, body };
      site.requests.push(record);
      site.waiters = site.waiters.filter((w) => !(w.pred(record) && (w.resolve(record), true)));
      if (req.method === "GET" && req.url.startsWith("/auth")) {
        const token = (req.headers.authorization || "").split(" ").slice(1).join(" ");
        let answer = site.tokens.get(token) ?? { status: 401, body: "Unauthorized" };
        if (Array.isArray(answer)) answer = { status: 200, body: JSON.stringify(answer) };
        res.writeHead(answer.status, { "Content-Type": answer.type || "application/json" });
        res.end(answer.body);
      } else if (req.method === "PUT" && req.url.startsWith("/users/")) {
        res.writeHead(200).end("{}");
      } else {
        res.writeHead(404).end();
      }
    });
  });
  await new Promise((r) => site.server.listen(0, "127.0.0.1", r));
  site.url = `http://127.0.0.1:${site.server.address().port}`;
  /** Waits for a recorded request matching `pred` (past or future). */
  site.waitFor = (pred, what = "a website request") => {
    const seen = site.requests.find(pred);
    if (seen) return Promise.resolve(seen);
    return within(new Promise((resolve) => site.waiters.push({ pred, resolve })), what);
  };
  site.close = () => {
    keep("tokens.json", JSON.stringify([...site.tokens.keys()]));
    return new Promise((r) => site.server.close(r));
  };
  return site;
}

/** Env of the old service for one reliable site `shop` backed by `website`. */
export function oldEnv(website, extra = {}) {
  return {
    SITE_NAME: "shop",
    AUTH_URL: `${website.url}/auth`,
    AUTH_SCHEME: "Bearer",
    API_KEY: "secret-key",
    USER_ROOM_PREFIX: "user_",
    DEVICE_TTL: "3600",
    ...extra,
  };
}

// SIO_PUSH_E2E_CLUSTER=1 runs every server of a test file as two nodes on one Redis: clients
// connect to the first, `/send` goes to the second, so every message crosses nodes.
export const CLUSTER = process.env.SIO_PUSH_E2E_CLUSTER === "1";

/**
 * A `redis-server` (Debian's package) on a Unix socket in a temporary directory, with `args`
 * added; stopped when this process exits. `url` is what `[store] redis_url` takes.
 */
export async function startRedis(args = []) {
  const dir = mkdtempSync(path.join(tmpdir(), "sio-push-redis-"));
  const socket = path.join(dir, "redis.sock");
  const redis = { dir, socket, url: `redis+unix://${socket}` };
  redis.start = async () => {
    // No pipes: a child with open pipes would keep this process alive after its tests.
    const child = spawn("redis-server", ["--port", "0", "--unixsocket", socket, "--dir", dir, "--save", "", ...args], {
      stdio: "ignore",
    });
    child.unref();
    redis.child = child;
    redis.exited = new Promise((r) => child.on("exit", r));
    await within(
      (async () => {
        while (!(await answers(socket))) await new Promise((r) => setTimeout(r, 20));
      })(),
      "redis-server to start",
      10000,
    );
    return redis;
  };
  /** Stops it: SIGKILL with `kill`, else SIGTERM (which writes the AOF and exits). */
  redis.stop = async ({ kill = false } = {}) => {
    if (redis.child.exitCode === null && redis.child.signalCode === null) redis.child.kill(kill ? "SIGKILL" : "SIGTERM");
    await within(redis.exited, "redis-server to stop", 15000);
    if (existsSync(socket)) rmSync(socket);
  };
  process.on("exit", () => {
    redis.child?.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  });
  return redis.start();
}

/** A free loopback port (for servers that cannot report one they picked). */
export function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/**
 * A Redis Cluster of three primaries (Debian's redis-server with `--cluster-enabled yes`, joined
 * by `redis-cli --cluster create`) on loopback ports; stopped when this process exits. `urls` is
 * what `[store] redis_url` takes with `redis_cluster = true`; `cli(...args)` runs redis-cli
 * against the first node (with `-c`, following redirections).
 */
export async function startRedisCluster() {
  const dir = mkdtempSync(path.join(tmpdir(), "sio-push-redis-cluster-"));
  const nodes = [];
  for (let i = 0; i < 3; i++) {
    const [port, bus] = [await freePort(), await freePort()];
    const own = path.join(dir, `n${i}`);
    mkdirSync(own);
    const child = spawn("redis-server", [
      "--port", String(port), "--cluster-port", String(bus), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
      "--cluster-config-file", path.join(own, "nodes.conf"), "--dir", own, "--save", "", "--appendonly", "no",
    ], { stdio: "ignore" });
    child.unref();
    nodes.push({ port, child });
  }
  process.on("exit", () => {
    for (const n of nodes) n.child.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  });
  const cli = (port, ...args) => execFileSync("redis-cli", ["-p", String(port), ...args], { encoding: "utf8" }).trim();
  await within((async () => {
    for (const n of nodes) {
      while (!(await new Promise((r) => net.connect(n.port, "127.0.0.1").on("connect", function () { this.destroy(); r(true); }).on("error", () => r(false))))) {
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  })(), "the cluster's redis-servers to start", 10000);
  execFileSync("redis-cli", ["--cluster", "create", ...nodes.map((n) => `127.0.0.1:${n.port}`), "--cluster-replicas", "0", "--cluster-yes"], { stdio: "ignore" });
  await within((async () => {
    while (!nodes.every((n) => cli(n.port, "cluster", "info").includes("cluster_state:ok"))) await new Promise((r) => setTimeout(r, 50));
  })(), "the cluster to be ok", 15000);
  return {
    nodes,
    urls: nodes.map((n) => `redis://127.0.0.1:${n.port}/`).join(","),
    /** The keys matching `pattern` on the node at `port`. */
    keysOn: (port, pattern) => cli(port, "--scan", "--pattern", pattern).split("\n").filter(Boolean),
    /** The port of the primary holding `key`'s hash slot. */
    primaryOf(key) {
      const slot = Number(cli(nodes[0].port, "cluster", "keyslot", key));
      const owner = nodes.find((n) => ownsSlot(cli(n.port, "cluster", "nodes"), slot));
      return owner.port;
    },
  };
}

/** Whether the `myself` line of CLUSTER NODES lists `slot`. */
function ownsSlot(clusterNodes, slot) {
  const me = clusterNodes.split("\n").find((l) => l.includes("myself"));
  return me.split(" ").slice(8).some((range) => {
    const [a, b = a] = range.split("-").map(Number);
    return slot >= a && slot <= b;
  });
}

/** Whether a Redis answers PING on the Unix socket. */
function answers(socket) {
  return new Promise((resolve) => {
    const conn = net.createConnection(socket, () => conn.write("PING\r\n"));
    conn.on("data", (d) => (conn.destroy(), resolve(d.toString().startsWith("+PONG"))));
    conn.on("error", () => resolve(false));
  });
}

let sharedRedis;
let prefixes = 0;
const prefixOf = new Map();

/**
 * Starts `sio-push serve` configured only by `env` (plus PORT=0 and SIO_PUSH_DATA_DIR), and
 * resolves once it logs the address it serves on. With `command` ([program, ...args]) that
 * command runs instead, with `env` alone and in `cwd`, and no data dir is made or removed.
 * In cluster mode (see CLUSTER) the server is two nodes on a Redis of this process.
 */
export async function startServer(env, opts = {}) {
  if (!CLUSTER || opts.command) return startNode(env, opts);
  sharedRedis ??= startRedis();
  const redis = await sharedRedis;
  // A restart "on the same data dir" is a restart on the same keys.
  const prefix = prefixOf.get(opts.dataDir) ?? `e2e-${process.pid}-${prefixes++}`;
  const shared = {
    SIO_PUSH_STORE__BACKEND: "redis",
    SIO_PUSH_STORE__REDIS_URL: redis.url,
    SIO_PUSH_STORE__KEY_PREFIX: prefix,
    ...env,
  };
  const server = joinNodes(await Promise.all([startNode(shared, opts), startNode(shared, opts)]));
  prefixOf.set(server.dataDir, prefix);
  return server;
}

/**
 * Several nodes as one server for the tests: clients go to the first, `/send` to the last, and
 * the log is every node's, in the order the lines came.
 */
export function joinNodes(nodes) {
  const [first, last] = [nodes[0], nodes[nodes.length - 1]];
  const stderr = new EventEmitter();
  const server = {
    ...first,
    nodes,
    sendUrl: last.url,
    sendPort: last.port,
    // What they logged while starting, then every line as it comes.
    log: nodes.map((n) => n.log).join(""),
    child: { stderr, kill: (signal) => nodes.forEach((n) => n.child.kill(signal)) },
  };
  for (const node of nodes) {
    node.child.stderr.on("data", (chunk) => {
      server.log += chunk;
      stderr.emit("data", chunk);
    });
  }
  server.exited = Promise.all(nodes.map((n) => n.exited)).then((all) => all[0]);
  server.stop = async () => (await Promise.all(nodes.map((n) => n.stop())))[0];
  server.kill = async () => (await Promise.all(nodes.map((n) => n.kill())))[0];
  server.cleanup = async () => Promise.all(nodes.map((n) => n.cleanup()));
  server.logged = (pattern, from = 0) => {
    const seen = () => pattern.test(server.log.slice(from));
    if (seen()) return Promise.resolve();
    return within(
      new Promise((resolve) => {
        const check = () => seen() && (stderr.off("data", check), resolve());
        stderr.on("data", check);
      }),
      `a log line matching ${pattern}`,
    );
  };
  return server;
}

export async function startNode(env, { dataDir, command, cwd, args: extraArgs = [] } = {}) {
  const own = !command;
  if (own) dataDir ??= mkdtempSync(path.join(tmpdir(), "sio-push-e2e-"));
  const [program, ...args] = command ?? [BIN, "serve", ...extraArgs];
  // A lower free-space floor than the 256 MiB default, so a nearly full CI disk still runs the
  // suite; disk.test.mjs tests the floor itself.
  const extra = own ? { PORT: "0", SIO_PUSH_DATA_DIR: dataDir, SIO_PUSH_SERVER__MIN_FREE_DISK_BYTES: "33554432" } : {};
  const child = spawn(program, args, {
    env: { PATH: process.env.PATH, RUST_LOG: "info", ...extra, ...env },
    cwd,
    stdio: ["ignore", "ignore", "pipe"],
  });
  const server = { child, dataDir, log: "" };
  const ready = new Promise((resolve, reject) => {
    child.stderr.on("data", (chunk) => {
      server.log += chunk;
      // Text (`serving listen=ADDR`) or JSON (`"message":"serving","listen":"ADDR"`) logs.
      const admin = server.log.match(/admin API serving"?[ ,]"?listen"?[=:]"?([\d.]+):(\d+)/);
      if (admin) server.adminUrl = `http://127.0.0.1:${admin[2]}`;
      const m = server.log.match(/(?:: |"message":")serving"?[ ,]"?listen"?[=:]"?([\d.]+):(\d+)/);
      if (m && !server.url) {
        server.port = Number(m[2]);
        server.url = `http://127.0.0.1:${server.port}`;
        resolve(server);
      }
    });
    child.on("exit", (code) => reject(new Error(`sio-push exited (${code}) before serving:\n${server.log}`)));
  });
  server.exited = new Promise((r) =>
    child.on("exit", (code, signal) => {
      keep("server.log", server.log);
      r({ code, signal });
    }),
  );
  await within(ready, "sio-push to serve", 15000);
  /** SIGTERM, and wait for the exit. */
  server.stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    return within(server.exited, "sio-push to stop", 25000);
  };
  /** Resolves once the log has a line matching `pattern` after `from` (a log offset). */
  server.logged = (pattern, from = 0) => {
    const seen = () => pattern.test(server.log.slice(from));
    if (seen()) return Promise.resolve();
    return within(
      new Promise((resolve) => {
        const check = () => seen() && (child.stderr.off("data", check), resolve());
        child.stderr.on("data", check);
      }),
      `a log line matching ${pattern}`,
    );
  };
  /** SIGKILL, and wait for the exit. */
  server.kill = async () => {
    child.kill("SIGKILL");
    return within(server.exited, "sio-push to die");
  };
  server.cleanup = async () => {
    await server.stop().catch(() => server.kill());
    if (own) rmSync(dataDir, { recursive: true, force: true });
  };
  return server;
}

/** POST /send; returns {status, text}. `body` is an object (JSON) or a string (form). */
export async function send(server, { site = "shop", apiKey = "secret-key", resync, body, headers = {} }) {
  const q = new URLSearchParams();
  if (site !== undefined && site !== null) q.set("site", site);
  if (apiKey !== undefined && apiKey !== null) q.set("apiKey", apiKey);
  if (resync !== undefined) q.set("resync", String(resync));
  const isForm = typeof body === "string";
  const res = await fetch(`${server.sendUrl ?? server.url}/send?${q}`, {
    method: "POST",
    headers: { "Content-Type": isForm ? "application/x-www-form-urlencoded" : "application/json", ...headers },
    body: isForm ? body : JSON.stringify(body),
  });
  return { status: res.status, text: await res.text() };
}

/**
 * A website that posts fast: keep-alive connections with Nagle off, as a busy backend's HTTP
 * client would (`fetch` above manages a few hundred requests a second here). `post(body)`
 * resolves with the status; `close()` drops the connections.
 */
export function busyWebsite(server, { site = "shop", apiKey = "secret-key", connections = 50 } = {}) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: connections });
  const post = (body) =>
    new Promise((resolve, reject) => {
      const data = JSON.stringify(body);
      const req = http.request(
        {
          host: "127.0.0.1",
          port: server.sendPort ?? server.port,
          path: `/send?site=${site}&apiKey=${apiKey}`,
          method: "POST",
          agent,
          headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) },
        },
        (res) => (res.resume(), res.on("end", () => resolve(res.statusCode))),
      );
      req.on("socket", (socket) => socket.setNoDelay(true));
      req.on("error", reject);
      req.end(data);
    });
  return { post, close: () => agent.destroy() };
}

/**
 * A socket.io client of `version`, connected to `/<site>?token=..&deviceId=..&meta=..` the way
 * the old service's README shows. Records every event as [event, ...args, ack?].
 */
export function client(version, server, { site = "shop", token, deviceId, meta, transports, extraHeaders, ca, reconnect = false } = {}) {
  const q = new URLSearchParams();
  if (token !== undefined) q.set("token", token);
  if (deviceId !== undefined) q.set("deviceId", deviceId);
  if (meta !== undefined) q.set("meta", meta);
  const url = `${server.url}/${site}?${q}`;
  // `reconnect`: as an app would, retry every 100-500 ms after a lost connection.
  const retry = reconnect ? { reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 500, randomizationFactor: 0 } : { reconnection: false };
  const opts = { forceNew: true, ...retry, ...(transports ? { transports } : {}), ...(extraHeaders ? { extraHeaders } : {}), ...(ca ? { ca } : {}) };
  const socket = clients[version](url, opts);
  // `listeners` see every event as it arrives (to ack it, say), after it is recorded.
  const c = { socket, version, events: [], waiters: [], listeners: [] };
  const record = (args) => {
    c.events.push(args);
    c.waiters = c.waiters.filter((w) => !(w.pred(args) && (w.resolve(args), true)));
    for (const listener of [...c.listeners]) listener(args);
  };
  if (version === "v2") {
    socket.onevent = function (packet) {
      const args = packet.data || [];
      if (packet.id != null) args.push(this.ack(packet.id));
      record(args);
    };
  } else {
    socket.onAny((...args) => record(args));
  }
  /** Resolves on connect, rejects with the refusal message. */
  c.connected = within(
    new Promise((resolve, reject) => {
      socket.on("connect", () => resolve(c));
      if (version === "v2") socket.on("error", (msg) => reject(new Error(String(msg))));
      else socket.on("connect_error", (err) => reject(new Error(err.message)));
    }),
    `${version} client to connect`,
  );
  /** The refusal message (rejects if the connection is accepted). */
  c.refusal = () =>
    c.connected.then(
      () => { throw new Error("connection was accepted"); },
      (e) => e.message,
    );
  /** Waits for an event named `name` (optionally matching `pred`), past or future. */
  c.waitFor = (name, pred = () => true) => {
    const match = (args) => args[0] === name && pred(args);
    const seen = c.events.find(match);
    if (seen) return Promise.resolve(seen);
    return within(new Promise((resolve) => c.waiters.push({ pred: match, resolve })), `${version} event ${name}`);
  };
  c.close = () => socket.close();
  return c;
}

/** Connects and waits for `_settings`, after which the device is registered. */
export async function ready(version, server, opts) {
  const c = client(version, server, opts);
  await c.connected;
  await c.waitFor("_settings");
  return c;
}

/** Waits (up to `ms`) until `pred()` holds, checking on every event `c` receives. */
export function until(c, pred, what, ms = WAIT_MS) {
  if (pred()) return Promise.resolve();
  return within(
    new Promise((resolve) => {
      const check = () => pred() && (c.listeners.splice(c.listeners.indexOf(check), 1), resolve());
      c.listeners.push(check);
    }),
    what,
    ms,
  );
}

/** Every socket.io client generation with each transport a browser or app may end up on. */
export const COMBOS = VERSIONS.flatMap((version) => [["websocket"], ["polling"]].map((transports) => ({ version, transports })));

/** The ack callback recorded with an event, if any. */
export function ackOf(args) {
  const last = args[args.length - 1];
  return typeof last === "function" ? last : null;
}

/** The event's arguments without the ack. */
export function argsOf(args) {
  return args.slice(1).filter((a) => typeof a !== "function");
}

/** Waits until the server's log has a line matching `pattern`. */
export function logged(server, pattern, what = String(pattern)) {
  const seen = () => pattern.test(server.log);
  if (seen()) return Promise.resolve();
  return within(
    new Promise((resolve) => {
      const check = () => seen() && (server.child.stderr.off("data", check), resolve());
      server.child.stderr.on("data", check);
    }),
    what,
  );
}

/** Waits until the server has recorded the device's disconnect (its log says so). */
export function disconnected(server, device) {
  return logged(server, new RegExp(`device disconnected[^\\n]*device("?:"|=)${device}\\b`), `disconnect of ${device}`);
}

/**
 * Asserts that nothing was queued for the device: connects it, sends a marker, and checks that
 * the marker arrives live with no `_batch` before it.
 */
export async function queueIsEmpty(version, server, opts, user) {
  const c = await ready(version, server, opts);
  const marker = `marker-${Math.random()}`;
  const res = await send(server, { body: { rooms: [user], event: "marker", args: [marker] } });
  if (res.status !== 200) throw new Error(`marker send failed: ${res.status} ${res.text}`);
  const got = await c.waitFor("marker", (a) => a[1] === marker);
  ackOf(got)?.();
  const before = c.events.slice(0, c.events.indexOf(got)).map((e) => e[0]);
  c.close();
  return !before.includes("_batch");
}
