// Order at the edges between tasks: acks recorded in the order clients sent them, a reconnect
// that sees `_settings`, then `_batch`, then live messages (each message once), a `_resync`
// that survives its socket, a disconnect that cannot land after the next connect, and a `/send`
// whose website hung up. Every case is a race, so each runs many times, with socket.io-client
// 2.x and 4.x, over websocket and long-polling, with many devices at once. Every wait is bounded.
import { test, before, after, describe } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import {
  COMBOS, startWebsite, startServer, oldEnv, client, ready, send, ackOf, argsOf, until, within,
} from "./helpers.mjs";

const DEVICES = 8; // clients at once in each case
const ADMIN_TOKEN = "order-admin-token-0123";
let website, server;

before(async () => {
  website = await startWebsite();
  for (let u = 0; u < DEVICES; u++) website.tokens.set(`t${u}`, [`user_${u}`]);
  server = await startServer(oldEnv(website, {
    SIO_PUSH_ADMIN__LISTEN: "127.0.0.1:0",
    SIO_PUSH_ADMIN__TOKEN: ADMIN_TOKEN,
  }));
});
after(async () => {
  await server?.cleanup();
  await website?.close();
});

const users = () => Array.from({ length: DEVICES }, (_, u) => `user_${u}`);

/** Connects one client per user, each with its own device id; `opts` picks the transports. */
async function clients({ version, transports }, tag) {
  return Promise.all(
    users().map((_, u) => ready(version, server, { token: `t${u}`, deviceId: `${tag}-${u}`, transports })),
  );
}

/** POST /send to every user; fails the test on anything but 200. */
async function sendAll(event, args, resync = true) {
  const res = await send(server, { resync, body: { rooms: users(), event, args } });
  assert.equal(res.status, 200, res.text);
}

/** The events named `name` a client got. */
const named = (c, name) => c.events.filter((e) => e[0] === name);

/** The device's registry entry, from the admin API. */
async function deviceState(user, device) {
  const res = await fetch(`${server.adminUrl}/api/sites/shop/rooms/${user}/devices`, {
    headers: { Authorization: `Bearer ${ADMIN_TOKEN}` },
  });
  assert.equal(res.status, 200);
  return (await res.json()).find((d) => d.device === device);
}

/** Waits until the server log has `count` lines matching `pattern`. */
async function logged(pattern, count, what) {
  const seen = () => (server.log.match(new RegExp(pattern, "g")) ?? []).length;
  if (seen() >= count) return seen();
  await within(
    new Promise((resolve) => {
      const check = () => seen() >= count && (server.child.stderr.off("data", check), resolve());
      server.child.stderr.on("data", check);
    }),
    what,
  );
  return seen();
}

