// The ortlora playground: one prompt, several models (the base and adapters), one streamed request each, all
// sent at once so the server decodes them in the same batches. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "ortlora.playground.apiKey";  // sessionStorage: gone when the tab closes

const state = {
  runs: [],          // one per panel of the last Run: {model, text, tokens: [{token, logprob}], ...}
  logprobs: null,    // does the server offer logprobs? null = not yet known
  controller: null,  // aborts the running requests (Stop)
  loads: 0,          // model lists asked for: only the latest answer is shown
  listedKey: null,   // the key the shown list is for (Enter and leaving the box both ask: once is enough)
};

// -- small helpers ---------------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);  // strings become text nodes: model output is never parsed as HTML
  return node;
}

function setStatus(message, isError = false) {
  const s = $("status");
  s.textContent = message;
  s.classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error || { message: JSON.stringify(body) };
  } catch {
    return { message: `${response.status} ${response.statusText}` };
  }
}

// -- models ----------------------------------------------------------------------------------------------------
async function loadModels(force = false) {
  const key = $("key").value.trim();
  if (!force && key === state.listedKey) return;
  state.listedKey = key;
  const load = ++state.loads;
  $("models").dataset.state = "loading";
  setStatus("Loading models…");
  let response, models;
  try {
    response = await fetch("v1/models", { headers: headers() });
    models = response.ok ? (await response.json()).data : null;
  } catch (e) {
    if (load === state.loads) listed("failed", `Cannot reach the server: ${e.message}`);
    return;
  }
  if (load !== state.loads) return;  // a newer key was typed meanwhile
  if (!response.ok) {
    const err = await errorOf(response);
    renderModels([]);
    listed("failed", response.status === 401 ? "This server needs an API key: type yours above." : err.message);
    return;
  }
  renderModels(models);
  const n = models.length;
  listed("listed", n ? `${n} model${n === 1 ? "" : "s"} available to this key.` : "This key may use no models.");
}

function listed(outcome, message) {
  $("models").dataset.state = outcome;
  setStatus(message, outcome === "failed");
}

function renderModels(models) {
  const box = $("models");
  const before = new Set(checkedModels());
  const keep = models.some((m) => before.has(m.id));  // a new key's list: start again from the base model
  box.replaceChildren(el("legend", { text: "Models" }));
  if (!models.length) box.append(el("p", { class: "hint", text: "No models to show." }));
  for (const m of models) {
    const base = !m.parent;  // adapters name the base model they apply to; the base model names none
    const input = el("input", { type: "checkbox", name: "model", value: m.id });
    input.checked = keep ? before.has(m.id) : base;
    box.append(el("label", {}, input, ` ${m.id} `, el("small", { text: base ? "base model" : "adapter" })));
  }
}

function checkedModels() {
  return [...document.querySelectorAll('input[name="model"]:checked')].map((i) => i.value);
}

// -- running ---------------------------------------------------------------------------------------------------
function settings() {
  const number = (id) => Number($(id).value);
  return {
    mode: document.querySelector('input[name="mode"]:checked').value,
    prompt: $("prompt").value,
    max_tokens: number("max_tokens"),
    temperature: number("temperature"),
    top_p: number("top_p"),
    seed: $("seed").value === "" ? null : number("seed"),
  };
}

function requestBody(model, s, withLogprobs) {
  const body = { model, stream: true, stream_options: { include_usage: true }, max_tokens: s.max_tokens,
                 temperature: s.temperature, top_p: s.top_p };
  if (s.seed !== null) body.seed = s.seed;
  if (s.mode === "chat") {
    body.messages = [{ role: "user", content: s.prompt }];
    if (withLogprobs) body.logprobs = true;
  } else {
    body.prompt = s.prompt;
    if (withLogprobs) body.logprobs = 1;
  }
  return body;
}

async function run() {
  if (state.controller) return;
  const models = checkedModels();
  if (!models.length) {
    setStatus("Choose at least one model.", true);
    $("models").querySelector("input")?.focus();
    return;
  }
  const s = settings();
  state.controller = new AbortController();
  state.runs = models.map((model) => newPanel(model));
  $("panels").replaceChildren(...state.runs.map((r) => r.panel));
  running(true);
  setStatus(`Running ${models.length} model${models.length > 1 ? "s" : ""}…`);
  const signal = state.controller.signal;
  await Promise.all(state.runs.map((r) => runOne(r, s, signal)));  // all at once: they share decode batches
  state.controller = null;
  running(false);
  const failed = state.runs.filter((r) => r.state === "error").length;
  setStatus(failed ? `Done; ${failed} of ${state.runs.length} failed.` : "Done.", failed > 0);
  fillCompareChoices();
}

