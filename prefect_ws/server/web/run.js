/* The run page: one WebSocket on the public stream, resumed with since=<last seq> after any drop.
 *
 * Every event is applied once, in seq order, to a small model (steps, layers, logs, status) and
 * the DOM follows the model. Frames without seq (hello and other control frames) carry no event.
 */
"use strict";

(() => {
  const { config, el, seconds, epoch, clock, notice, connection } = PrefectWs;
  const runId = config.runId;
  const LEVELS = { DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40, CRITICAL: 50 };
  const MAX_LOG_LINES = 20000; // the DOM keeps the newest lines; the stream has them all
  const ACCESS_CODES = new Set([1008, 4401, 4403]);

  const state = {
    lastSeq: 0,
    status: "waiting",
    flowName: null,
    runName: null,
    started: null,
    duration: null,
    error: null,
    layers: [], // declared: [[stepId, ...], ...]
    steps: new Map(), // stepId -> {id, layer, status, started, duration, attempt, error, childRunId}
    complete: false,
    logCount: 0,
    waitingFor: null, // the Prefect state of a run that has not started yet (hello.waiting)
  };

  // -- model ------------------------------------------------------------------------------
  function layerOf(stepId, declared) {
    if (typeof declared === "number") return declared;
    const index = state.layers.findIndex((layer) => layer.includes(stepId));
    if (index >= 0) return index;
    // A plain Prefect flow declares no layers: one past the deepest step finished before this one.
    let deepest = -1;
    for (const step of state.steps.values()) {
      if (step.status !== "running" && typeof step.layer === "number") deepest = Math.max(deepest, step.layer);
    }
    return deepest + 1;
  }

  function apply(event) {
    const payload = event.payload || {};
    const ts = epoch(event.ts);
    switch (event.type) {
      case "run_start":
        state.flowName = payload.flowName || null;
        state.runName = payload.flowRunName || null;
        state.status = "running";
        state.started = ts;
        if (Array.isArray(payload.layers)) {
          state.layers = payload.layers.filter(Array.isArray).map((layer) => layer.map(String));
        }
        renderHeader();
        renderDag();
        break;
      case "step_start": {
        const id = String(payload.stepId);
        state.steps.set(id, {
          id,
          layer: layerOf(id, payload.layer),
          status: "running",
          started: ts,
          duration: null,
          attempt: payload.attempt || 1,
          error: null,
          childRunId: payload.childRunId || null, // a subflow run: a step with a stream of its own
        });
        if (state.status === "waiting") state.status = "running";
        addStepOption(id);
        renderDag();
        break;
      }
      case "step_complete": {
        const id = String(payload.stepId);
        const step = state.steps.get(id) || { id, layer: layerOf(id, payload.layer), started: null, attempt: 1 };
        step.status = String(payload.status);
        step.duration = typeof payload.duration === "number" ? payload.duration : null;
        step.error = payload.error || null;
        if (payload.childRunId) step.childRunId = payload.childRunId;
        state.steps.set(id, step);
        addStepOption(id);
        renderDag();
        break;
      }
      case "step_log":
        addLog(event);
        break;
      case "run_complete":
        flushLogs(); // every line is on the page when the run shows as finished
        state.status = String(payload.status);
        state.duration = typeof payload.duration === "number" ? payload.duration : null;
        state.error = payload.error || null;
        state.complete = true;
        for (const step of state.steps.values()) {
          if (step.status === "running") step.status = "cancelled";
        }
        renderHeader();
        renderDag();
        break;
      default:
        break;
    }
    document.getElementById("last-seq").textContent = String(state.lastSeq);
  }

  // -- rendering --------------------------------------------------------------------------
  function renderHeader() {
    document.getElementById("flow-name").textContent = state.flowName || "Run";
    document.getElementById("run-name").textContent = state.runName ? "(" + state.runName + ")" : "";
    document.title = "prefect-ws: " + (state.flowName || runId) + " · " + state.status;
    const badge = document.getElementById("run-status");
    badge.dataset.status = state.status;
    badge.textContent = state.status;
    const error = document.getElementById("run-error");
    error.hidden = !state.error;
    error.textContent = state.error ? "Run error: " + state.error : "";
    tick();
  }

  function groupedSteps() {
    const groups = new Map();
    state.layers.forEach((layer, index) => groups.set(index, layer.map((id) => [id, state.steps.get(id) || null])));
    const declared = new Set(state.layers.flat());
    for (const step of state.steps.values()) {
      if (declared.has(step.id)) continue;
      const layer = typeof step.layer === "number" ? step.layer : 0;
      if (!groups.has(layer)) groups.set(layer, []);
      groups.get(layer).push([step.id, step]);
    }
    return [...groups.entries()].sort((a, b) => a[0] - b[0]);
  }

  function renderDag() {
    const dag = document.getElementById("dag");
    const groups = groupedSteps();
    dag.replaceChildren();
    if (!groups.length) {
      dag.append(el("p", { class: "muted empty" }, state.complete ? "This run had no steps." : "No steps yet."));
    }
    groups.forEach(([index, members], position) => {
      if (position > 0) dag.append(el("div", { class: "arrow", "aria-hidden": "true" }, "→"));
      const column = el("div", { class: "layer", "data-layer": index });
      column.append(el("div", { class: "layer-title" }, "layer " + index));
      for (const [id, step] of members) {
        const status = step ? step.status : state.complete ? "not-run" : "pending";
        const card = el("button", { class: "step", type: "button", "data-step": id, "data-status": status });
        card.title = "Show only this step's logs";
        card.append(el("span", { class: "step-name" }, id));
        const meta = el("span", { class: "step-meta" });
        meta.append(el("span", { class: "step-status" }, status.replace("-", " ")));
        meta.append(el("span", { class: "step-duration" }, step ? stepTime(step) : ""));
        if (step && step.attempt > 1) meta.append(el("span", { class: "attempt" }, "attempt " + step.attempt));
        card.append(meta);
        if (step && step.error) card.append(el("span", { class: "step-error" }, step.error));
        card.addEventListener("click", () => {
          const select = document.getElementById("step-filter");
          select.value = select.value === id ? "*" : id;
          applyFilters();
        });
        column.append(card);
        if (step && step.childRunId) {
          // A subflow run: its own stream is one click away (a link cannot sit inside a button).
          const href = PrefectWs.pageUrl("/runs/" + encodeURIComponent(step.childRunId));
          column.append(el("a", { class: "subflow-link", href, "data-child": step.childRunId }, "subflow run " + step.childRunId + " →"));
        }
      }
      dag.append(column);
    });
    const total = new Set([...state.layers.flat(), ...state.steps.keys()]).size;
    const finished = [...state.steps.values()].filter((s) => s.status !== "running").length;
    document.getElementById("progress-bar").style.width = total ? (100 * finished) / total + "%" : "0%";
    document.getElementById("progress-text").textContent = finished + "/" + total + " steps finished";
  }

  function stepTime(step) {
    if (step.status === "running") return step.started ? seconds(Date.now() / 1000 - step.started) : "";
    return seconds(step.duration);
  }

  function tick() {
    let elapsed = state.duration;
    if (elapsed === null && state.started !== null && !state.complete) elapsed = Date.now() / 1000 - state.started;
    document.getElementById("run-duration").textContent = elapsed === null ? "" : seconds(elapsed);
    for (const card of document.querySelectorAll('.step[data-status="running"]')) {
      const step = state.steps.get(card.dataset.step);
      if (step) card.querySelector(".step-duration").textContent = stepTime(step);
    }
  }

  // -- logs -------------------------------------------------------------------------------
  const logs = document.getElementById("logs");
  const filters = {
    level: document.getElementById("level-filter"),
    step: document.getElementById("step-filter"),
    text: document.getElementById("text-filter"),
    autoscroll: document.getElementById("autoscroll"),
  };

  function addStepOption(id) {
    const select = filters.step;
    if ([...select.options].some((o) => o.value === id)) return;
    select.append(el("option", { value: id }, id));
  }

  function visible(line) {
    const min = LEVELS[filters.level.value] || 0;
    if ((LEVELS[line.dataset.level] || 0) < min) return false;
    if (filters.step.value !== "*" && line.dataset.step !== filters.step.value) return false;
    const text = filters.text.value.trim().toLowerCase();
    return !text || line.dataset.search.includes(text);
  }

  // Lines are built as events arrive and put on the page once per animation frame: a replay of
  // thousands of lines costs one layout, not one per line.
  let pendingLines = [];
  let flushScheduled = false;

  function addLog(event) {
    const payload = event.payload || {};
    const level = String(payload.level || "INFO").toUpperCase();
    const step = payload.stepId === null || payload.stepId === undefined ? "" : String(payload.stepId);
    const message = String(payload.message ?? "");
    const line = el("div", { class: "log-line", "data-level": level, "data-step": step, "data-seq": event.seq });
    line.dataset.search = (message + " " + step).toLowerCase();
    line.append(el("span", { class: "log-time" }, clock(event.ts)));
    line.append(el("span", { class: "log-level" }, level));
    line.append(el("span", { class: "log-step" }, step || "flow"));
    line.append(el("span", { class: "log-message" }, message));
    pendingLines.push(line);
    state.logCount += 1;
    if (pendingLines.length >= 5000) flushLogs(); // a hidden tab gets no frames: stay bounded
    else if (!flushScheduled) {
      flushScheduled = true;
      requestAnimationFrame(flushLogs);
    }
  }

  function flushLogs() {
    flushScheduled = false;
    if (!pendingLines.length) return;
    const nearBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 40;
    const fragment = document.createDocumentFragment();
    let anyVisible = false;
    for (const line of pendingLines.slice(-MAX_LOG_LINES)) {
      line.hidden = !visible(line);
      anyVisible = anyVisible || !line.hidden;
      fragment.append(line);
    }
    pendingLines = [];
    logs.append(fragment);
    const excess = logs.childElementCount - MAX_LOG_LINES;
    if (excess > 0) {
      const range = document.createRange();
      range.setStartBefore(logs.firstElementChild);
      range.setEndAfter(logs.children[excess - 1]);
      range.deleteContents();
    }
    document.getElementById("log-count").textContent = state.logCount + " lines";
    if (filters.autoscroll.checked && (nearBottom || anyVisible)) logs.scrollTop = logs.scrollHeight;
  }

  function applyFilters() {
    for (const line of logs.children) line.hidden = !visible(line);
    if (filters.autoscroll.checked) logs.scrollTop = logs.scrollHeight;
  }

  filters.level.addEventListener("change", applyFilters);
  filters.step.addEventListener("change", applyFilters);
  filters.text.addEventListener("input", applyFilters);
  filters.autoscroll.addEventListener("change", applyFilters);
  // Scrolling up to read pauses auto-scroll; scrolling back to the end resumes it.
  logs.addEventListener("scroll", () => {
    const atBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 40;
    if (!atBottom && filters.autoscroll.checked) filters.autoscroll.checked = false;
    else if (atBottom && !filters.autoscroll.checked) filters.autoscroll.checked = true;
  });

  // -- the stream -------------------------------------------------------------------------
  const streamPath = "/api/v2/workflows/runs/" + encodeURIComponent(runId) + "/stream";
  let failures = 0;

  function connect() {
    // Until the first event, ask the server to hold the stream open for a run that has not
    // started yet (wait=) rather than close it at once with 4404 (unknown run).
    const params = state.lastSeq ? { since: state.lastSeq } : { wait: 60 };
    let opened = false;
    let socket;
    try {
      socket = new WebSocket(PrefectWs.wsUrl(streamPath, params));
    } catch (error) {
      notice("error", "Cannot open the stream: " + error.message);
      connection("refused", "not connected");
      return;
    }
    connection("connecting", state.lastSeq ? "resuming from seq " + state.lastSeq + "…" : "connecting…");
    socket.onopen = () => {
      opened = true;
      failures = 0;
      connection("live", "live");
      // Nothing replayed shortly after joining: the server has no events for this run id.
      setTimeout(() => {
        if (state.lastSeq === 0 && !state.waitingFor && socket.readyState === WebSocket.OPEN) unknownRun();
      }, 1500);
    };
    socket.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (!event || typeof event.seq !== "number") {
        control(event || {});
        return;
      }
      if (event.seq <= state.lastSeq) return; // already applied before a reconnect
      state.lastSeq = event.seq;
      if (document.getElementById("notice").dataset.kind === "waiting") {
        notice(null);
        connection("live", "live");
      }
      apply(event);
    };
    socket.onclose = (close) => closed(close.code, close.reason || "", opened);
  }

  function control(frame) {
    if (frame.type === "hello" && typeof frame.waiting === "string" && state.lastSeq === 0) {
      // Prefect knows the run but it has not started: the server holds the stream open for it.
      state.waitingFor = frame.waiting;
      notice("waiting", "Waiting for the run to start (Prefect state: " + frame.waiting + ")…");
      connection("waiting", "waiting for the run to start");
      return;
    }
    if (frame.type === "hello" && frame.head === 0 && state.lastSeq === 0) unknownRun();
    if (frame.type === "hello" && frame.recovered === false) {
      notice("warning", "Some earlier events of this run are no longer retained by the server; showing what is.");
    }
  }

  async function closed(code, reason, opened) {
    if (state.complete) {
      connection("done", "run finished");
      return;
    }
    if (code === 1000) {
      connection("done", "stream ended");
      return;
    }
    if (code === 4400) {
      notice("error", "The server refused this stream: " + reason);
      connection("refused", "refused");
      return;
    }
    if (code === 4401) {
      notice("error", "Access refused: the access token expired. Reload the page with a fresh ?token=.");
      connection("refused", "refused");
      return;
    }
    if (ACCESS_CODES.has(code)) {
      notice("error", "Access refused: " + (reason || "not allowed") + ".");
      connection("refused", "refused");
      return;
    }
    if (code === 4404 || /unknown run/i.test(reason)) {
      unknownRun();
      setTimeout(connect, 1000); // the wait ran out: keep waiting, the run may start later
      return;
    }
    if (!opened) {
      const refusal = await probeAccess();
      if (refusal) {
        notice("error", refusal);
        connection("refused", "refused");
        return;
      }
    }
    failures += 1;
    const delay = Math.min(100 * 2 ** failures, 5000);
    connection("reconnecting", "reconnecting (since=" + state.lastSeq + ")…");
    setTimeout(connect, delay);
  }

  function unknownRun() {
    notice(
      "waiting",
      "Unknown run: this server has no events for run " + runId +
        ". The id may be wrong, or the run has not started yet: waiting for it…",
    );
    connection("waiting", "waiting for the run");
  }

  /* A refused WebSocket handshake shows up in a browser only as code 1006. The same guard
   * answers HTTP requests on the run's API path, so ask it why. */
  async function probeAccess() {
    const path = "/api/v2/workflows/runs/" + encodeURIComponent(runId) + "/events";
    try {
      const response = await fetch(PrefectWs.httpUrl(path, { limit: 1 }), { cache: "no-store" });
      if (response.status !== 401 && response.status !== 403) return null;
      let reason = "";
      try {
        reason = (await response.json()).error || "";
      } catch {
        reason = "";
      }
      if (response.status === 401) {
        return "Access refused: this server needs a token (open the page as /runs/" + runId + "?token=…)" +
          (reason ? ": " + reason : ".");
      }
      return "Access refused: " + (reason || "this token may not read this run") + ".";
    } catch {
      return null; // the server is unreachable: keep reconnecting
    }
  }

  // -- start ------------------------------------------------------------------------------
  document.getElementById("run-id").textContent = runId;
  if (config.prefectRunUrl) {
    const link = document.getElementById("prefect-link");
    link.href = config.prefectRunUrl;
    link.hidden = false;
  }
  document.getElementById("home-link").href = PrefectWs.pageUrl("/");
  renderHeader();
  setInterval(tick, 250);
  connect();
})();
