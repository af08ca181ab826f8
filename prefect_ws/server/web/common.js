/* Shared by the run page and the index: configuration, URLs, formatting. No dependencies. */
"use strict";

const PrefectWs = (() => {
  const config = JSON.parse(document.getElementById("prefect-ws-config").textContent || "{}");
  const base = typeof config.base === "string" ? config.base : "";
  // A token given in the page URL (?token=...) is passed on to the stream and the API:
  // browsers cannot set an Authorization header on a WebSocket.
  const token = new URLSearchParams(location.search).get("token") || "";

  function withToken(params) {
    const query = new URLSearchParams(params || {});
    if (token) query.set("token", token);
    const text = query.toString();
    return text ? "?" + text : "";
  }

  function httpUrl(path, params) {
    return base + path + withToken(params);
  }

  function wsUrl(path, params) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + base + path + withToken(params);
  }

  function pageUrl(path) {
    return base + path + withToken();
  }

  function seconds(value) {
    if (typeof value !== "number" || !isFinite(value) || value < 0) return "";
    if (value < 60) return value.toFixed(1) + "s";
    if (value < 3600) return Math.floor(value / 60) + "m " + Math.floor(value % 60) + "s";
    return Math.floor(value / 3600) + "h " + Math.floor((value % 3600) / 60) + "m";
  }

  function epoch(ts) {
    const t = Date.parse(ts);
    return isNaN(t) ? null : t / 1000;
  }

  function clock(ts) {
    return typeof ts === "string" ? ts.slice(11, 23) : "";
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key.includes("-")) node.setAttribute(key, String(value));
      else node[key] = value;
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function notice(kind, message) {
    const box = document.getElementById("notice");
    if (!box) return;
    if (!message) {
      box.hidden = true;
      box.textContent = "";
      delete box.dataset.kind;
      return;
    }
    box.hidden = false;
    box.dataset.kind = kind;
    box.textContent = message;
  }

  function connection(state, text) {
    const node = document.getElementById("connection");
    if (!node) return;
    node.dataset.state = state;
    node.textContent = text;
  }

  return { config, base, token, httpUrl, wsUrl, pageUrl, seconds, epoch, clock, el, notice, connection };
})();
