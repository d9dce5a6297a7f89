// The tokenmill playground: a chat client of this server's own /v1/chat/completions.
// Everything the model, the server or the user wrote reaches the page as text
// (textContent, title), never as HTML. URLs are relative to the page, so the page also
// works behind a path-based proxy (--root-path).
"use strict";

const $ = (id) => document.getElementById(id);
const STATUS_POLL_MS = 2000;
const KEY_STORAGE = "tokenmill-playground-api-key";

const state = {
  model: null,
  history: [], // {role, content} of the finished turns, sent with every request
  controller: null, // the AbortController of the request in flight
  lastTokens: null, // [vllm:generation_tokens_total, time] of the previous status poll
};

// --- small DOM helpers -------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addMessage(role, text) {
  const box = el("div", `msg ${role}`);
  box.dataset.role = role;
  box.append(el("div", "role", role));
  const reasoning = el("div", "reasoning");
  const body = el("div", "text", text || "");
  const meta = el("div", "meta");
  box.append(reasoning, body, meta);
  $("log").append(box);
  scrollDown();
  return { box, reasoning, body, meta };
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// --- the request ------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function numberField(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new Error(`${id}: not a number: ${raw}`);
  return value;
}

function requestBody(messages) {
  const body = {
    model: state.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberField("temperature"),
    top_p: numberField("top-p"),
    max_tokens: numberField("max-tokens"),
  };
  const seed = numberField("seed");
  if (seed !== undefined) body.seed = seed;
  if ($("logprobs").checked) {
    body.logprobs = true;
    body.top_logprobs = 5;
  }
  const kind = $("structured").value;
  const spec = $("structured-spec").value.trim();
  if (kind === "json_schema") {
    if (spec === "") {
      body.response_format = { type: "json_object" };
    } else {
      let schema;
      try {
        schema = JSON.parse(spec);
      } catch (err) {
        throw new Error(`the JSON schema is not valid JSON: ${err.message}`);
      }
      body.response_format = { type: "json_schema", json_schema: { name: "playground", schema } };
    }
  } else if (kind === "regex") {
    if (spec === "") throw new Error("the regex is empty");
    body.structured_outputs = { regex: spec };
  }
  const extra = $("extra").value.trim();
  if (extra !== "") {
    let fields;
    try {
      fields = JSON.parse(extra);
    } catch (err) {
      throw new Error(`extra request fields: not valid JSON: ${err.message}`);
    }
    if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
      throw new Error("extra request fields: give a JSON object");
    }
    Object.assign(body, fields);
  }
  return body;
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const history = state.history; // "New chat" replaces it: a late stop lands in the old one
  messages.push(...history, { role: "user", content: text });
  let body;
  try {
    body = requestBody(messages);
  } catch (err) {
    showError(err.message);
    return;
  }
  addMessage("user", text);
  const reply = addMessage("assistant");
  reply.box.dataset.state = "streaming";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  const run = { content: "", firstTokenAt: null, usage: null, finish: null };
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readStream(response, (chunk) => onChunk(chunk, reply, run, started));
    reply.box.dataset.state = "done";
    history.push({ role: "user", content: text }, { role: "assistant", content: run.content });
  } catch (err) {
    if (err.name === "AbortError") {
      reply.box.dataset.state = "stopped";
      run.finish = "stopped";
      // the turn stays in the conversation with what was written before the stop
      history.push({ role: "user", content: text }, { role: "assistant", content: run.content });
    } else {
      reply.box.dataset.state = "error";
      reply.box.classList.add("error");
      reply.body.append(el("div", "error-text", err.message));
    }
  } finally {
    state.controller = null;
    setBusy(false);
    reply.meta.textContent = summary(run, started);
    scrollDown();
  }
}

async function errorText(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && error.message) return `${response.status}: ${error.message}`;
  } catch (_) {
    /* not JSON: the status line says it */
  }
  return `${response.status} ${response.statusText}`;
}

// Server-sent events: `data: <json>` records separated by blank lines, ending with [DONE].
async function readStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const record = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of record.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "the server reported an error");
        onEvent(event);
      }
    }
  }
}

function onChunk(chunk, reply, run, started) {
  if (chunk.usage) run.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const delta = choice.delta || {};
  if (delta.reasoning_content) reply.reasoning.append(delta.reasoning_content);
  if (delta.content) {
    if (run.firstTokenAt === null) run.firstTokenAt = performance.now() - started;
    run.content += delta.content;
    const tokens = choice.logprobs && choice.logprobs.content;
    if (tokens && tokens.length) appendHeat(reply.body, delta.content, tokens);
    else reply.body.append(delta.content);
    scrollDown();
  }
  if (choice.finish_reason) run.finish = choice.finish_reason;
}

