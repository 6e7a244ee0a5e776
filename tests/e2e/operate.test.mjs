// Operating the service: /metrics, /readyz, the admin API, reload (SIGHUP and API), the operator
// CLI, and the status page in headless Chromium.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { BIN, startWebsite, startServer, client, ready, send, ackOf, disconnected, within } from "./helpers.mjs";

const run = promisify(execFile);
const TOKEN = "admin-token-0123456789";
let website, server, configPath;

function config({ shopKey = "shop-key", withOther = true, withThird = false, extra = "" } = {}) {
  const site = (name, key) =>
    `[sites.${name}]\nauth_url = "${website.url}/auth"\napi_key = "${key}"\nuser_room_prefix = "user_"\n`;
  return [
    `[server]\nlisten = "127.0.0.1:0"\n`,
    `[admin]\nlisten = "127.0.0.1:0"\ntoken = "${TOKEN}"\n`,
    site("shop", shopKey),
    withOther ? site("other", "other-key") : "",
    withThird ? site("third", "third-key") : "",
    extra,
  ].join("\n");
}

async function admin(pathname, { method = "GET", token = TOKEN } = {}) {
  const res = await fetch(`${server.adminUrl}${pathname}`, { method, headers: token ? { Authorization: `Bearer ${token}` } : {} });
  const text = await res.text();
  return { status: res.status, text, json: () => JSON.parse(text) };
}

async function metric(name, labels) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(name + "{") && labels.every((lab) => l.includes(lab)));
  return line ? Number(line.split(" ").pop()) : undefined;
}

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-op", ["user_1", "ops"]);
  website.tokens.set("t-op2", ["user_2"]);
  configPath = path.join(mkdtempSync(path.join(tmpdir(), "sio-push-op-")), "config.toml");
  writeFileSync(configPath, config());
  server = await startServer({}, { args: ["--config", configPath] });
  assert.ok(server.adminUrl, "the admin listener is up");
});
after(async () => {
  await server?.cleanup();
  await website?.close();
});

test("/readyz answers ready while serving", async () => {
  const res = await fetch(`${server.url}/readyz`);
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "ready");
});

test("/metrics counts sockets, sends, deliveries, acks and queues per site, never per user", async () => {
  const accepted = (await metric("sio_push_messages_accepted_total", ['site="shop"'])) ?? 0;
  const c = await ready("v4", server, { token: "t-op", deviceId: "metrics" });
  const v2 = await ready("v2", server, { token: "t-op2", deviceId: "metrics-v2" });
  assert.equal(await metric("sio_push_sockets_connected", ['site="shop"', 'protocol="v5"']), 1);
  assert.equal(await metric("sio_push_sockets_connected", ['site="shop"', 'protocol="v4"']), 1);
  assert.equal((await send(server, { apiKey: "shop-key", body: { rooms: "user_1", event: "m", args: [1] } })).status, 200);
  const m = await c.waitFor("m"); // left unacked: it stays queued
  assert.equal(await metric("sio_push_messages_accepted_total", ['site="shop"']), accepted + 1);
  assert.ok((await metric("sio_push_messages_delivered_total", ['site="shop"', 'via="live"'])) >= 1);
  assert.ok((await metric("sio_push_auth_requests_total", ['site="shop"', 'outcome="ok"'])) >= 2);
  // The queue gauge follows the store: the unacked live message, and one for an offline device.
  v2.close();
  await disconnected(server, "metrics-v2");
  assert.equal((await send(server, { apiKey: "shop-key", body: { rooms: "user_2", event: "q", args: [] } })).status, 200);
  assert.equal(await metric("sio_push_queued_messages", ['site="shop"']), 2);
  ackOf(m)();
  const text = await (await fetch(`${server.url}/metrics`)).text();
  for (const name of ["sio_push_send_duration_seconds_bucket", "sio_push_store_flush_duration_seconds_bucket", "sio_push_store_round_size"]) {
    assert.ok(text.includes(name), `${name} is exported`);
  }
  assert.ok(!/user_1|user_2|metrics-v2/.test(text), "no label names a user or a device");
  c.close();
  // Ack the queued message, so later tests start from an empty queue.
  const again = await ready("v2", server, { token: "t-op2", deviceId: "metrics-v2" });
  ackOf(await again.waitFor("_batch"))();
  again.close();
});

