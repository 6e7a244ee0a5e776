// POST /send: status codes and texts, body formats, and the non-reliable (broadcast) mode.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startWebsite, startServer, oldEnv, ready, send, ackOf, argsOf, VERSIONS } from "./helpers.mjs";

let website, server;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-dave", ["user_4", "team"]);
  server = await startServer(oldEnv(website));
});
after(async () => {
  await server?.cleanup();
  await website?.close();
});

test("missing site or apiKey: 400 with the old text", async () => {
  for (const q of [{ site: null }, { apiKey: null }, { site: null, apiKey: null }]) {
    const res = await send(server, { ...q, body: { rooms: "user_4", event: "e" } });
    assert.deepEqual(res, { status: 400, text: "Missing query param 'site' or 'apiKey'." });
  }
});

test("unknown site or wrong key: 401 with the old text", async () => {
  for (const q of [{ site: "nope" }, { apiKey: "wrong" }, { apiKey: "secret-ke" }]) {
    const res = await send(server, { ...q, body: { rooms: "user_4", event: "e" } });
    assert.deepEqual(res, { status: 401, text: "ApiKey invalid." });
  }
});

test("the API key may come as the X-Api-Key header instead of the query", async () => {
  const res = await send(server, { apiKey: null, headers: { "X-Api-Key": "secret-key" }, body: { rooms: "user_4", event: "e" } });
  assert.deepEqual(res, { status: 200, text: "OK" });
  const bad = await send(server, { apiKey: null, headers: { "X-Api-Key": "nope" }, body: { rooms: "user_4", event: "e" } });
  assert.equal(bad.status, 401);
});

test("bad bodies get a 400 that names the problem", async () => {
  const cases = [
    ["{not json", /Malformed JSON/],
    [JSON.stringify({ rooms: "user_4" }), /Missing or empty 'event'/],
    [JSON.stringify({ rooms: "user_4", event: "" }), /Missing or empty 'event'/],
    [JSON.stringify({ event: "e" }), /Missing 'rooms'/],
    [JSON.stringify({ rooms: 5, event: "e" }), /'rooms' must be/],
    [JSON.stringify({ rooms: "user_4", event: 5 }), /'event' must be a string/],
    [JSON.stringify([1]), /must be an object/],
  ];
  for (const [body, pattern] of cases) {
    const res = await fetch(`${server.url}/send?site=shop&apiKey=secret-key`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body,
    });
    assert.equal(res.status, 400, body);
    assert.match(await res.text(), pattern);
  }
  const plain = await fetch(`${server.url}/send?site=shop&apiKey=secret-key`, { method: "POST", headers: { "Content-Type": "text/plain" }, body: "x" });
  assert.equal(plain.status, 415);
  const resync = await send(server, { resync: "maybe", body: { rooms: "user_4", event: "e" } });
  assert.equal(resync.status, 400);
  assert.match(resync.text, /resync/);
});

test("bodies over the size limit get 413", async () => {
  const big = "x".repeat(1024 * 1024 + 10);
  const res = await send(server, { body: { rooms: "user_4", event: "e", args: [big] } });
  assert.equal(res.status, 413);
  assert.match(res.text, /max_body_bytes/);
});

for (const version of VERSIONS) {
  test(`${version}: form-urlencoded bodies with bracket syntax are delivered like JSON`, async () => {
    const c = await ready(version, server, { token: "t-dave", deviceId: `${version}-form` });
    const res = await send(server, { body: "rooms[]=user_4&event=form_event&args[0][id]=1&args[0][tags][]=a&args[1]=two" });
    assert.deepEqual(res, { status: 200, text: "OK" });
    const got = await c.waitFor("form_event");
    assert.deepEqual(argsOf(got), [{ id: "1", tags: ["a"] }, "two"]);
    ackOf(got)();
    c.close();
  });
}

test("outside reliable mode messages are broadcast to the room and nothing is stored", async () => {
  const plain = await startServer(oldEnv(website, { USER_ROOM_PREFIX: "" }));
  try {
    for (const version of VERSIONS) {
      const c = await ready(version, plain, { token: "t-dave", deviceId: "x" });
      const res = await send(plain, { body: { rooms: ["team"], event: "hello", args: [1, 2] } });
      assert.deepEqual(res, { status: 200, text: "OK" });
      const got = await c.waitFor("hello");
      assert.deepEqual(argsOf(got), [1, 2]);
      assert.equal(ackOf(got), null, "no ack requested outside reliable mode");
      c.close();
    }
    // Sent while nobody listens: not stored, so a new connection gets no _batch before a live marker.
    await send(plain, { body: { rooms: ["team"], event: "lost", args: [] } });
    const c = await ready("v4", plain, { token: "t-dave", deviceId: "x" });
    await send(plain, { body: { rooms: ["team"], event: "marker", args: [] } });
    await c.waitFor("marker");
    assert.deepEqual(c.events.map((e) => e[0]), ["_settings", "marker"]);
    c.close();
  } finally {
    await plain.cleanup();
  }
});
