// Crash test: under a sustained /send load, with connected and offline devices, kill -9 the
// server at random moments, restart it, and check that every message answered 200 reaches each
// of its devices at least once, and that nothing arrives that was never sent. Bounded: a fixed
// number of rounds, each a fixed load for a random fraction of a second.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { startWebsite, startServer, oldEnv, ready, send, ackOf } from "./helpers.mjs";

const USERS = 12; // user_0..11, one device each; even users stay connected, odd ones offline
const ROUNDS = 4;
const SENDERS = 16;
let website;

before(async () => {
  website = await startWebsite();
  for (let u = 0; u < USERS; u++) website.tokens.set(`t${u}`, [`user_${u}`, "crowd"]);
});
after(() => website?.close());

/** Records what a device receives, live or in a _batch, and acks it. */
function receiver(c, received) {
  const take = (id) => received.set(id, (received.get(id) ?? 0) + 1);
  const handle = (args) => {
    if (args[0] === "_batch") args[1].filter((entry) => entry[0] === "msg").forEach((entry) => take(entry[1]));
    else if (args[0] === "msg") take(args[1]);
    ackOf(args)?.();
  };
  c.events.forEach(handle);
  c.events.push = (args) => (handle(args), Array.prototype.push.call(c.events, args));
}

test("kill -9 at random moments under load loses no message answered 200", async () => {
  const dataDir = mkdtempSync(path.join(tmpdir(), "sio-push-crash-"));
  const attempted = new Map(); // id -> users it was sent to
  const answered = new Set(); // ids answered 200
  const received = Array.from({ length: USERS }, () => new Map()); // per user's device: id -> count
  let next = 0;
  const report = { rounds: ROUNDS, attempted: 0, answered: 0, lost: 0, duplicates: 0, unknown: 0 };
  try {
    for (let round = 0; round <= ROUNDS; round++) {
      const server = await startServer(oldEnv(website, { DEVICE_TTL: "0" }), { dataDir });
      const clients = [];
      for (let u = 0; u < USERS; u++) {
        // Round 0 registers every device; later rounds keep odd users offline until the end.
        if (round > 0 && round < ROUNDS && u % 2 === 1) continue;
        const c = await ready(u % 4 === 0 ? "v2" : "v4", server, { token: `t${u}`, deviceId: "dev" });
        receiver(c, received[u]);
        clients.push(c);
      }
      if (round === 0) {
        clients.filter((_, i) => i % 2 === 1).forEach((c) => c.close());
      }
      if (round === ROUNDS) {
        // Final round: everything answered 200 must now be delivered; wait for each device's
        // batch (if it has one) by sending a marker to everyone and waiting for it.
        const marker = `marker`;
        assert.equal((await send(server, { body: { rooms: ["crowd"], event: "done", args: [marker] } })).status, 200);
        await Promise.all(clients.map((c) => c.waitFor("done")));
        clients.forEach((c) => c.close());
        await server.cleanup();
        break;
      }
      // Load: SENDERS loops, each posting to one user or to the shared room, until the kill.
      let killed = false;
      const loops = Array.from({ length: SENDERS }, async () => {
        while (!killed) {
          const id = next++;
          const shared = id % 5 === 0;
          const users = shared ? [...Array(USERS).keys()] : [id % USERS];
          attempted.set(id, users);
          const rooms = shared ? ["crowd"] : [`user_${id % USERS}`];
          try {
            const res = await send(server, { body: { rooms, event: "msg", args: [id] } });
            if (res.status === 200) answered.add(id);
          } catch {
            // The connection died with the server: not answered.
          }
        }
      });
      await new Promise((r) => setTimeout(r, 150 + Math.floor(Math.random() * 600)));
      await server.kill();
      killed = true;
      await Promise.all(loops);
      clients.forEach((c) => c.close());
    }
    for (const id of answered) {
      for (const u of attempted.get(id)) {
        if (!received[u].has(id)) report.lost++;
      }
    }
    for (let u = 0; u < USERS; u++) {
      for (const [id, count] of received[u]) {
        if (!attempted.get(id)?.includes(u)) report.unknown++;
        report.duplicates += count - 1;
      }
    }
    report.attempted = attempted.size;
    report.answered = answered.size;
    console.log(`crash test: ${JSON.stringify(report)}`);
    assert.ok(report.answered > 100, `enough load to mean something (${report.answered} answered)`);
    assert.equal(report.lost, 0, "every message answered 200 reached each of its devices");
    assert.equal(report.unknown, 0, "nothing arrived that was not sent");
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
  }
});
