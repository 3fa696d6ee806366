// The benchmark's streaming load: N clients, each holding one server-sent-event stream at a time, with every event
// timestamped on arrival. wrk cannot time the chunks inside one answer; Node's http module holds thousands of
// streams in one process for a few percent of a core.
//
//   node bench/stream_load.js '<JSON plan>'
//
// The plan: {"port", "path", "body", "headers", "clients", "format": "genapi" | "openai", "seconds", "stagger_ms",
// "hold_seconds", "stream_timeout_seconds"}. Each client starts after a random 0..stagger_ms, so that streams do not
// arrive in lock-step, then opens one stream after another until `seconds` have passed since the start, waiting for
// each to end. With hold_seconds > 0 each client instead opens one stream and hangs up hold_seconds after its
// headers came, counting the heartbeats (SSE comments) it got; "ALL_OPEN" is printed once every stream has its
// headers. The last line is "BENCH <JSON>": streams complete (their final event arrived), cut (the connection ended
// before it), errors, time to first token (request sent to the first event carrying text) and the gaps between text
// events, in ms.
// It connects to 127.0.0.1 only, and every run is bounded: by `seconds` and each stream's timeout.
"use strict";
const http = require("http");

const plan = JSON.parse(process.argv[2]);
const host = "127.0.0.1";
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
const body = Buffer.from(plan.body);
const headers = Object.assign({ "Content-Type": "application/json", "Content-Length": body.length }, plan.headers || {});
const holdMs = (plan.hold_seconds || 0) * 1000;
const streamTimeoutMs = (plan.stream_timeout_seconds || 60) * 1000;
const started = now();

const result = {
  streams: 0, complete: 0, cut: 0, errors: 0, held: 0, statuses: {}, error_samples: [],
  text_events: 0, events: 0, heartbeats_min: null, heartbeats_max: null, heartbeats_total: 0,
};
const firstTokenMs = [];
const gapsMs = [];
const heartbeatCounts = [];
let opened = 0;
let running = plan.clients;

function now() {
  return Number(process.hrtime.bigint()) / 1e6;
}

function recordError(message) {
  result.errors += 1;
  if (result.error_samples.length < 5) result.error_samples.push(message);
}

// What one event means, in each of the two formats: genapi's (`event: delta | done | error`) and OpenAI's
// (`data: {chunk}`, a chunk with `"error"`, and `data: [DONE]`).
function classify(event) {
  if (plan.format === "genapi") {
    if (event.type === "delta") return "text";
    if (event.type === "done") return "final";
    if (event.type === "error") return "error";
    return "other";
  }
  if (event.data === "[DONE]") return "final";
  if (event.data === null) return "other";
  let chunk;
  try {
    chunk = JSON.parse(event.data);
  } catch (e) {
    return "error";
  }
  if (chunk.error) return "error";
  const choice = chunk.choices && chunk.choices[0];
  return choice && choice.delta && choice.delta.content ? "text" : "other";
}

function parseEvent(block) {
  // One SSE event: its lines; a block of comment lines only is a heartbeat.
  let type = "message";
  let data = null;
  let comments = 0;
  let fields = 0;
  for (const line of block.split("\n")) {
    if (line === "") continue;
    if (line[0] === ":") { comments += 1; continue; }
    fields += 1;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (name === "event") type = value;
    else if (name === "data") data = data === null ? value : data + "\n" + value;
  }
  return { type, data, heartbeat: fields === 0 && comments > 0 };
}

function oneStream(done) {
  result.streams += 1;
  const sent = now();
  let buffer = "";
  let lastText = null;
  let heartbeats = 0;
  let outcome = null; // complete | error | held
  let finished = false;
  let holdTimer = null;

  function finish(how, message) {
    if (finished) return;
    finished = true;
    clearTimeout(timer);
    clearTimeout(holdTimer);
    if (how === "error") recordError(message);
    else if (how === "cut") result.cut += 1;
    else result[how] += 1; // complete, held
    if (holdMs) heartbeatCounts.push(heartbeats);
    done();
  }

  const request = http.request({ host, port: plan.port, path: plan.path, method: "POST", headers, agent }, (response) => {
    result.statuses[response.statusCode] = (result.statuses[response.statusCode] || 0) + 1;
    if (holdMs) {
      opened += 1;
      if (opened === plan.clients) console.log("ALL_OPEN");
    }
    if (response.statusCode !== 200) {
      response.resume();
      finish("error", `status ${response.statusCode}`);
      return;
    }
    if (holdMs) {
      holdTimer = setTimeout(() => {
        finish(outcome === "error" ? "error" : "held", "error event");
        request.destroy();
      }, holdMs);
    }
    response.setEncoding("utf8");
    response.on("data", (piece) => {
      const arrived = now();
      buffer += piece.indexOf("\r") < 0 ? piece : piece.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.heartbeat) { heartbeats += 1; result.heartbeats_total += 1; continue; }
        result.events += 1;
        const kind = classify(event);
        if (kind === "text") {
          result.text_events += 1;
          if (lastText === null) firstTokenMs.push(arrived - sent);
          else gapsMs.push(arrived - lastText);
          lastText = arrived;
        } else if (kind === "final" && outcome === null) {
          outcome = "complete";
        } else if (kind === "error" && outcome === null) {
          outcome = "error";
          if (result.error_samples.length < 5) result.error_samples.push(String(event.data).slice(0, 300));
        }
      }
    });
    response.on("end", () => {
      if (outcome === "complete") finish("complete");
      else if (outcome === "error") finish("error", "error event");
      else finish("cut");
    });
    response.on("aborted", () => finish("cut"));
    response.on("error", (error) => finish("error", `response: ${error.message}`));
  });
  request.on("error", (error) => finish("error", `request: ${error.message}`));
  const timer = setTimeout(() => {
    finish("error", "timeout");
    request.destroy();
  }, holdMs ? holdMs + streamTimeoutMs : streamTimeoutMs);
  request.end(body);
}

function client() {
  let streams = 0;
  const loop = () => {
    if (holdMs ? streams === 1 : now() - started >= plan.seconds * 1000) {
      running -= 1;
      if (running === 0) report();
      return;
    }
    streams += 1;
    oneStream(loop);
  };
  setTimeout(loop, Math.random() * (plan.stagger_ms || 0));
}

function percentiles(values) {
  if (values.length === 0) return { count: 0, p50: null, p90: null, p99: null, max: null };
  const sorted = Float64Array.from(values).sort();
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
  return { count: sorted.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: sorted[sorted.length - 1] };
}

function report() {
  if (heartbeatCounts.length) {
    result.heartbeats_min = Math.min(...heartbeatCounts);
    result.heartbeats_max = Math.max(...heartbeatCounts);
  }
  result.first_token_ms = percentiles(firstTokenMs);
  result.gap_ms = percentiles(gapsMs);
  result.seconds = (now() - started) / 1000;
  const cpu = process.cpuUsage();
  result.client_cpu_seconds = (cpu.user + cpu.system) / 1e6;
  console.log("BENCH " + JSON.stringify(result));
  agent.destroy();
  process.exit(0);
}

for (let i = 0; i < plan.clients; i++) client();
// However the streams behave, the run ends: the longest a stream may take, after the last may have started.
setTimeout(() => {
  recordError("the run outlived its bound");
  report();
}, (plan.stagger_ms || 0) + (plan.seconds || 0) * 1000 + holdMs + streamTimeoutMs + 5000).unref();
