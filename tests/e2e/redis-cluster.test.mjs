// Two sio-push nodes on a Redis Cluster of three primaries started by this test, with three
// sites whose hash slots lie on different primaries: socket.io-client 2.x and 4.x get every
// message sent to the other node, live and in their `_batch`, once and in send order.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { VERSIONS, startWebsite, startNode, startRedisCluster, joinNodes, ready, send, ackOf, argsOf, until } from "./helpers.mjs";

const PREFIX = "rc";
let website, redis, server, sites, dir;

before(async () => {
  website = await startWebsite();
  for (let u = 0; u < 12; u++) website.tokens.set(`t${u}`, [`user_${u}`, "staff"]);
  redis = await startRedisCluster();
  // One site per primary: the test is about keys on every primary, so it picks names that are.
  const byPrimary = new Map();
  for (let i = 0; byPrimary.size < 3 && i < 200; i++) {
    const port = redis.primaryOf(`{${PREFIX}:site${i}}`);
    if (!byPrimary.has(port)) byPrimary.set(port, `site${i}`);
  }
  sites = [...byPrimary.values()];
  assert.equal(sites.length, 3, "a site on each primary");
  dir = mkdtempSync(path.join(tmpdir(), "sio-push-rc-"));
  const config = path.join(dir, "config.toml");
  writeFileSync(config, sites.map((s) => `
[sites.${s}]
auth_url = "${website.url}/auth"
auth_scheme = "Bearer"
api_key = "secret-key"
user_room_prefix = "user_"
`).join(""));
  const env = {
    SIO_PUSH_STORE__BACKEND: "redis",
    SIO_PUSH_STORE__REDIS_URL: redis.urls,
    SIO_PUSH_STORE__REDIS_CLUSTER: "true",
    SIO_PUSH_STORE__KEY_PREFIX: PREFIX,
  };
  const opts = { args: ["--config", config] };
  server = joinNodes(await Promise.all([startNode(env, opts), startNode(env, opts)]));
});
after(async () => {
  await Promise.all((server?.nodes ?? []).map((n) => n.cleanup()));
  await website?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

for (const version of VERSIONS) {
  test(`${version}: on each primary's site, a message sent to the other node arrives live, and offline in the _batch`, async () => {
    const [a, b] = server.nodes;
    for (let round = 0; round < 40; round++) {
      for (const site of sites) {
        const [here, there] = round % 2 ? [a, b] : [b, a];
        const opts = { site, token: "t1", deviceId: `${version}-${site}` };
        const c = await ready(version, here, opts);
        const live = `live-${round}`;
        assert.equal((await send(there, { site, body: { rooms: ["user_1"], event: "x", args: [live] } })).status, 200);
        ackOf(await c.waitFor("x", (e) => e[1] === live))();
        const from = here.log.length;
        c.close();
        await here.logged(/device disconnected/, from);
        const offline = [`o1-${round}`, `o2-${round}`];
        for (const o of offline) {
          assert.equal((await send(here, { site, body: { rooms: ["user_1"], event: o.slice(0, 2), args: [o] } })).status, 200);
        }
        const back = await ready(version, there, opts);
        const batch = await back.waitFor("_batch");
        assert.deepEqual(argsOf(batch)[0], [["o1", offline[0]], ["o2", offline[1]]], `${site} round ${round}: in send order`);
        ackOf(batch)();
        const acked = there.log.length;
        back.close();
        await there.logged(/device disconnected/, acked);
      }
    }
  });
}

test("many clients of both generations on the three sites at once get every message once, in order", async () => {
  const [a, b] = server.nodes;
  const clients = [];
  for (const site of sites) {
    for (let u = 0; u < 8; u++) {
      clients.push(await ready(VERSIONS[u % 2], u % 2 ? a : b, { site, token: `t${u}`, deviceId: `many-${u}` }));
    }
  }
  const TOTAL = 20;
  await Promise.all(sites.map(async (site, i) => {
    for (let n = 0; n < TOTAL; n++) {
      const via = (n + i) % 2 ? a : b;
      assert.equal((await send(via, { site, body: { rooms: ["staff"], event: "m", args: [n] } })).status, 200);
    }
  }));
  for (const c of clients) {
    await until(c, () => c.events.filter((e) => e[0] === "m").length === TOTAL, `${c.version} gets all ${TOTAL}`);
    const got = c.events.filter((e) => e[0] === "m");
    assert.deepEqual(got.map((e) => argsOf(e)[0]), Array.from({ length: TOTAL }, (_, n) => n), "each once, in order");
    got.forEach((e) => ackOf(e)());
    c.close();
  }
  for (const node of redis.nodes) {
    const keys = redis.keysOn(node.port, `{${PREFIX}:*`);
    assert.ok(keys.length > 0, `the primary on ${node.port} holds keys of its site`);
  }
});
