// gpt2serve playground: streams /openai/v1/completions (server-sent events) into one column per
// sample. Plain browser JS, no dependencies. The server puts its limits and defaults in #settings.
"use strict";

const settings = JSON.parse(document.getElementById("settings").textContent);
const $ = (id) => document.getElementById(id);
const KEY_STORE = "gpt2serve.apiKey";
const NUMBERS = ["max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "n"];
let modelName = null;
let maxTokensDefault = settings.defaults.max_tokens; // below the picked model's context
let controller = null;

function setUp() {
  const { defaults, limits } = settings;
  for (const id of NUMBERS) {
    const [lo, hi] = limits[id];
    const input = $(id);
    input.value = defaults[id];
    input.min = lo;
    if (hi !== null) input.max = hi;
    const open = settings.low_open.includes(id) ? "(" : "[";
    $(`${id}-hint`).textContent = `${open}${lo}, ${hi === null ? "∞" : hi}], default ${defaults[id]}`;
  }
  $("prompt").maxLength = settings.max_prompt_chars;
  $("stop-hint").textContent = `one a line, up to ${settings.max_stop}; \\n is a newline`;
  // The tab's storage, not the browser's: the key survives a reload, not the tab's closing
  // (one an older page left in the browser's goes). Where storage is blocked, it is typed again.
  try {
    localStorage.removeItem(KEY_STORE);
    $("api_key").value = sessionStorage.getItem(KEY_STORE) || "";
  } catch (e) { /* storage blocked */ }
  $("api_key").addEventListener("change", () => {
    try {
      sessionStorage.setItem(KEY_STORE, $("api_key").value.trim());
    } catch (e) { /* storage blocked */ }
    loadModel();
  });
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("curl").addEventListener("click", showCurl);
  $("model-picker").addEventListener("change", pickModel);
  loadModel();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The server's models, from /openai/v1/models, in the picker; each has its own context.
let models = [];

async function loadModel() {
  const picker = $("model-picker");
  try {
    const r = await fetch("/openai/v1/models", { headers: headers() });
    if (!r.ok) throw new Error(await responseError(r));
    models = (await r.json()).data;
    if (!models.length) throw new Error("the server has no model to serve");
    const keep = models.some((m) => m.id === modelName) ? modelName : models[0].id;
    picker.replaceChildren(...models.map((m) => new Option(m.id, m.id, false, m.id === keep)));
    picker.disabled = models.length < 2;
    pickModel();
  } catch (e) {
    modelName = null;
    picker.replaceChildren();
    picker.disabled = true;
    $("model").textContent = `Model: unknown (${e.message}) · context ${settings.context} tokens`;
  }
}

function pickModel() {
  modelName = $("model-picker").value;
  const model = models.find((m) => m.id === modelName);
  const context = model && model.max_model_len ? model.max_model_len : settings.context;
  maxTokensDefault = Math.min(settings.defaults.max_tokens, context - 1);
  $("max_tokens").max = context - 1;
  if (Number($("max_tokens").value) > context - 1) $("max_tokens").value = context - 1;
  $("max_tokens-hint").textContent = `[${settings.limits.max_tokens[0]}, ${context - 1}], default ${maxTokensDefault}`;
  $("model").textContent = `Model: ${modelName} · context ${context} tokens`;
}

// ---- the request, as the controls say ----

function params() {
  const p = {};
  for (const id of NUMBERS) {
    const raw = $(id).value.trim();
    const fallback = id === "max_tokens" ? maxTokensDefault : settings.defaults[id];
    p[id] = raw === "" ? fallback : Number(raw);
  }
  const seed = $("seed").value.trim();
  if (seed) p.seed = seed; // written as typed (see toJSON): seeds go past 2^53
  const unescape = (s) => s.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
  const stop = $("stop_strings").value.split("\n").filter((s) => s !== "").map(unescape);
  if (stop.length) p.stop = stop;
  if ($("ignore_eos").checked) p.ignore_eos = true;
  return p;
}

function openaiBody() {
  const body = { prompt: $("prompt").value, ...params(), stream: true,
                 stream_options: { include_usage: true } };
  return modelName ? { model: modelName, ...body } : body;
}

function v1Body() {
  const { max_tokens, ...rest } = params();
  return { instances: [{ prompt: $("prompt").value, max_new_tokens: max_tokens, ...rest }] };
}

function toJSON(body) {
  // A seed of digits goes in as a JSON number, digit for digit; anything else as a string, for
  // the server to refuse with its own message.
  let seed = null;
  const text = JSON.stringify(body, (k, v) => {
    // (no leading zero: 007 is not JSON)
    if (k === "seed" && typeof v === "string" && /^-?(0|[1-9]\d*)$/.test(v)) {
      seed = v;
      return "@@seed@@";
    }
    return v;
  });
  return seed === null ? text : text.replace('"seed":"@@seed@@"', `"seed":${seed}`);
}

// ---- streaming ----

async function generate() {
  if (controller) return;
  const body = openaiBody();
  const n = Number.isInteger(body.n) && body.n > 0 && body.n <= settings.max_n ? body.n : 1;
  const columns = makeColumns(n, body.prompt);
  const t = { start: performance.now(), first: null, last: null, tokens: 0 };
  controller = new AbortController();
  showError("");
  setState("streaming", "Generating…");
  updateStats(t);
  let answered = false;
  let finished = false;
  try {
    const r = await fetch("/openai/v1/completions", { method: "POST", headers: headers(),
                                                     body: toJSON(body), signal: controller.signal });
    if (!r.ok) throw new Error(await responseError(r));
    answered = true;
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        buffer = buffer.slice(cut + 2);
        if (data === "[DONE]") { finished = true; continue; }
        if (data) onEvent(JSON.parse(data), columns, t);
      }
      updateStats(t);
    }
    if (!finished) throw new Error("the stream ended before it finished ([DONE] missing)");
    setState("done", "Done");
  } catch (e) {
    if (e.name === "AbortError") {
      setState("stopped", "Stopped");
    } else {
      // A connection cut mid-stream (the server failed after answering 200) is a TypeError.
      showError(answered && e instanceof TypeError ? `The stream broke: ${e.message}` : e.message);
      setState("error", "Error");
    }
  } finally {
    controller.abort(); // a stream left on an error (a bad event, no [DONE]) is cancelled
    controller = null;
    updateStats(t);
    $("generate").disabled = false;
    $("stop").disabled = true;
    $("outputs").removeAttribute("aria-busy");
  }
}