// aria-disabled, not disabled: a button disabled under the keyboard's focus would drop the focus to the page
function running(on) {
  $("run").setAttribute("aria-disabled", String(on));
  $("stop").setAttribute("aria-disabled", String(!on));
}

async function runOne(r, s, signal) {
  const url = s.mode === "chat" ? "v1/chat/completions" : "v1/completions";
  const post = (withLogprobs) => fetch(url, { method: "POST", headers: headers(), signal,
                                                body: JSON.stringify(requestBody(r.model, s, withLogprobs)) });
  try {
    r.start = performance.now();
    const asked = state.logprobs !== false;
    let response = await post(asked);
    if (response.status === 400 && asked) {
      const err = await errorOf(response);
      if (!/logprobs/i.test(`${err.param} ${err.message}`)) return finish(r, "error", err.message);
      state.logprobs = false;  // this server refuses logprobs: ask again without them, and never again
      r.start = performance.now();
      response = await post(false);
    }
    if (!response.ok) return finish(r, "error", (await errorOf(response)).message);
    for await (const chunk of events(response)) {
      if (chunk.error) return finish(r, "error", chunk.error.message);
      if (chunk.usage) r.count = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const text = s.mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      // a completion chunk is one token (its text may be held back: half a character); a chat chunk has text
      const isToken = s.mode === "chat" ? text !== "" : true;
      if (isToken) {
        r.first ??= performance.now();
        r.last = performance.now();
        r.count = Math.max(r.count, ++r.seen);
      }
      r.text += text;
      addLogprobs(r, choice.logprobs);
      if (choice.finish_reason) r.reason = choice.finish_reason;
      update(r);
    }
    return finish(r, "done");
  } catch (e) {
    return finish(r, signal.aborted ? "stopped" : "error", signal.aborted ? "stopped" : e.message);
  }
}

function addLogprobs(r, lp) {
  if (!lp) return;
  if (Array.isArray(lp.content)) {  // chat: [{token, logprob}]
    for (const t of lp.content) r.tokens.push({ token: t.token, logprob: t.logprob });
  } else if (Array.isArray(lp.tokens)) {  // completions: {tokens: [...], token_logprobs: [...]}
    lp.tokens.forEach((token, i) => r.tokens.push({ token, logprob: lp.token_logprobs[i] }));
  }
  state.logprobs = true;
}

// Server-sent events from a fetch body: `data: JSON` blocks separated by a blank line, the last `data: [DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// -- panels ----------------------------------------------------------------------------------------------------
function newPanel(model) {
  const text = el("pre", { class: "text", tabindex: "0", "aria-label": `output of ${model}` });
  const stats = el("p", { class: "stats", title: "time to first token; output tokens per second of the request" });
  const panel = el("article", { class: "panel", "data-model": model, "data-state": "running", "aria-busy": "true" },
                   el("h3", { text: model }), text, stats);
  const r = { model, panel, textNode: text, statsNode: stats, text: "", tokens: [], count: 0, seen: 0,
              start: 0, first: null, last: null, reason: null, state: "running" };
  update(r);
  return r;
}

function update(r) {
  r.textNode.textContent = r.text;
  const parts = [];
  if (r.first !== null) {
    // over the whole request: tokens that arrive in one read (a small model, a busy network) have no gaps to time
    const seconds = (r.last - r.start) / 1000;
    parts.push(`first token ${Math.round(r.first - r.start)} ms`,
               `${r.count} token${r.count === 1 ? "" : "s"} in ${seconds.toFixed(2)} s`,
               `${(r.count / seconds).toFixed(1)} tok/s`);
  }
  if (r.reason) parts.push(`finish: ${r.reason}`);
  if (r.state === "running") parts.push("streaming…");
  r.statsNode.textContent = parts.join(" · ");
}

function finish(r, outcome, message) {
  r.state = outcome;
  r.panel.dataset.state = outcome;
  r.panel.removeAttribute("aria-busy");
  update(r);
  if (message) r.panel.append(el("p", { class: outcome === "error" ? "error" : "hint", role: "alert",
                                         text: message }));
}

