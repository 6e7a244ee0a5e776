// PROTOCOL.md Part A, with socket.io-client 2.x and 4.x, against the real binary.
import { test, before, after, describe } from "node:test";
import assert from "node:assert/strict";
import {
  VERSIONS, startWebsite, startServer, oldEnv, client, ready, send, ackOf, argsOf, disconnected, queueIsEmpty,
} from "./helpers.mjs";

let website, server;
const TOKENS = {
  "t-alice": ["user_1", "Staff", "user_1_admin"],
  "t-bob": ["user_2", "staff"],
  "t-carol": ["user_3"],
  "t-anon": ["browse"],
  "t-shared-only": ["staff"],
  "t-empty": [],
  "t-500": { status: 500, body: "boom" },
  "t-401-text": { status: 401, body: "Not logged in", type: "text/plain" },
  "t-not-array": { status: 200, body: '{"rooms":["user_1"]}' },
  "t-bad-json": { status: 200, body: "<html>", type: "text/html" },
};

before(async () => {
  website = await startWebsite();
  for (const [token, answer] of Object.entries(TOKENS)) website.tokens.set(token, answer);
  server = await startServer(
    oldEnv(website, { UPDATE_USER_URL: `${website.url}/users/:id`, PUBLIC_CHANNEL: "browse", REDIS_URL: "redis://127.0.0.1:6379" }),
  );
});
after(async () => {
  await server?.cleanup();
  await website?.close();
});

test("GET /healthcheck answers ok", async () => {
  const res = await fetch(`${server.url}/healthcheck`);
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "ok");
});

test("REDIS_URL is warned about in one line and does not stop the service", () => {
  const lines = server.log.split("\n").filter((l) => l.includes("REDIS_URL"));
  assert.equal(lines.length, server.nodes?.length ?? 1, server.log); // one per node
  assert.match(lines[0], /WARN/);
});

