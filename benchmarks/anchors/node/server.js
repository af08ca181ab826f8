// The fan-out server people write with Node: `ws` for WebSockets, `ioredis` for pub/sub.
//
//   node server.js PORT   (PREFECT_WS_BROADCAST_URL, PREFECT_WS_REDIS_PREFIX from the env)
//
// One Redis subscription per run (shared by the run's clients), every line of every message
// sent to every client of the run as one text frame, close 1000 after run_complete. No history,
// no ordering checks, no bounds: the same job as benchmarks/naive_server.py. A client first gets
// {"type":"ready"} once Redis confirmed the run's subscription, so a load client knows when to
// start counting.
"use strict";
const http = require("http");
const { WebSocketServer } = require("ws");
const Redis = require("ioredis");

const port = Number(process.argv[2]);
const url = process.env.PREFECT_WS_BROADCAST_URL || "redis://127.0.0.1:6379/0";
const prefix = process.env.PREFECT_WS_REDIS_PREFIX || "prefect-ws";
const FINAL = '{"v":1,"type":"run_complete"';
const PATH = /^\/api\/v2\/workflows\/runs\/([^/?]+)\/stream/;

const subscriber = new Redis(url);
const runs = new Map(); // pub/sub channel -> { clients: Set<WebSocket>, subscribed: Promise }

subscriber.on("message", (channel, message) => {
  const run = runs.get(channel);
  if (run === undefined) return;
  const lines = message.split("\n");
  const final = lines[lines.length - 1].startsWith(FINAL);
  for (const ws of run.clients) {
    for (const line of lines) ws.send(line);
    if (final) ws.close(1000, "run complete");
  }
});

const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
const wss = new WebSocketServer({ server, perMessageDeflate: false });
wss.on("connection", (ws, req) => {
  const match = PATH.exec(req.url);
  if (match === null) {
    ws.close(4400, "unknown path");
    return;
  }
  const channel = `${prefix}:{${match[1]}}`;
  let run = runs.get(channel);
  if (run === undefined) {
    run = { clients: new Set(), subscribed: subscriber.subscribe(channel) };
    runs.set(channel, run);
  }
  run.clients.add(ws);
  run.subscribed.then(() => {
    if (ws.readyState === ws.OPEN) ws.send('{"type":"ready"}');
  });
  ws.on("error", () => {});
  ws.on("close", () => {
    run.clients.delete(ws);
    if (run.clients.size === 0 && runs.get(channel) === run) {
      runs.delete(channel);
      subscriber.unsubscribe(channel);
    }
  });
});
server.listen(port, "127.0.0.1", 8192);
process.on("SIGTERM", () => process.exit(0));
// Exit with the benchmark that started us, however it ended.
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) process.exit(0);
}, 1000).unref();
