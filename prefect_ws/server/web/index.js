/* The index: active and recent runs, refreshed every 2 s from GET /api/v2/workflows/runs. */
"use strict";

(() => {
  const { config, el, seconds, epoch, notice, connection } = PrefectWs;
  const REFRESH_MS = 1000;
  const UUID = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

  function row(run) {
    const tr = el("tr", { "data-run": run.runId, "data-status": run.status });
    const link = el("a", { href: PrefectWs.pageUrl("/runs/" + encodeURIComponent(run.runId)) }, run.flowName || run.runId);
    const name = el("td");
    name.append(link);
    tr.append(name);
    tr.append(el("td", { class: "muted" }, run.flowRunName || ""));
    const status = el("td");
    status.append(el("span", { class: "badge", "data-status": run.status }, run.status));
    tr.append(status);
    tr.append(el("td", { class: "muted" }, run.startedAt ? new Date(run.startedAt).toLocaleString() : ""));
    let duration = run.duration;
    if (run.status === "running" && run.startedAt) duration = Date.now() / 1000 - epoch(run.startedAt);
    tr.append(el("td", {}, seconds(duration)));
    tr.append(el("td", { class: "muted" }, run.seq));
    return tr;
  }

  function fill(tableId, emptyId, runs) {
    const body = document.querySelector("#" + tableId + " tbody");
    body.replaceChildren(...runs.map(row));
    document.getElementById(emptyId).hidden = runs.length > 0;
  }

  async function refresh() {
    try {
      const response = await fetch(PrefectWs.httpUrl("/api/v2/workflows/runs", { limit: 50 }), { cache: "no-store" });
      let body = {};
      try {
        body = await response.json();
      } catch {
        body = {};
      }
      if (response.status === 401 || response.status === 403) {
        notice("error", "Access refused: " + (body.error || "a token is required") + ". Open this page with ?token=… (an admin token).");
        connection("refused", "refused");
        return;
      }
      if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
      const runs = Array.isArray(body.runs) ? body.runs : [];
      const active = runs.filter((r) => r.status === "running");
      fill("active-runs", "active-empty", active);
      fill("recent-runs", "recent-empty", runs.filter((r) => r.status !== "running"));
      document.getElementById("active-count").textContent = String(active.length);
      notice(null);
      connection("live", "updated " + new Date().toLocaleTimeString());
    } catch (error) {
      notice("warning", "Cannot reach the server (" + error.message + "); retrying…");
      connection("reconnecting", "retrying…");
    }
    setTimeout(refresh, REFRESH_MS);
  }

  document.getElementById("open-run").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("run-input").value.trim();
    if (!UUID.test(value)) {
      notice("error", "That is not a flow run id: expected a UUID such as 0f6c3a8e-1d2b-4c5d-8e9f-0a1b2c3d4e5f.");
      return;
    }
    location.href = PrefectWs.pageUrl("/runs/" + encodeURIComponent(value));
  });
  if (config.prefectUiUrl) {
    const link = document.getElementById("prefect-link");
    link.href = config.prefectUiUrl;
    link.hidden = false;
  }
  refresh();
})();
