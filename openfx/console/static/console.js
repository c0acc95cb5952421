// The OpenFx console: plain DOM, every value from the gateway set as textContent (function
// results and logs are attacker-controlled), images shown only through <img> from a blob: URL.
"use strict";

const TOKEN_KEY = "openfx-token";
const SKIP_KEY = "openfx-no-token";  // the user chose to go on with what is open without a token
const $ = (id) => document.getElementById(id);
let scopes = [];
let timer = null;
let current = null;  // the function shown on the detail page
let imageUrl = null;

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(method, path, body, contentType) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (contentType) headers["Content-Type"] = contentType;
  const response = await fetch(path, { method, headers, body, credentials: "omit", cache: "no-store" });
  if (response.status === 401) { showLogin("The gateway refused the token: sign in again."); throw new Error("unauthenticated"); }
  return response;
}

async function message(response) {
  const text = await response.text();
  try { return JSON.parse(text).message || text; } catch (e) { return text; }
}

function show(section) {
  for (const id of ["login", "list", "detail"]) $(id).hidden = id !== section;
}

function showLogin(error) {
  clearInterval(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(SKIP_KEY);
  $("login-error").textContent = error || "";
  $("who").textContent = "";
  $("forget").hidden = true;
  show("login");
  $("token").focus();
}

async function signIn() {
  const response = await api("GET", "/console/whoami");
  if (!response.ok) { showLogin(await message(response)); return false; }
  scopes = (await response.json()).scopes;
  $("who").textContent = "scopes: " + (scopes.join(", ") || "read only");
  $("forget").hidden = !token();
  return true;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

const ms = (value) => value === null ? "–" : value < 1 ? value.toFixed(3) + " ms" : value < 1000 ? value.toFixed(1) + " ms" : (value / 1000).toFixed(2) + " s";
const percent = (value) => value === null ? "–" : (value * 100).toFixed(1) + " %";

async function refreshList() {
  try {
    const response = await api("GET", "/console/overview");
    if (!response.ok) { $("list-error").textContent = await message(response); return; }
    const rows = $("rows");
    const fresh = document.createDocumentFragment();
    for (const fn of (await response.json()).functions) {
      const row = document.createElement("tr");
      row.dataset.name = fn.name;
      const link = document.createElement("a");
      link.href = "#/fn/" + encodeURIComponent(fn.name);
      link.textContent = fn.name;
      cell(row, "").appendChild(link);
      cell(row, fn.status, fn.status).title = fn.error;
      cell(row, fn.available + "/" + fn.replicas, "num replicas");
      cell(row, String(fn.invocations), "num invocations");
      cell(row, percent(fn.error_rate), "num");
      cell(row, ms(fn.p50_ms), "num p50");
      cell(row, ms(fn.p99_ms), "num p99");
      fresh.appendChild(row);
    }
    rows.replaceChildren(fresh);
    $("list-error").textContent = "";
  } catch (e) {
    if (e.message !== "unauthenticated") $("list-error").textContent = "gateway unreachable: " + e.message;
  }
}

async function refreshDetail() {
  const name = current;
  const response = await api("GET", "/system/function/" + encodeURIComponent(name));
  if (name !== current) return;
  if (!response.ok) { $("fn-status").textContent = await message(response); return; }
  const fn = await response.json();
  $("fn-status").textContent = "replicas " + fn.AvailableReplicas + "/" + fn.Replicas + " ready, " + fn.InvocationCount + " invocations";
  $("config").textContent = JSON.stringify(fn, null, 2);
  if (document.activeElement !== $("replicas")) $("replicas").value = fn.Replicas;
}

async function refreshLog() {
  const name = current;
  $("log-status").textContent = "loading…";
  const response = await api("GET", "/system/function-log/" + encodeURIComponent(name));
  if (name !== current) return;
  if (!response.ok) { $("log-status").textContent = await message(response); return; }
  const lines = (await response.text()).split("\n");
  $("log").textContent = lines.slice(-200).join("\n");  // the tail
  $("log-status").textContent = "log read at " + new Date().toLocaleTimeString();
}

function clearResult() {
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = null;
  $("result-image").hidden = true;
  $("result-image").removeAttribute("src");
  $("result-text").hidden = true;
  $("result-text").textContent = "";
}

async function invoke() {
  clearResult();
  const kind = document.querySelector("input[name=kind]:checked").value;
  let body, type;
  if (kind === "file") {
    const file = $("input-file").files[0];
    if (!file) { $("result-status").textContent = "choose a file first"; return; }
    body = file; type = file.type || "application/octet-stream";
  } else {
    body = $("input-text").value; type = kind === "json" ? "application/json" : "text/plain";
    if (kind === "json") {
      try { JSON.parse(body); } catch (e) { $("result-status").textContent = "not JSON: " + e.message; return; }
    }
  }
  $("result-status").textContent = "invoking…";
  const started = performance.now();
  const response = await api("POST", "/console/invoke/" + encodeURIComponent(current), body, type);
  const took = (performance.now() - started).toFixed(0);
  if (!response.ok) { $("result-status").textContent = "error " + response.status + ": " + await message(response); return; }
  const contentType = (response.headers.get("Content-Type") || "").split(";")[0].trim().toLowerCase();
  $("result-status").textContent = "200 " + (contentType || "no content type") + " in " + took + " ms";
  if (contentType.startsWith("image/")) {
    imageUrl = URL.createObjectURL(await response.blob());
    $("result-image").src = imageUrl;
    $("result-image").hidden = false;
    return;
  }
  let text = await response.text();
  if (contentType === "application/json" || contentType.endsWith("+json")) {
    try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* shown as it came */ }
  }
  $("result-text").textContent = text;
  $("result-text").hidden = false;
}

async function scale() {
  const replicas = parseInt($("replicas").value, 10);
  $("manage-status").textContent = "scaling…";
  const response = await api("PUT", "/system/scale-function", JSON.stringify({ ServiceName: current, Replicas: replicas }), "application/json");
  $("manage-status").textContent = response.ok ? "scaled " + current + " to " + replicas : "error: " + await message(response);
  refreshDetail();
}

async function remove() {
  if (!window.confirm("Delete function " + current + "?")) return;
  const response = await api("DELETE", "/system/function/" + encodeURIComponent(current));
  if (response.ok) { location.hash = "#/"; return; }
  $("manage-status").textContent = "error: " + await message(response);
}

async function route() {
  clearInterval(timer);
  if (!token() && !sessionStorage.getItem(SKIP_KEY)) { showLogin(""); return; }
  if (!(await signIn())) return;
  const match = location.hash.match(/^#\/fn\/(.+)$/);
  if (match) {
    const name = decodeURIComponent(match[1]);
    if (name !== current) { clearResult(); $("result-status").textContent = ""; $("log").textContent = ""; $("manage-status").textContent = ""; }
    current = name;
    $("fn-name").textContent = current;
    $("manage").hidden = !scopes.includes("manage");
    $("log-refresh").hidden = !scopes.includes("manage");
    show("detail");
    refreshDetail();
    if (scopes.includes("manage")) refreshLog();
    timer = setInterval(refreshDetail, 2000);
  } else {
    current = null;
    show("list");
    refreshList();
    timer = setInterval(refreshList, 2000);
  }
}

function guarded(action) {
  return (event) => {
    event.preventDefault();
    action().catch((e) => { if (e.message !== "unauthenticated") $("result-status").textContent = "failed: " + e.message; });
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    route();
  });
  $("forget").addEventListener("click", () => showLogin(""));
  $("skip").addEventListener("click", () => { sessionStorage.setItem(SKIP_KEY, "1"); route(); });
  $("invoke-form").addEventListener("submit", guarded(invoke));
  $("scale-form").addEventListener("submit", guarded(scale));
  $("delete").addEventListener("click", guarded(remove));
  $("log-refresh").addEventListener("click", guarded(refreshLog));
  window.addEventListener("hashchange", route);
  route();
});
