// Scans the logs of a whole e2e run (SIO_PUSH_E2E_LOG_DIR) for secrets: every token the mock
// websites handed out and every API key and admin token the tests configured. Fails if any
// appears in any server log.
import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";

const dir = process.argv[2];
if (!dir) throw new Error("usage: node scan-logs.mjs <log dir>");
const files = readdirSync(dir);
const logs = files.filter((f) => f.endsWith("server.log")).map((f) => [f, readFileSync(path.join(dir, f), "utf8")]);
const tokens = new Set(files.filter((f) => f.endsWith("tokens.json")).flatMap((f) => JSON.parse(readFileSync(path.join(dir, f), "utf8"))));
// The keys the test files configure (API_KEY, api_key, admin token).
const keys = ["secret-key", "shop-key", "new-shop-key", "newer-key", "api-key-2", "api-key-3", "other-key", "third-key", "admin-token-0123456789"];
const secrets = [...tokens, ...keys].filter((s) => s.length >= 3);
const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
let passed = 0;
let failed = 0;
for (const secret of secrets) {
  // A whole word: "t-op" must not match inside "t-op2" or "set-options".
  const pattern = new RegExp(`(?<![\\w-])${escape(secret)}(?![\\w-])`);
  const hit = logs.find(([, text]) => pattern.test(text));
  if (hit) {
    failed++;
    const line = hit[1].split("\n").find((l) => pattern.test(l));
    console.log(`not ok - ${JSON.stringify(secret)} appears in ${hit[0]}: ${line}`);
  } else {
    passed++;
  }
}
if (logs.length < 10) {
  failed++;
  console.log(`not ok - only ${logs.length} server logs were kept: is SIO_PUSH_E2E_LOG_DIR set for the run?`);
}
console.log(`scanned ${logs.length} server logs (${logs.reduce((n, [, t]) => n + t.length, 0)} bytes) for ${secrets.length} secrets`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
