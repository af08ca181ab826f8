// The stream load client in Node: `_wsload.py --mode stream` for runs of many events per second.
//
//   node load.js --mode stream --url ws://... [--count N] [--concurrency C] [--deadline S]
//
// Why it exists: the Python load client costs about 6 us of CPU per received event, so a
// catch-up run (clients reading a stored run as fast as the server sends it) would measure the
// client at ~150k events/s, not the server. This one spends ~1.3 us an event, ~1 us of it in
// `ws` itself (no permessage-deflate, no UTF-8 validation: the Python client does neither).
//
// It does what `_wsload.py --mode stream` does per connection and prints the same lines (it takes
// the options bench_catchup.py passes, not --per-run, --uuid-base, --deflate or --lat-out):
// `READY ok failed open_seconds` once every connection has its first frame, then one JSON line
// when each got run_complete (or a close) or the deadline passed. Per text frame: the first one
// (hello, ready) marks the stream as set up; a frame without `"seq":` is not an event; a seq
// that does not follow the previous one counts as out of order; run_start events are not counted
// (stored before the clients joined); run_complete ends the connection's count. Times are
// wall-clock epoch nanoseconds, comparable with Python's time.time_ns(); cpu_s is this
// process's CPU while the events flow.
"use strict";
const { performance } = require("perf_hooks");
const WebSocket = require("ws");

const SEQ = Buffer.from('"seq":'); // found by its "q"
const TYPE = Buffer.from('"type":"'); // found by its "y"
const START = Buffer.from('run_start"');
const FINAL = Buffer.from('run_complete"');

// Whether `needle` is in `data` at `at`.
function isAt(data, needle, at) {
  if (at < 0 || at + needle.length > data.length) return false;
  for (let j = 0; j < needle.length; j++) if (data[at + j] !== needle[j]) return false;
  return true;
}

// Where `needle` first is in `data`, or -1. A plain loop that looks for the needle's byte at
// `anchor` (one rarer than its leading quote): the keys sought sit in a frame's first hundred
// bytes, and a Buffer#indexOf call costs ~0.4 us (most of this client's CPU at three a frame).
function find(data, needle, anchor) {
  const byte = needle[anchor];
  for (let at = anchor, end = data.length - needle.length + anchor; at <= end; at++) {
    if (data[at] === byte && isAt(data, needle, at - anchor)) return at - anchor;
  }
  return -1;
}

function parseArgs(argv) {
  const args = { mode: "", url: "", count: 1, concurrency: 100, deadline: 60 };
  const numbers = new Set(["count", "concurrency", "deadline"]);
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "");
    if (!(name in args) || i + 1 >= argv.length) {
      console.error(`load.js: unsupported argument ${argv[i]}`);
      process.exit(2);
    }
    args[name] = numbers.has(name) ? Number(argv[i + 1]) : argv[i + 1];
  }
  if (args.mode !== "stream" || !args.url) {
    console.error("load.js: only --mode stream, and --url is required");
    process.exit(2);
  }
  return args;
}

// Epoch nanoseconds from the monotonic clock (performance.now() is cheap enough per frame);
// a double that large keeps them to ~0.3 us, plenty for runs of seconds.
const epochNs = (ms) => Math.round((performance.timeOrigin + ms) * 1e6);