for (const version of VERSIONS) {
  describe(`socket.io-client ${version}`, () => {
    test("connects over polling with upgrade and over websocket only, and gets _settings with a numeric device_ttl", async () => {
      for (const transports of [undefined, ["websocket"], ["polling"]]) {
        const c = await ready(version, server, { token: "t-carol", deviceId: `${version}-settings`, transports });
        const settings = c.events.find((e) => e[0] === "_settings");
        assert.deepEqual(settings.slice(1).filter((a) => typeof a !== "function"), [{ device_ttl: 3600 }]);
        c.close();
      }
    });

    test("auth is called with the token and scheme, and X-META only when meta was given", async () => {
      const marker = `meta-${version}-${Date.now()}`;
      const c = await ready(version, server, { token: "t-carol", deviceId: `${version}-meta`, meta: marker });
      const withMeta = website.requests.find((r) => r.headers["x-meta"] === marker);
      assert.ok(withMeta, "an auth call carried X-META");
      assert.equal(withMeta.headers.authorization, "Bearer t-carol");
      c.close();
      const before = website.requests.length;
      const d = await ready(version, server, { token: "t-carol", deviceId: `${version}-nometa` });
      const call = website.requests.slice(before).find((r) => r.method === "GET");
      assert.equal(call.headers["x-meta"], undefined);
      d.close();
    });

    const refusals = [
      ["unknown token (401)", { token: "nobody" }, "Authentication failed"],
      ["401 with a plain-text body", { token: "t-401-text" }, "Authentication failed"],
      ["auth answers 500", { token: "t-500" }, "Auth 500 error"],
      ["no user room", { token: "t-shared-only" }, "User is missing a private room"],
      ["empty room list", { token: "t-empty" }, "User is missing a private room"],
      ["unknown namespace", { token: "t-carol", site: "nosuchsite" }, "Invalid namespace"],
    ];
    for (const [name, opts, message] of refusals) {
      test(`refuses: ${name} -> "${message}"`, async () => {
        const c = client(version, server, opts);
        assert.equal(await c.refusal(), message);
        c.close();
      });
    }

    test("refuses with 'Auth error: ...' when the body is not a JSON array of strings", async () => {
      for (const token of ["t-not-array", "t-bad-json"]) {
        const c = client(version, server, { token });
        assert.match(await c.refusal(), /^Auth error: /);
        c.close();
      }
    });

    test("a live message arrives as event(...args, ack); the ack removes it", async () => {
      const opts = { token: "t-carol", deviceId: `${version}-live` };
      const c = await ready(version, server, opts);
      const res = await send(server, { body: { rooms: ["user_3"], event: "update_store", args: ["user", { id: 1, age: 5 }] } });
      assert.deepEqual(res, { status: 200, text: "OK" });
      const got = await c.waitFor("update_store");
      assert.deepEqual(argsOf(got), ["user", { id: 1, age: 5 }]);
      ackOf(got)();
      c.close();
      await disconnected(server, opts.deviceId);
      assert.ok(await queueIsEmpty(version, server, opts, "user_3"), "acked message must not come back");
    });

    test("absent args arrive as one null, so the ack is the second argument", async () => {
      const c = await ready(version, server, { token: "t-carol", deviceId: `${version}-null` });
      await send(server, { body: { rooms: "user_3", event: "ping_me" } });
      const got = await c.waitFor("ping_me");
      assert.equal(got.length, 3);
      assert.equal(got[1], null);
      assert.equal(typeof got[2], "function");
      got[2]();
      c.close();
    });

    test("messages sent while offline arrive on reconnect as one _batch in send order; its ack empties the queue", async () => {
      const opts = { token: "t-carol", deviceId: `${version}-offline` };
      const first = await ready(version, server, opts);
      first.close();
      await disconnected(server, opts.deviceId);
      for (const [event, n] of [["a", 1], ["b", 2], ["a", 3]]) {
        assert.equal((await send(server, { body: { rooms: ["user_3"], event, args: [n, "x"] } })).status, 200);
      }
      const c = await ready(version, server, opts);
      const batch = await c.waitFor("_batch");
      assert.deepEqual(batch[1], [["a", 1, "x"], ["b", 2, "x"], ["a", 3, "x"]]);
      assert.equal(c.events.filter((e) => e[0] === "_batch").length, 1);
      ackOf(batch)();
      c.close();
      await disconnected(server, opts.deviceId);
      assert.ok(await queueIsEmpty(version, server, opts, "user_3"));
    });

    test("a _batch ack removes only what was in the batch", async () => {
      const opts = { token: "t-carol", deviceId: `${version}-inflight` };
      (await ready(version, server, opts)).close();
      await disconnected(server, opts.deviceId);
      await send(server, { body: { rooms: ["user_3"], event: "old", args: [1] } });
      const c = await ready(version, server, opts);
      const batch = await c.waitFor("_batch");
      // Sent while the batch is unacked: arrives live, left unacked.
      await send(server, { body: { rooms: ["user_3"], event: "new", args: [2] } });
      await c.waitFor("new");
      ackOf(batch)();
      // The batch ack is recorded before the server sees the disconnect (same socket, in order).
      c.close();
      await disconnected(server, opts.deviceId);
      const again = await ready(version, server, opts);
      const next = await again.waitFor("_batch");
      assert.deepEqual(next[1], [["new", 2]]);
      ackOf(next)();
      again.close();
    });

    test("a new socket of the same device takes over: only the newest gets live messages", async () => {
      const opts = { token: "t-carol", deviceId: `${version}-takeover` };
      const older = await ready(version, server, opts);
      const newer = await ready(version, server, opts);
      await send(server, { body: { rooms: ["user_3"], event: "who", args: ["x"] } });
      const got = await newer.waitFor("who");
      ackOf(got)();
      // A marker to the other user of the old socket would be meaningless; instead check the old
      // socket saw no `who` by the time the newer one got and acked it, and after a second send.
      await send(server, { body: { rooms: ["user_3"], event: "who", args: ["y"] } });
      ackOf(await newer.waitFor("who", (a) => a[1] === "y"))();
      assert.equal(older.events.filter((e) => e[0] === "who").length, 0);
      older.close();
      newer.close();
    });

    test("every device of a user has its own queue", async () => {
      const a = { token: "t-carol", deviceId: `${version}-phone` };
      const b = { token: "t-carol", deviceId: `${version}-laptop` };
      (await ready(version, server, a)).close();
      await disconnected(server, a.deviceId);
      const laptop = await ready(version, server, b);
      await send(server, { body: { rooms: ["user_3"], event: "both", args: [1] } });
      ackOf(await laptop.waitFor("both"))();
      laptop.close();
      const phone = await ready(version, server, a);
      const batch = await phone.waitFor("_batch");
      assert.deepEqual(batch[1], [["both", 1]]);
      ackOf(batch)();
      phone.close();
    });

    test("a shared room reaches the users whose room list holds it, case-insensitively, once each", async () => {
      const alice = await ready(version, server, { token: "t-alice", deviceId: `${version}-alice` });
      const bob = await ready(version, server, { token: "t-bob", deviceId: `${version}-bob` });
      const res = await send(server, { body: { rooms: ["STAFF", "staff", "user_2"], event: "memo", args: ["hi"] } });
      assert.equal(res.status, 200);
      // alice has two user rooms (user_1, user_1_admin): one copy per user room.
      const a = await alice.waitFor("memo");
      const b = await bob.waitFor("memo");
      assert.deepEqual([argsOf(a), argsOf(b)], [["hi"], ["hi"]]);
      for (const e of [...alice.events, ...bob.events].filter((e) => e[0] === "memo")) ackOf(e)();
      await send(server, { body: { rooms: ["user_2"], event: "marker", args: [] } });
      ackOf(await bob.waitFor("marker"))();
      assert.equal(bob.events.filter((e) => e[0] === "memo").length, 1, "bob got the memo once");
      alice.close();
      bob.close();
    });

    test("resync=true: an ack that skips an older message of the event clears it and sends _resync", async () => {
      const opts = { token: "t-carol", deviceId: `${version}-resync` };
      const c = await ready(version, server, opts);
      await send(server, { resync: true, body: { rooms: ["user_3"], event: "sync", args: [1] } });
      await send(server, { resync: true, body: { rooms: ["user_3"], event: "sync", args: [2] } });
      const second = await c.waitFor("sync", (a) => a[1] === 2);
      ackOf(second)(); // the first is still unacked
      await c.waitFor("_resync");
      const resync = c.events.find((e) => e[0] === "_resync");
      assert.deepEqual(argsOf(resync), []);
      c.close();
      await disconnected(server, opts.deviceId);
      assert.ok(await queueIsEmpty(version, server, opts, "user_3"), "the event's queue was cleared");
    });

    test("resync=true with in-order acks sends no _resync", async () => {
      const opts = { token: "t-carol", deviceId: `${version}-inorder` };
      const c = await ready(version, server, opts);
      await send(server, { resync: "1", body: { rooms: ["user_3"], event: "sync", args: [1] } });
      ackOf(await c.waitFor("sync", (a) => a[1] === 1))();
      await send(server, { resync: "true", body: { rooms: ["user_3"], event: "sync", args: [2] } });
      ackOf(await c.waitFor("sync", (a) => a[1] === 2))();
      await send(server, { body: { rooms: ["user_3"], event: "marker", args: [] } });
      ackOf(await c.waitFor("marker"))();
      assert.equal(c.events.filter((e) => e[0] === "_resync").length, 0);
      c.close();
    });

    test("the public channel is queued like a user room, with no presence callback", async () => {
      const opts = { token: "t-anon", deviceId: `${version}-anon` };
      (await ready(version, server, opts)).close();
      await disconnected(server, opts.deviceId);
      await send(server, { body: { rooms: ["browse"], event: "news", args: ["n"] } });
      const c = await ready(version, server, opts);
      const batch = await c.waitFor("_batch");
      assert.deepEqual(batch[1], [["news", "n"]]);
      ackOf(batch)();
      c.close();
      assert.ok(!website.requests.some((r) => r.method === "PUT" && r.url.includes("browse")));
    });

    test("presence: PUT last_connected and last_disconnected to update_user_url with the user id", async () => {
      const start = website.requests.length;
      const c = await ready(version, server, { token: "t-alice", deviceId: `${version}-presence` });
      const put = await website.waitFor(
        (r) => website.requests.indexOf(r) >= start && r.method === "PUT" && r.url === "/users/1" && r.body.includes("last_connected"),
        "PUT last_connected",
      );
      assert.equal(put.headers.authorization, "Bearer t-alice");
      assert.match(put.headers["content-type"], /^application\/json/);
      const body = JSON.parse(put.body);
      assert.equal(body.id, "1");
      assert.match(body.user.last_connected, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      c.close();
      const gone = await website.waitFor(
        (r) => website.requests.indexOf(r) >= start && r.method === "PUT" && r.url === "/users/1" && r.body.includes("last_disconnected"),
        "PUT last_disconnected",
      );
      assert.match(JSON.parse(gone.body).user.last_disconnected, /Z$/);
    });
  });
}

test("no token and no API key ever reaches the log", () => {
  assert.ok(server.log.includes("message stored"), "the log under test is the whole run's");
  for (const secret of [...Object.keys(TOKENS), "secret-key", "nobody"]) {
    assert.ok(!server.log.includes(secret), `the log contains ${secret}`);
  }
});