for (const combo of COMBOS) {
  const name = `${combo.version} over ${combo.transports[0]}`;
  describe(name, () => {
    test("two resync messages acked in order never give _resync, round after round", async () => {
      const tag = `inorder-${combo.version}-${combo.transports[0]}`;
      const all = await clients(combo, tag);
      // Ack everything as it arrives: the acks of one device leave in send order.
      for (const c of all) c.listeners.push((args) => ackOf(args)?.());
      const ROUNDS = 25;
      for (let r = 0; r < ROUNDS; r++) {
        await sendAll("upd", [`${r}-a`]);
        await sendAll("upd", [`${r}-b`]);
      }
      await Promise.all(all.map((c) => until(c, () => named(c, "upd").length === 2 * ROUNDS, `${2 * ROUNDS} upd`)));
      // Every ack recorded: the queues are empty. A _resync would have been sent by then; a
      // last message, sent after it, arrives after it.
      for (let u = 0; u < DEVICES; u++) await within(emptyQueue(`user_${u}`, `${tag}-${u}`), "the queue to empty");
      await sendAll("fence", [tag], false);
      await Promise.all(all.map((c) => c.waitFor("fence")));
      for (const [u, c] of all.entries()) {
        assert.deepEqual(named(c, "_resync"), [], `${tag}-${u} got _resync although it acked in order`);
        const sent = Array.from({ length: ROUNDS }, (_, r) => [`${r}-a`, `${r}-b`]).flat();
        assert.deepEqual(named(c, "upd").map((e) => argsOf(e)[0]), sent, "every message, once, in order");
      }
      all.forEach((c) => c.close());
    });

    test("a resync message acked out of order gives exactly one _resync and clears the event", async () => {
      const tag = `outoforder-${combo.version}-${combo.transports[0]}`;
      const all = await clients(combo, tag);
      // Hold the ack of the first of each pair; ack the second, then the first.
      for (const c of all) {
        let held = null;
        c.listeners.push((args) => {
          if (args[0] !== "upd") return;
          if (argsOf(args)[0].endsWith("-a")) held = ackOf(args);
          else (ackOf(args)(), held?.(), (held = null));
        });
      }
      const ROUNDS = 13;
      for (let r = 1; r <= ROUNDS; r++) {
        await sendAll("upd", [`${r}-a`]);
        await sendAll("upd", [`${r}-b`]);
        await Promise.all(all.map((c) => until(c, () => named(c, "_resync").length >= r, `_resync ${r}`)));
      }
      await logged(`_resync sent[^\\n]*device=${tag}-`, ROUNDS * DEVICES, "the resyncs recorded as sent");
      const before = server.log.length;
      for (const [u, c] of all.entries()) {
        assert.equal(named(c, "_resync").length, ROUNDS, `${tag}-${u}: one _resync per pair`);
        assert.deepEqual(argsOf(named(c, "_resync")[0]), [], "_resync has no arguments");
        const state = await deviceState(`user_${u}`, `${tag}-${u}`);
        assert.equal(state.queue_len, 0, "the event's queue was cleared");
        assert.equal(state.resync_at, undefined, "delivered live: nothing owed");
      }
      all.forEach((c) => c.close());
      // Not owed: reconnecting gets no second _resync.
      const again = await ready(combo.version, server, { token: "t0", deviceId: `${tag}-0`, transports: combo.transports });
      await sendAll("fence", [tag], false);
      await again.waitFor("fence");
      assert.deepEqual(named(again, "_resync"), []);
      again.close();
      assert.ok(!/ack out of order/.test(server.log.slice(before)), "no resync after the pairs");
    });

    test("a client that acks out of order and leaves at once gets its _resync when it comes back", async () => {
      const tag = `leaver-${combo.version}-${combo.transports[0]}`;
      const ROUNDS = 13;
      for (let r = 0; r < ROUNDS; r++) {
        const all = await clients(combo, `${tag}-${r}`);
        for (const c of all) {
          c.listeners.push((args) => {
            if (args[0] === "upd" && argsOf(args)[0] === "b") {
              ackOf(args)(); // the second first: out of order
              c.close(); // and gone at once, like a reload
            }
          });
        }
        await sendAll("upd", ["a"]);
        await sendAll("upd", ["b"]);
        await Promise.all(all.map((c) => until(c, () => !c.socket.connected, "the client to leave")));
        await logged(`_resync (sent|owed)[^\\n]*device=${tag}-${r}-`, DEVICES, "the resyncs sent or owed");
        const back = await Promise.all(
          all.map((_, u) => ready(combo.version, server, { token: `t${u}`, deviceId: `${tag}-${r}-${u}`, transports: combo.transports })),
        );
        // Whatever the connect sends comes before a message sent after it.
        await sendAll("fence", [r], false);
        await Promise.all(back.map((c) => c.waitFor("fence")));
        for (const [u, c] of back.entries()) {
          // Either the first socket got it before it left, or the next connect does: once.
          const total = named(all[u], "_resync").length + named(c, "_resync").length;
          assert.equal(total, 1, `${tag}-${r}-${u}: exactly one _resync`);
          assert.deepEqual(named(c, "_batch"), [], "the event's queue was cleared");
          if (named(c, "_resync").length) {
            assert.equal(c.events.findIndex((e) => e[0] === "_resync"), 1, "_resync right after _settings");
          }
          c.close();
        }
      }
    });

    test("reconnects under a steady stream: _settings, then one _batch, then live, each message once", async () => {
      const tag = `stream-${combo.version}-${combo.transports[0]}`;
      const user = "user_0";
      // Registered first: from here on every message to the user is queued for the device.
      (await ready(combo.version, server, { token: "t0", deviceId: tag, transports: combo.transports })).close();
      let sending = true;
      let next = 0;
      const answered = new Set();
      const sender = (async () => {
        while (sending) {
          const id = next++;
          const res = await send(server, { resync: true, body: { rooms: [user], event: "tick", args: [id] } });
          if (res.status === 200) answered.add(id);
        }
      })();
      const received = new Set();
      const RECONNECTS = 50;
      try {
        for (let i = 0; i <= RECONNECTS; i++) {
          const c = client(combo.version, server, { token: "t0", deviceId: tag, transports: combo.transports });
          c.listeners.push((args) => {
            if (args[0] === "_batch") args[1].forEach((entry) => received.add(entry[1]));
            if (args[0] === "tick") received.add(args[1]);
            ackOf(args)?.();
          });
          await c.connected;
          await c.waitFor("_settings");
          // Stay for a few live messages (or a short while), then leave without waiting.
          const seen = received.size;
          await Promise.race([until(c, () => received.size >= seen + 3, "live ticks"), new Promise((r) => setTimeout(r, 50 + 10 * (i % 5)))]).catch(() => {});
          c.close();
          const names = c.events.map((e) => e[0]);
          assert.equal(names[0], "_settings", `connection ${i}: _settings first, got ${names.slice(0, 3)}`);
          assert.ok(!names.includes("_resync"), `connection ${i}: no _resync when every ack is in order`);
          const batches = names.filter((n) => n === "_batch").length;
          assert.ok(batches <= 1, `connection ${i}: at most one _batch`);
          if (batches) assert.equal(names[1], "_batch", `connection ${i}: _batch right after _settings`);
          const inBatch = new Set(c.events.filter((e) => e[0] === "_batch").flatMap((e) => e[1].map((entry) => entry[1])));
          const live = c.events.filter((e) => e[0] === "tick").map((e) => e[1]);
          assert.deepEqual(live.filter((id) => inBatch.has(id)), [], `connection ${i}: no message both in _batch and live`);
          assert.deepEqual(live, [...live].sort((a, b) => a - b), `connection ${i}: live messages in send order`);
        }
      } finally {
        sending = false;
        await sender;
      }
      // Whatever is left comes in the last _batch (over polling it may come in a later poll
      // than _settings: wait for it while anything answered 200 is still missing).
      const last = await ready(combo.version, server, { token: "t0", deviceId: tag, transports: combo.transports });
      if ([...answered].some((id) => !received.has(id))) {
        const batch = await last.waitFor("_batch");
        batch[1].forEach((entry) => received.add(entry[1]));
        ackOf(batch)?.();
      }
      last.close();
      const missing = [...answered].filter((id) => !received.has(id));
      assert.deepEqual(missing, [], "every message answered 200 arrived");
      assert.ok(answered.size > RECONNECTS, `a steady stream (${answered.size} messages)`);
    });

    test("a device that leaves and comes back at once is recorded connected", async () => {
      const tag = `flap-${combo.version}-${combo.transports[0]}`;
      const FLAPS = 25;
      let sockets = await clients(combo, tag);
      const closed = () => (server.log.match(new RegExp(`(device disconnected|socket left)[^\\n]*device=${tag}-`, "g")) ?? []).length;
      const before = closed();
      for (let i = 0; i < FLAPS; i++) {
        // Close, and open the next one without waiting: the disconnect and the connect race.
        sockets = await Promise.all(
          sockets.map((c, u) => {
            c.close();
            return ready(combo.version, server, { token: `t${u}`, deviceId: `${tag}-${u}`, transports: combo.transports });
          }),
        );
      }
      await logged(`(device disconnected|socket left)[^\\n]*device=${tag}-`, before + FLAPS * DEVICES, "every disconnect");
      for (let u = 0; u < DEVICES; u++) {
        const state = await deviceState(`user_${u}`, `${tag}-${u}`);
        assert.equal(state.connected, true, `${tag}-${u} is connected, so it must be recorded connected`);
      }
      sockets.forEach((c) => c.close());
    });
  });
}

