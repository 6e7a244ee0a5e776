// Proof that 200 means on disk. kill -9 cannot see a missing fsync (the page cache survives it),
// so this traces the real process with strace and checks, for every `200` answered to
// `POST /send`, that an fdatasync/fsync of the store's write-ahead log started after the request
// was read and finished before the answer was written. At checkpoints sled's own files are
// synced, including large messages, which sled stores as separate blob files.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { BIN, startWebsite, startServer, oldEnv, ready, send, disconnected, within } from "./helpers.mjs";

let website, dir;

before(async () => {
  website = await startWebsite();
  website.tokens.set("t-disk", ["user_1"]);
  dir = mkdtempSync(path.join(tmpdir(), "sio-push-fsync-"));
});
after(async () => {
  await website?.close();
  if (!process.env.KEEP_TRACE) rmSync(dir, { recursive: true, force: true });
});

/** Parses `strace -f -ttt -T -y` output into completed syscalls. */
function parse(text) {
  const calls = [];
  const pending = new Map(); // pid -> {name, start, args}
  for (const line of text.split("\n")) {
    const m = line.match(/^(\d+)\s+(\d+\.\d+)\s+(.*)$/);
    if (!m) continue;
    const [, pid, time, rest] = m;
    const t = Number(time);
    const resumed = rest.match(/^<\.\.\. (\w+) resumed>(.*)<(\d+\.\d+)>$/);
    if (resumed) {
      const p = pending.get(pid);
      if (p) calls.push({ ...p, args: p.args + resumed[2], end: p.start + Number(resumed[3]) });
      pending.delete(pid);
      continue;
    }
    const call = rest.match(/^(\w+)\((.*)$/);
    if (!call) continue;
    if (rest.endsWith("<unfinished ...>")) {
      pending.set(pid, { name: call[1], start: t, args: call[2] });
      continue;
    }
    const dur = rest.match(/<(\d+\.\d+)>$/);
    calls.push({ name: call[1], start: t, args: call[2], end: t + (dur ? Number(dur[1]) : 0) });
  }
  return calls;
}

test("every 200 from POST /send follows a sync of the store that covers the request", async (t) => {
  const dataDir = path.join(dir, "data");
  const trace = path.join(dir, "trace.txt");
  const env = { ...oldEnv(website), PORT: "0", SIO_PUSH_DATA_DIR: dataDir };
  const strace = ["strace", "-f", "-ttt", "-T", "-y", "-s", "40", "-o", trace,
    "-e", "trace=fsync,fdatasync,sync_file_range,read,recvfrom,write,writev,sendto,sendmsg", BIN, "serve"];
  const server = await startServer(env, { command: strace });
  const serverPid = () => Number(execFileSync("pgrep", ["-P", String(server.child.pid)], { encoding: "utf8" }).trim().split("\n")[0]);
  t.after(() => { try { process.kill(serverPid(), "SIGKILL"); } catch {} });

  (await ready("v4", server, { token: "t-disk", deviceId: "d" })).close();
  await disconnected(server, "d");
  let ok = 0;
  const big = "x".repeat(300 * 1024); // over sled's inline limit: stored as a blob file
  const bodies = [
    ...Array.from({ length: 120 }, (_, i) => ({ rooms: "user_1", event: "small", args: [i] })),
    ...Array.from({ length: 3 }, (_, i) => ({ rooms: "user_1", event: "big", args: [i, big] })),
  ];
  let next = 0;
  await Promise.all(Array.from({ length: 8 }, async () => {
    while (next < bodies.length) {
      const res = await send(server, { body: bodies[next++] });
      assert.equal(res.status, 200, res.text);
      ok++;
    }
  }));
  // Stop the traced server; strace then exits and its trace is complete.
  process.kill(serverPid(), "SIGTERM");
  await within(server.exited, "the traced server to stop", 20000);

  const calls = parse(readFileSync(trace, "utf8"));
  const fdOf = (c) => (c.args.match(/^(\d+<[^>]*>+)/) || [])[1];
  const isTcp = (c) => /^\d+<(socket:\[|TCP)/.test(c.args);
  const syncs = calls.filter((c) => /^(fsync|fdatasync)$/.test(c.name) && /\/sio-push\.wal(\.2)?>/.test(c.args));
  const blobSyncs = calls.filter((c) => /^(fsync|fdatasync)$/.test(c.name) && /\/blobs\/\d+>/.test(c.args));
  const reads = calls.filter((c) => /^(read|recvfrom)$/.test(c.name) && isTcp(c) && !/= -1/.test(c.args));
  const answers = calls.filter((c) => /^(write|writev|sendto|sendmsg)$/.test(c.name) && isTcp(c) && c.args.includes("HTTP/1.1 200 OK"));

  let checked = 0;
  const uncovered = [];
  for (const answer of answers) {
    const fd = fdOf(answer);
    // The request this answers: the reads on the same connection since the previous answer.
    const previous = answers.filter((a) => fdOf(a) === fd && a.start < answer.start).map((a) => a.start);
    const since = previous.length ? Math.max(...previous) : 0;
    const requestReads = reads.filter((r) => fdOf(r) === fd && r.start > since && r.start < answer.start);
    if (!requestReads.some((r) => r.args.includes("POST /send"))) continue; // not a /send answer
    const readDone = Math.max(...requestReads.map((r) => r.end));
    checked++;
    if (!syncs.some((s) => s.start >= readDone && s.end <= answer.start)) uncovered.push(answer.start);
  }
  console.log(`fsync proof: ${checked} answers checked, ${uncovered.length} uncovered, ${syncs.length} log syncs, ${blobSyncs.length} blob syncs`);
  assert.equal(checked, ok, "every 200 answered to /send was found in the trace");
  assert.deepEqual(uncovered, [], "every 200 was preceded by a sync that started after its request");
  assert.ok(syncs.length < ok, `syncs are shared across concurrent requests (${syncs.length} for ${ok})`);
  assert.ok(blobSyncs.length >= 1, "large messages stored as blob files were synced at a checkpoint");
});
