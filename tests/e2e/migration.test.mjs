// A site switched from the old service keeps working with the defaults: configured only by the
// old environment variables, nothing it did before is refused now.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startWebsite, startServer, oldEnv, ready, busyWebsite, ackOf, until } from "./helpers.mjs";

let website, server;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t1", ["user_1"]);
  server = await startServer(oldEnv(website));
});
after(async () => {
  await server?.cleanup();
  await website?.close();
});

test("20,000 messages sent 50 at a time are all accepted (no rate limit unless configured) and delivered", async () => {
  const c = await ready("v4", server, { token: "t1", deviceId: "busy" });
  let received = 0;
  c.listeners.push((args) => {
    if (args[0] === "burst") received++;
    ackOf(args)?.();
  });
  const MESSAGES = 20000;
  const IN_FLIGHT = 50;
  const statuses = new Map();
  let next = 0;
  const backend = busyWebsite(server, { connections: IN_FLIGHT });
  const started = Date.now();
  await Promise.all(
    Array.from({ length: IN_FLIGHT }, async () => {
      while (next < MESSAGES) {
        const status = await backend.post({ rooms: "user_1", event: "burst", args: [next++] });
        statuses.set(status, (statuses.get(status) ?? 0) + 1);
      }
    }),
  );
  const rate = Math.round(MESSAGES / ((Date.now() - started) / 1000));
  backend.close();
  assert.deepEqual([...statuses], [[200, MESSAGES]], `every request answered 200 (at ${rate} requests/s)`);
  await until(c, () => received === MESSAGES, `all ${MESSAGES} messages at the client`, 30000);
  c.close();
});