// -- compare ---------------------------------------------------------------------------------------------------
function fillCompareChoices() {
  const choices = state.runs.map((r, i) => [String(i), r.model]);
  ["cmp-a", "cmp-b"].forEach((id, k) => {
    const select = $(id);
    select.replaceChildren(...choices.map(([v, label]) => el("option", { value: v, text: label })));
    select.value = String(Math.min(k, choices.length - 1));
    select.disabled = choices.length < 2;
  });
  renderCompare();
}

const quote = (c) => (c === undefined ? "the end" : JSON.stringify(c));  // shows a space or newline too

function commonPrefix(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}

function renderCompare() {
  const out = $("compare");
  const a = state.runs[Number($("cmp-a").value)], b = state.runs[Number($("cmp-b").value)];
  if (state.runs.length < 2 || !a || !b) {
    out.replaceChildren(el("p", { class: "hint", text: "Run two or more models to compare their outputs." }));
    return;
  }
  const ca = Array.from(a.text), cb = Array.from(b.text);  // by character, never half of a surrogate pair
  const at = commonPrefix(ca, cb);
  const same = ca.length === cb.length && at === ca.length;
  out.dataset.divergeAt = same ? "" : String(at);
  const summary = same ? `${a.model} and ${b.model} wrote the same text (${ca.length} characters).`
    : `${a.model} and ${b.model} agree on ${at} character${at === 1 ? "" : "s"}, then diverge at character ${at + 1}: `
      + `${quote(ca[at])} against ${quote(cb[at])}.`;
  const side = (r, chars) => el("div", { class: "side" }, el("h3", { text: r.model }),
    el("pre", { class: "text" }, el("span", { class: "same", text: chars.slice(0, at).join("") }),
       el("mark", { text: chars.slice(at).join("") })));
  out.replaceChildren(el("p", { class: "summary", text: summary }),
                      el("div", { class: "diff" }, side(a, ca), side(b, cb)));
  out.append(...probabilities(a, b));
}

function probabilities(a, b) {
  if (state.logprobs === false) {
    return [el("p", { class: "note",
                      text: "Token probabilities are unavailable: this server does not offer logprobs." })];
  }
  if (!a.tokens.length || !b.tokens.length) return [];
  const k = commonPrefix(a.tokens.map((t) => t.token), b.tokens.map((t) => t.token));
  const strip = (r) => el("div", { class: "tokens", role: "group",
                                   "aria-label": `tokens of ${r.model} with their probabilities` },
    ...r.tokens.map((t, i) => {
      const p = Math.exp(t.logprob);
      const span = el("span", { class: i === k ? "tok diverge" : "tok" }, el("span", { class: "t", text: t.token }),
                      el("small", { text: p.toFixed(2) }));
      span.style.setProperty("--p", p.toFixed(3));  // through CSSOM: the page's CSP forbids style attributes
      return span;
    }));
  const items = [el("h3", { class: "probs", text: "Probability of each chosen token" }),
                 el("div", { class: "side" }, el("h4", { text: a.model }), strip(a)),
                 el("div", { class: "side" }, el("h4", { text: b.model }), strip(b))];
  const ta = a.tokens[k], tb = b.tokens[k];
  if (ta && tb) {
    const fmt = (t) => `${JSON.stringify(t.token)} (p = ${Math.exp(t.logprob).toFixed(3)})`;
    items.push(el("p", { class: "summary",
                         text: `At token ${k + 1}, ${a.model} chose ${fmt(ta)} and ${b.model} chose ${fmt(tb)}.` }));
  }
  return items;
}

// -- wiring ----------------------------------------------------------------------------------------------------
function init() {
  const key = $("key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, key.value));
  key.addEventListener("change", () => loadModels());
  key.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.ctrlKey && !e.metaKey) {  // Enter in the key box loads models, it does not run
      e.preventDefault();
      loadModels();
    }
  });
  $("load").addEventListener("click", () => loadModels(true));
  $("request").addEventListener("submit", (e) => {
    e.preventDefault();
    run();
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("cmp-a").addEventListener("change", renderCompare);
  $("cmp-b").addEventListener("change", renderCompare);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      $("request").requestSubmit();  // checks the form's fields first, like clicking Run
    } else if (e.key === "Escape" && state.controller) {
      state.controller.abort();
    }
  });
  loadModels();  // a server without tenants needs no key
}

init();