test("the admin API needs the bearer token", async () => {
  assert.equal((await admin("/api/status", { token: null })).status, 401);
  assert.equal((await admin("/api/status", { token: "wrong-token-0123456789" })).status, 401);
  assert.equal((await admin("/api/status")).status, 200);
});

test("the admin API shows sites and a user's devices, and drops one device's queue", async () => {
  const c = await ready("v4", server, { token: "t-op", deviceId: "admin-dev" });
  const status = (await admin("/api/status")).json();
  const shop = status.sites.find((s) => s.name === "shop");
  assert.equal(shop.sockets, 1);
  assert.ok(shop.connected_devices >= 1);
  c.close();
  await disconnected(server, "admin-dev");
  await send(server, { apiKey: "shop-key", body: { rooms: "user_1", event: "a", args: [1] } });
  await send(server, { apiKey: "shop-key", body: { rooms: "user_1", event: "a", args: [2] } });
  const devices = (await admin("/api/sites/shop/rooms/user_1/devices")).json();
  const dev = devices.find((d) => d.device === "admin-dev");
  assert.equal(dev.connected, false);
  assert.equal(dev.queue_len, 2);
  assert.equal(typeof dev.oldest_message_age_secs, "number");
  const dropped = await admin("/api/sites/shop/rooms/user_1/queue?device=admin-dev", { method: "DELETE" });
  assert.deepEqual(dropped.json(), { dropped: 2 });
  const after = (await admin("/api/sites/shop/rooms/user_1/devices")).json().find((d) => d.device === "admin-dev");
  assert.equal(after.queue_len, 0);
  assert.equal((await admin("/api/sites/nope/rooms/user_1/devices")).status, 404);
});

test("sio-push status prints the admin API's table; sio-push send posts a message", async () => {
  const { stdout } = await run(BIN, ["status", "--config", configPath, "--admin-url", server.adminUrl]);
  assert.match(stdout, /^SITE\s+MODE\s+SOCKETS/m);
  assert.match(stdout, /^shop\s+reliable\s+\d+/m);
  const c = await ready("v2", server, { token: "t-op", deviceId: "cli" });
  const sent = await run(BIN, ["send", "--config", configPath, "--url", server.url, "--site", "shop", "--rooms", "user_1", "--event", "from_cli", "--args", '[{"n":1},"two"]']);
  assert.equal(sent.stdout.trim(), "OK");
  const got = await c.waitFor("from_cli");
  assert.deepEqual(got.slice(1, 3), [{ n: 1 }, "two"]);
  ackOf(got)();
  c.close();
  await assert.rejects(
    run(BIN, ["send", "--config", configPath, "--url", server.url, "--api-key", "wrong", "--site", "shop", "--rooms", "user_1", "--event", "x"]),
    (e) => e.code === 1 && /401 ApiKey invalid/.test(e.stderr),
  );
});