// The text of a chunk, one span per token when its tokens spell it exactly (else one span
// for the chunk, coloured by its least likely token): green is likely, red unlikely.
function appendHeat(body, text, tokens) {
  const spelled = tokens.map((t) => t.token).join("");
  const pieces = spelled === text ? tokens.map((t) => [t.token, [t]]) : [[text, tokens]];
  for (const [piece, covering] of pieces) {
    const logprob = Math.min(...covering.map((t) => t.logprob));
    const p = Math.exp(logprob);
    const span = el("span", "tok", piece);
    span.style.backgroundColor = `hsl(${Math.round(120 * p)}, 75%, 84%)`;
    span.dataset.p = p.toFixed(4);
    span.title = covering.map(describeToken).join("\n\n");
    body.append(span);
  }
}

function describeToken(token) {
  const lines = [`${JSON.stringify(token.token)}  p=${Math.exp(token.logprob).toFixed(3)}`];
  for (const alt of token.top_logprobs || []) {
    lines.push(`  ${JSON.stringify(alt.token)}  ${Math.exp(alt.logprob).toFixed(3)}`);
  }
  return lines.join("\n");
}

function summary(run, started) {
  const seconds = (performance.now() - started) / 1000;
  const parts = [];
  if (run.usage) {
    const n = run.usage.completion_tokens;
    parts.push(`${n} tokens`, `${(n / seconds).toFixed(1)} tok/s`);
    parts.push(`prompt ${run.usage.prompt_tokens}`);
  }
  if (run.firstTokenAt !== null) parts.push(`first token ${Math.round(run.firstTokenAt)} ms`);
  if (run.finish) parts.push(`finish: ${run.finish}`);
  return parts.join(" · ");
}

function showError(message) {
  const box = addMessage("error", message);
  box.box.classList.add("error");
}

// --- the status bar ---------------------------------------------------------------------

// Prometheus text format: sum each sample name's values over its label sets (engines).
function parseMetrics(text) {
  const sums = new Map();
  const counts = new Map();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const match = /^([A-Za-z_:][\w:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const value = Number(match[3]);
    if (!Number.isFinite(value)) continue;
    sums.set(match[1], (sums.get(match[1]) || 0) + value);
    counts.set(match[1], (counts.get(match[1]) || 0) + 1);
  }
  return { sum: (name) => sums.get(name), mean: (name) => sums.get(name) / counts.get(name) };
}

async function pollStatus() {
  try {
    const response = await fetch("metrics", { cache: "no-store" });
    if (!response.ok) throw new Error(String(response.status));
    const m = parseMetrics(await response.text());
    $("stat-running").textContent = String(m.sum("vllm:num_requests_running") ?? "-");
    $("stat-waiting").textContent = String(m.sum("vllm:num_requests_waiting") ?? "-");
    const kv = m.mean("vllm:kv_cache_usage_perc");
    $("stat-kv").textContent = Number.isFinite(kv) ? `${(100 * kv).toFixed(1)}%` : "-";
    const tokens = m.sum("vllm:generation_tokens_total");
    const now = performance.now();
    if (tokens !== undefined && state.lastTokens) {
      const [before, then] = state.lastTokens;
      const rate = (tokens - before) / ((now - then) / 1000);
      $("stat-tps").textContent = rate >= 0 ? rate.toFixed(1) : "-";
    }
    if (tokens !== undefined) state.lastTokens = [tokens, now];
    link(true);
  } catch (_) {
    link(false);
  }
}

function link(up) {
  const node = $("stat-link");
  node.textContent = up ? "connected" : "server unreachable";
  node.className = up ? "link-ok" : "link-down";
}

async function loadConfig() {
  const response = await fetch("playground/config", { cache: "no-store" });
  const config = await response.json();
  state.model = config.model;
  $("model").textContent = config.model;
  $("stat-context").textContent = String(config.max_model_len);
  document.title = `${config.model} · tokenmill playground`;
  if (config.api_key_required) {
    $("api-key-row").hidden = false;
    $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  }
}

// --- wiring -----------------------------------------------------------------------------

function submit() {
  const text = $("prompt").value;
  if (text.trim() === "" || state.controller) return;
  $("prompt").value = "";
  send(text);
}

function init() {
  $("compose").addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("log").replaceChildren();
  });
  $("structured").addEventListener("change", () => {
    $("structured-spec").hidden = $("structured").value === "none";
  });
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  });
  loadConfig().catch(() => link(false));
  pollStatus();
  setInterval(pollStatus, STATUS_POLL_MS);
}

document.addEventListener("DOMContentLoaded", init);
