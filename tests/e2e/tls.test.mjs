// Optional TLS: with tls_cert_path and tls_key_path the one port serves https and wss, for both
// client generations and transports, and POST /send.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import https from "node:https";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { VERSIONS, startWebsite, startServer, oldEnv, ready, ackOf, argsOf, client } from "./helpers.mjs";

let website, dir, ca;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-tls", ["user_8"]);
  dir = mkdtempSync(path.join(tmpdir(), "sio-push-tls-"));
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
    "-keyout", path.join(dir, "key.pem"), "-out", path.join(dir, "cert.pem"),
    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
  ], { stdio: "ignore" });
  ca = readFileSync(path.join(dir, "cert.pem"));
});
after(async () => {
  await website?.close();
  rmSync(dir, { recursive: true, force: true });
});

/** POST /send over https, trusting the test's certificate. */
function sendTls(server, body) {
  return new Promise((resolve, reject) => {
    const req = https.request(`${server.url}/send?site=shop&apiKey=secret-key`, {
      method: "POST", ca, headers: { "Content-Type": "application/json" },
    }, (res) => {
      let text = "";
      res.on("data", (c) => (text += c));
      res.on("end", () => resolve({ status: res.statusCode, text }));
    });
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });
}

test("with a certificate, the port serves https and wss to both client generations", async () => {
  const server = await startServer(oldEnv(website, {
    SIO_PUSH_SERVER__TLS_CERT_PATH: path.join(dir, "cert.pem"),
    SIO_PUSH_SERVER__TLS_KEY_PATH: path.join(dir, "key.pem"),
  }));
  server.url = server.url.replace("http://", "https://");
  try {
    assert.match(server.log, /serving listen=[^\n]* tls=true/);
    for (const version of VERSIONS) {
      for (const transports of [["polling"], ["websocket"]]) {
        const c = await ready(version, server, { token: "t-tls", deviceId: `${version}-${transports[0]}`, transports, ca });
        const res = await sendTls(server, { rooms: "user_8", event: "secure", args: [version] });
        assert.deepEqual(res, { status: 200, text: "OK" });
        const got = await c.waitFor("secure", (a) => a[1] === version);
        assert.deepEqual(argsOf(got), [version]);
        ackOf(got)();
        c.close();
      }
    }
    // A client that does not trust the certificate cannot connect.
    const untrusting = client("v4", server, { token: "t-tls", transports: ["websocket"] });
    await assert.rejects(untrusting.connected);
    untrusting.close();
  } finally {
    await server.cleanup();
  }
});