test("the status page shows a connected client and a queued count that changes (headless Chromium)", async (t) => {
  const { chromium } = await import("playwright-core");
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  if (!existsSync(executablePath)) throw new Error(`Chromium not found at ${executablePath} (scripts/test.sh installs it)`);
  const browser = await chromium.launch({
    executablePath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  const c = await ready("v4", server, { token: "t-op2", deviceId: "page" });
  await page.goto(`${server.adminUrl}/#token=${TOKEN}`);
  const cell = (site, cls) => page.locator(`tr[data-site="${site}"] td.${cls}`);
  await page.waitForFunction(() => document.querySelector('tr[data-site="shop"] td.sockets')?.textContent === "1", null, { timeout: 5000 });
  assert.equal(await cell("shop", "sockets").textContent(), "1");
  const before = Number(await cell("shop", "queued").textContent());
  c.close();
  await disconnected(server, "page");
  await send(server, { apiKey: "shop-key", body: { rooms: "user_2", event: "for-the-page", args: [] } });
  // Queued for every offline device of user_2 (this one included): the count goes up.
  await page.waitForFunction(
    (n) => Number(document.querySelector('tr[data-site="shop"] td.queued')?.textContent.replace(/,/g, "")) > n,
    before,
    { timeout: 5000 },
  );
  const accepted = Number((await page.locator("#t-accepted").textContent()).replace(/,/g, ""));
  assert.ok(accepted >= 1, `totals show ${accepted} accepted`);
  if (process.env.SIO_PUSH_SCREENSHOT) await page.screenshot({ path: process.env.SIO_PUSH_SCREENSHOT });
  const again = await ready("v4", server, { token: "t-op2", deviceId: "page" });
  ackOf(await again.waitFor("_batch"))();
  again.close();
});

test("SIGHUP reloads: sites are added, removed and changed; unchanged connections stay; a bad config changes nothing", async () => {
  const staying = await ready("v4", server, { token: "t-op", deviceId: "stays" });
  const onOther = await ready("v2", server, { site: "other", token: "t-op", deviceId: "other" });
  writeFileSync(configPath, config({ shopKey: "new-shop-key", withOther: false, withThird: true, extra: "" }));
  const from = server.log.length;
  server.child.kill("SIGHUP");
  await server.logged(/configuration reloaded/, from);
  assert.match(server.log.slice(from), /added=\["third"\] removed=\["other"\] changed=\["shop"\]/);

  // The changed key applies; the old one is refused.
  assert.equal((await send(server, { apiKey: "shop-key", body: { rooms: "user_1", event: "x" } })).status, 401);
  assert.equal((await send(server, { apiKey: "new-shop-key", body: { rooms: "user_1", event: "after", args: [1] } })).status, 200);
  // The shop socket was never dropped and still gets live messages.
  ackOf(await staying.waitFor("after"))();
  assert.ok(staying.socket.connected);
  // The removed site's socket is gone, and new connections to it are refused; the added one works.
  await within(new Promise((r) => (onOther.socket.connected ? onOther.socket.once("disconnect", r) : r())), "the removed site's socket to close");
  const refused = client("v4", server, { site: "other", token: "t-op" });
  assert.equal(await refused.refusal(), "Invalid namespace");
  refused.close();
  const third = await ready("v4", server, { site: "third", token: "t-op", deviceId: "third" });
  third.close();

  // An invalid file: the reload is refused and the running configuration stays.
  writeFileSync(configPath, config({ shopKey: "newer-key", extra: "[server]\nbogus = 1\n" }));
  const from2 = server.log.length;
  server.child.kill("SIGHUP");
  await server.logged(/reload refused/, from2);
  assert.equal((await send(server, { apiKey: "new-shop-key", body: { rooms: "user_1", event: "still", args: [] } })).status, 200);
  ackOf(await staying.waitFor("still"))();
  staying.close();
  onOther.close();
});

test("POST /api/reload reloads and reports what changed, or why not", async () => {
  writeFileSync(configPath, config({ shopKey: "api-key-2", withThird: true }));
  const ok = await admin("/api/reload", { method: "POST" });
  assert.equal(ok.status, 200, ok.text);
  const report = ok.json();
  assert.deepEqual([report.added, report.removed, report.changed], [["other"], [], ["shop"]]);
  writeFileSync(configPath, config({ shopKey: "api-key-3", extra: '[admin]\nlisten = "127.0.0.1:9"\n' }));
  const refused = await admin("/api/reload", { method: "POST" });
  assert.equal(refused.status, 422);
  assert.match(refused.text, /^Reload refused: /);
  assert.equal((await send(server, { apiKey: "api-key-2", body: { rooms: "user_1", event: "e" } })).status, 200);
});