function onEvent(event, columns, t) {
  if (event.error) throw new Error(errorText(event) || JSON.stringify(event.error));
  if (event.usage) {
    t.tokens = event.usage.completion_tokens;
    t.prompt = event.usage.prompt_tokens;
    t.cached = (event.usage.prompt_tokens_details || {}).cached_tokens || 0;
  }
  for (const choice of event.choices || []) {
    const column = columns[choice.index];
    if (!column) continue;
    if (choice.text) {
      const now = performance.now();
      if (t.first === null) t.first = now;
      t.last = now;
      t.tokens += 1; // one event a token, but for characters split across tokens
      column.text.append(choice.text);
    }
    if (choice.finish_reason) column.finish.textContent = `Finished: ${choice.finish_reason}`;
  }
}

function makeColumns(n, prompt) {
  const outputs = $("outputs");
  outputs.replaceChildren();
  outputs.setAttribute("aria-busy", "true");
  const columns = [];
  for (let i = 0; i < n; i++) {
    const article = document.createElement("article");
    article.className = "sample";
    const title = document.createElement("h2");
    title.textContent = `Sample ${i + 1}`;
    const box = document.createElement("div");
    box.className = "text";
    const shown = document.createElement("span");
    shown.className = "prompt";
    shown.textContent = prompt;
    const text = document.createElement("span");
    text.className = "generated";
    box.append(shown, text);
    const finish = document.createElement("p");
    finish.className = "finish";
    article.append(title, box, finish);
    outputs.append(article);
    columns.push({ text, finish });
  }
  return columns;
}

function updateStats(t) {
  $("ttft").textContent = t.first === null ? "–" : `${Math.round(t.first - t.start)} ms`;
  const seconds = t.first === null ? 0 : ((controller ? performance.now() : t.last) - t.first) / 1000;
  $("tps").textContent = t.tokens > 1 && seconds > 0 ? ((t.tokens - 1) / seconds).toFixed(1) : "–";
  $("ntokens").textContent = String(t.tokens);
  // The prefix cache's hit rate for this prompt: tokens not read again
  $("cached").textContent = t.prompt ? `${Math.round(100 * t.cached / t.prompt)}% of ${t.prompt}` : "–";
}

function setState(state, label) {
  $("status").dataset.state = state;
  $("status").textContent = label;
  $("generate").disabled = state === "streaming";
  $("stop").disabled = state !== "streaming";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function responseError(r) {
  const text = await r.text();
  let message = "";
  try { message = errorText(JSON.parse(text)); } catch { message = text.slice(0, 500); }
  return `Server answered ${r.status}: ${message || r.statusText}`;
}

function errorText(body) {
  const e = body && body.error;
  if (typeof e === "string") return e;
  if (e && typeof e.message === "string") return e.message;
  return body && typeof body.detail === "string" ? body.detail : "";
}

// ---- copy as curl ----

const shellQuote = (s) => `'${s.replace(/'/g, "'\\''")}'`;

function curlText() {
  const auth = $("api_key").value.trim()
    ? ` \\\n  -H "Authorization: Bearer $GPT2SERVE_API_KEY"` : "";
  const json = " \\\n  -H 'Content-Type: application/json' \\\n  -d ";
  const v1 = `${location.origin}/v1/models/${encodeURIComponent(modelName || "MODEL")}:predict`;
  const openai = `${location.origin}/openai/v1/completions`;
  return [auth ? "# with the API key in $GPT2SERVE_API_KEY\n" : "",
    `# KServe V1\ncurl -s ${shellQuote(v1)}${auth}${json}${shellQuote(toJSON(v1Body()))}\n\n`,
    `# OpenAI completions, streamed\ncurl -sN ${shellQuote(openai)}${auth}${json}`,
    `${shellQuote(toJSON(openaiBody()))}\n`].join("");
}

async function showCurl() {
  const text = curlText();
  $("curl-text").textContent = text;
  $("curl-box").hidden = false;
  let copied = false;
  try { await navigator.clipboard.writeText(text); copied = true; } catch { /* not allowed */ }
  $("curl").textContent = copied ? "Copied" : "Copy as curl";
  if (!copied) getSelection().selectAllChildren($("curl-text")); // ready for Ctrl+C
  setTimeout(() => { $("curl").textContent = "Copy as curl"; }, 1500);
}

setUp();
