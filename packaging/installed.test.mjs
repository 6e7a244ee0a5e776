// Runs against the installed package (packaging/test-package.sh installs it first): the installed
// binary started exactly as the unit starts it (as sio-push, the installed config, the state dir
// as working directory), after a user's edit of /etc/sio-push/config.toml adds a site.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync, readdirSync, statSync } from "node:fs";
import { startWebsite, startServer, ready, send, ackOf, argsOf, disconnected } from "../tests/e2e/helpers.mjs";

const CONFIG = "/etc/sio-push/config.toml";
const STATE = "/var/lib/sio-push";
// ExecStart of packaging/sio-push.service, run as its User=/Group=.
const AS_UNIT = ["setpriv", "--reuid=sio-push", "--regid=sio-push", "--init-groups", "--"];
const EXEC_START = ["/usr/bin/sio-push", "serve", "--config", CONFIG];
const EXEC_START_PRE = ["/usr/bin/sio-push", "check-config", "--config", CONFIG];

let website;
let original;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-vm", ["user_1", "staff"]);
  // What a user does after installing: edit the one config file.
  original = readFileSync(CONFIG, "utf8");
  const edited = original.replace(/^listen = .*$/m, 'listen = "127.0.0.1:0"') +
    `\n[sites.shop]\nauth_url = "${website.url}/auth"\napi_key = "vm-key"\nuser_room_prefix = "user_"\n`;
  writeFileSync(CONFIG, edited);
});

after(async () => {
  if (original !== undefined) writeFileSync(CONFIG, original);
  await website?.close();
});

function startAsUnit() {
  return startServer({}, { command: [...AS_UNIT, ...EXEC_START], cwd: STATE });
}

test("ExecStartPre (check-config) accepts the edited config as the service user", () => {
  const out = execFileSync(AS_UNIT[0], [...AS_UNIT.slice(1), ...EXEC_START_PRE], { encoding: "utf8" });
  assert.match(out, /\[sites\.shop\]/);
  assert.match(out, /data_dir = "\/var\/lib\/sio-push"/);
  assert.doesNotMatch(out, /vm-key/);
});

test("the installed service answers /healthcheck, delivers live and keeps queues across a restart", async () => {
  let server = await startAsUnit();
  try {
    assert.equal(await (await fetch(`${server.url}/healthcheck`)).text(), "ok");
    const c = await ready("v4", server, { token: "t-vm", deviceId: "vm" });
    const res = await send(server, { apiKey: "vm-key", body: { rooms: ["staff"], event: "hello", args: ["from the VM"] } });
    assert.deepEqual(res, { status: 200, text: "OK" });
    const got = await c.waitFor("hello");
    assert.deepEqual(argsOf(got), ["from the VM"]);
    ackOf(got)();
    c.close();
    await disconnected(server, "vm");
    assert.equal((await send(server, { apiKey: "vm-key", body: { rooms: "user_1", event: "queued", args: [1] } })).status, 200);
    assert.deepEqual(await server.stop(), { code: 0, signal: null });

    server = await startAsUnit();
    const again = await ready("v2", server, { token: "t-vm", deviceId: "vm" });
    const batch = await again.waitFor("_batch");
    assert.deepEqual(batch[1], [["queued", 1]]);
    ackOf(batch)();
    again.close();
  } finally {
    await server.stop().catch(() => server.kill());
  }
  // The database lives in the state directory, owned by the service user.
  const files = readdirSync(STATE, { recursive: true });
  assert.ok(files.length > 0, "the store wrote into /var/lib/sio-push");
  const uid = Number(execFileSync("id", ["-u", "sio-push"], { encoding: "utf8" }));
  for (const f of files) assert.equal(statSync(`${STATE}/${f}`).uid, uid, f);
});