test("a /send whose website hangs up after sending is still delivered live", async () => {
  const c = await ready("v4", server, { token: "t0", deviceId: "hangup" });
  const live = new Set();
  c.listeners.push((args) => {
    if (args[0] === "hung") live.add(args[1]);
    ackOf(args)?.();
  });
  const ATTEMPTS = 200;
  for (let i = 0; i < ATTEMPTS; i++) {
    const body = JSON.stringify({ rooms: ["user_0"], event: "hung", args: [i] });
    const request =
      `POST /send?site=shop&apiKey=secret-key HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
    await new Promise((resolve) => {
      const socket = net.connect(server.port, "127.0.0.1", () => {
        socket.write(request);
        // Gone a moment later: before the answer, and at times while the message is stored.
        setTimeout(() => (socket.destroy(), resolve()), i % 4);
      });
      socket.on("error", resolve);
    });
  }
  // The server finishes, in tasks of their own, the requests whose callers hung up: wait until
  // no more messages get stored (quiet for 300 ms, at most 5 s), so that none is stored after
  // the fence below (on two nodes the fence's node does not wait for the other's writes).
  const stored = () => (server.log.match(/message stored/g) ?? []).length;
  for (let last = -1, quiet = 0, polls = 0; quiet < 3 && polls < 50; polls++) {
    await new Promise((r) => setTimeout(r, 100));
    quiet = stored() === last ? quiet + 1 : 0;
    last = stored();
  }
  // Everything stored was emitted live, and acked: after a last ordinary message, nothing of the
  // hung-up requests is left for the next connection's _batch.
  await send(server, { body: { rooms: ["user_0"], event: "hung", args: ["fence"] } });
  await c.waitFor("hung", (a) => a[1] === "fence");
  c.close();
  const next = await ready("v4", server, { token: "t0", deviceId: "hangup" });
  const batch = named(next, "_batch")[0]?.[1] ?? [];
  const notLive = batch.map((entry) => entry[1]).filter((i) => !live.has(i));
  next.close();
  assert.deepEqual(notLive, [], "stored messages that were never emitted live");
  assert.ok(live.size > 10, `some requests got through before the hang-up (${live.size})`);
});

/** Polls the admin API until the device's queue is empty (acks are recorded asynchronously). */
async function emptyQueue(user, device) {
  for (;;) {
    const state = await deviceState(user, device);
    if (state.queue_len === 0) return state;
    await new Promise((r) => setTimeout(r, 20));
  }
}