// One connection; resolves once its first frame arrived (rejects if it never does).
function openClient(url, timeoutMs) {
  const client = {
    frames: 0,
    events: 0,
    lastSeq: 0,
    outOfOrder: 0,
    closeCode: null,
    closeReason: "",
    firstMs: 0,
    lastMs: 0,
    finished: false,
    closedByUs: false,
    ws: null,
  };
  client.closed = new Promise((resolveClosed) => {
    client.onClosed = resolveClosed;
  });
  client.done = new Promise((resolveDone) => {
    client.finish = () => {
      client.finished = true;
      resolveDone();
    };
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error("no first frame in time"));
    }, timeoutMs);
    const ws = new WebSocket(url, { perMessageDeflate: false, skipUTF8Validation: true });
    client.ws = ws;
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      const now = performance.now();
      client.frames += 1;
      client.lastMs = now;
      if (client.frames === 1) {
        client.firstMs = now;
        clearTimeout(timer);
        resolve(client);
      }
      let at = find(data, SEQ, 3);
      if (at < 0) return; // a control frame (hello, ready): not an event
      let seq = 0;
      for (at += SEQ.length; data[at] >= 48 && data[at] <= 57; at++) seq = seq * 10 + data[at] - 48;
      if (seq !== client.lastSeq + 1 && client.lastSeq) client.outOfOrder += 1;
      client.lastSeq = seq;
      // The event's type: its first "type" key (before the payload, which may hold others).
      const key = find(data, TYPE, 2);
      const type = key < 0 ? -1 : key + TYPE.length;
      if (isAt(data, START, type)) return; // stored before the clients joined: not measured
      client.events += 1;
      if (!client.finished && isAt(data, FINAL, type)) client.finish();
    });
    ws.on("close", (code, reason) => {
      // 1006: the connection ended without a close frame (the Python client reports None);
      // a close this client started at the deadline is not the server's either.
      if (!client.closedByUs) {
        client.closeCode = code === 1006 ? null : code;
        client.closeReason = reason.toString();
      }
      clearTimeout(timer);
      reject(new Error(`connection closed before first frame: ${code}`));
      if (!client.finished) client.finish();
      client.onClosed();
    });
    ws.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

// Up to `concurrency` connections at a time: the first alone, then the rest (as _wsload.py).
async function openMany(args) {
  const clients = [];
  const failures = [];
  const one = (index) =>
    openClient(args.url, 60_000).then(
      (client) => clients.push(client),
      (error) => failures.push(String(error.message || error).slice(0, 160)),
    );
  const started = performance.now();
  if (args.count > 0) await one(0);
  let next = 1;
  const worker = async () => {
    while (next < args.count) await one(next++);
  };
  await Promise.all(Array.from({ length: Math.min(args.concurrency, args.count) }, worker));
  return { clients, failures, opened: (performance.now() - started) / 1000 };
}

// `promise`, or nothing after `ms` milliseconds.
function within(promise, ms) {
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { clients, failures, opened } = await openMany(args);
  console.log(`READY ${clients.length} ${failures.length} ${opened.toFixed(3)}`);
  const cpu = process.cpuUsage(); // the load client's own CPU while the events flow
  const remaining = Math.max(1, args.deadline - opened) * 1000;
  await within(Promise.all(clients.map((c) => c.done)), remaining);
  const used = process.cpuUsage(cpu);
  const finished = clients.filter((c) => c.finished).length;
  // The server closes a finished stream: its close code, if it comes within a second.
  for (const client of clients) {
    if (!client.finished) {
      client.closedByUs = true;
      client.ws.close(1000);
    }
  }
  await within(Promise.all(clients.map((c) => c.closed)), 1000);
  for (const client of clients) client.ws.terminate();
  const codes = {};
  const reasons = {}; // one reason per close code
  for (const client of clients) {
    const key = String(client.closeCode === null ? "None" : client.closeCode);
    codes[key] = (codes[key] || 0) + 1;
    if (!(key in reasons)) reasons[key] = client.closeReason;
  }
  const firsts = clients.filter((c) => c.firstMs).map((c) => c.firstMs);
  const lastMs = clients.reduce((last, c) => Math.max(last, c.lastMs), 0);
  const report = {
    clients: clients.length,
    failures: failures.length,
    failure_sample: failures.slice(0, 3),
    finished,
    unfinished: clients.length - finished,
    delivered: clients.reduce((sum, c) => sum + c.events, 0),
    out_of_order: clients.reduce((sum, c) => sum + c.outOfOrder, 0),
    first_recv_ns: firsts.length ? epochNs(firsts.reduce((a, b) => Math.min(a, b))) : 0,
    last_recv_ns: lastMs ? epochNs(lastMs) : 0,
    close_codes: codes,
    close_reasons: reasons,
    open_seconds: Number(opened.toFixed(3)),
    cpu_s: Number(((used.user + used.system) / 1e6).toFixed(3)),
  };
  console.log(JSON.stringify(report));
  process.exit(0);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
