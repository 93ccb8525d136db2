// gpt2serve playground: streams /openai/v1/completions (server-sent events) into one column per
// sample. Plain browser JS, no dependencies. The server puts its limits and defaults in #settings.
"use strict";

const settings = JSON.parse(document.getElementById("settings").textContent);
const $ = (id) => document.getElementById(id);
const KEY_STORE = "gpt2serve.apiKey";
const NUMBERS = ["max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "n"];
let modelName = null;
let maxTokensDefault = settings.defaults.max_tokens; // below the picked model's context
let maxTokensTyped = false; // else a run asks for the default or the room its prompt leaves
let controller = null;
let modelsListed = Promise.resolve(); // the latest /openai/v1/models call, which a run awaits
let modelsAsked = 0; // calls made: only the latest one's answer is shown

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
  // No maxLength: the browser would cut a longer paste without a word. The server refuses it,
  // saying how long it is and its limit.
  $("prompt-hint").textContent = `up to ${settings.max_prompt_chars} characters`;
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
  // Ctrl/Cmd+Enter from any field, the settings and the key included
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
  // (emptied again, the field is untyped: the default or the room the prompt leaves)
  $("max_tokens").addEventListener("input", (e) => {
    maxTokensTyped = e.target.value.trim() !== "" || e.target.validity.badInput;
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("curl").addEventListener("click", showCurl);
  $("model-picker").addEventListener("change", pickModel);
  loadModel();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  // fetch refuses a header past Latin-1 (its TypeError read as a server out of reach), and
  // sends Latin-1 as one byte a character, where the server compares the key's UTF-8 bytes
  const unsendable = key.match(/[^\x20-\x7e\t]/);
  if (unsendable) throw new Error(`API key: ${unsendable[0]} cannot be sent from this page`);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The server's models, from /openai/v1/models, in the picker; each has its own context.
let models = [];

function loadModel() {
  modelsListed = listModels(++modelsAsked);
}

async function listModels(asked) {
  const picker = $("model-picker");
  try {
    const r = await send("/openai/v1/models", { headers: headers() });
    const answer = r.ok ? (await r.json()).data : new Error(await responseError(r));
    if (asked !== modelsAsked) return; // a key typed since: its call's answer counts
    if (answer instanceof Error) throw answer;
    models = answer;
    if (!models.length) throw new Error("the server has no model to serve");
    if ($("error").dataset.status === "401") showError(""); // the key typed since works
    const keep = models.some((m) => m.id === modelName) ? modelName : models[0].id;
    picker.replaceChildren(...models.map((m) => new Option(m.id, m.id, false, m.id === keep)));
    picker.disabled = controller !== null || models.length < 2; // (not while a run streams)
    pickModel();
  } catch (e) {
    if (asked !== modelsAsked) return;
    modelName = null;
    models = [];
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
  $("max_tokens-hint").textContent = `[${settings.limits.max_tokens[0]}, ${context - 1}], `
    + `default ${maxTokensDefault} or the room the prompt leaves`;
  $("model").textContent = `Model: ${modelName} · context ${context} tokens`;
}

// The models the latest key lists, once listed (a key typed meanwhile: its list), or an
// AbortError once Stop is pressed.
async function modelsFor(signal) {
  const stopped = new Promise((_, reject) => signal.addEventListener(
    "abort", () => reject(new DOMException("stopped", "AbortError")), { once: true }));
  let listed;
  do {
    listed = modelsListed;
    await Promise.race([listed, stopped]);
  } while (listed !== modelsListed);
}

// ---- the request, as the controls say ----

function params() {
  const p = {};
  for (const id of NUMBERS) {
    const input = $(id);
    const raw = input.value.trim();
    // What is typed but is no number reads as "" (badInput), as an empty field does: say so
    // rather than send the default in its place; 1e400 is Infinity, which JSON writes as null.
    if (input.validity.badInput || (raw !== "" && !Number.isFinite(Number(raw)))) {
      throw new Error(`${input.labels[0].textContent}: not a number`);
    }
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

// The same request for KServe's V1 route, from the OpenAI one's body
function v1Body(openai) {
  const { model, prompt, max_tokens, stream, stream_options, ...rest } = openai;
  return { instances: [{ prompt, max_new_tokens: max_tokens, ...rest }] };
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
  controller = new AbortController();
  const t = { start: performance.now(), first: null, last: null, tokens: 0 };
  showError("");
  setState("streaming", "Generating…");
  $("curl-box").hidden = true; // (it showed the last request's parameters, not this one's)
  $("outputs").setAttribute("aria-busy", "true");
  let columns = [];
  try {
    await modelsFor(controller.signal); // a key typed just before: the models it lists first
    const body = openaiBody();
    if (!maxTokensTyped) body.max_tokens = await roomFor(body, controller.signal);
    const n = Number.isInteger(body.n) && body.n > 0 && body.n <= settings.max_n ? body.n : 1;
    t.start = performance.now();
    updateStats(t);
    const r = await send("/openai/v1/completions", { method: "POST", headers: headers(),
                                                     body: toJSON(body), signal: controller.signal });
    if (!r.ok) throw new ServerError(r.status, await responseError(r));
    // The samples shown stay until this run's begin: a refusal shows why beside them.
    columns = makeColumns(n, body.prompt);
    const finished = await readEvents(r.body, (data) => onEvent(data, columns, t),
                                      () => updateStats(t));
    if (!finished) throw new Error("the stream ended before it finished ([DONE] missing)");
    setState("done", "Done");
  } catch (e) {
    if (e.name === "AbortError") {
      setState("stopped", "Stopped");
      for (const column of columns) { // (a sample cut short said nothing at its end)
        if (!column.finish.textContent) column.finish.textContent = "Finished: stopped";
      }
    } else {
      showError(e.message, e.status);
      setState("error", "Error");
    }
  } finally {
    controller.abort(); // a stream left on an error (a bad event, no [DONE]) is cancelled
    controller = null;
    updateStats(t);
    $("outputs").removeAttribute("aria-busy");
  }
}

// Reads server-sent events until [DONE] (true) or the stream's end (false), handing each
// event's data to onData. Lines end in \n, \r\n or \r, as the SSE spec allows; a \r\n may
// come split across two reads, and counts once.
async function readEvents(body, onData, afterRead) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let cr = false; // the last read ended in \r: a \n that starts the next one is its pair
  for (;;) {
    let read;
    try {
      read = await reader.read();
    } catch (e) { // the connection cut mid-stream (the server failed after answering 200)
      if (e.name === "AbortError") throw e;
      throw new Error(`The connection to the server broke mid-stream (${e.message})`);
    }
    if (read.done) return false;
    let text = read.value;
    if (cr && text.startsWith("\n")) text = text.slice(1);
    if (read.value) cr = read.value.endsWith("\r");
    buffer += text.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      buffer = buffer.slice(cut + 2);
      if (data === "[DONE]") return true;
      if (data) onData(data);
    }
    afterRead();
  }
}

function onEvent(data, columns, t) {
  let event = null;
  try { event = JSON.parse(data); } catch { /* said below */ }
  if (!event || typeof event !== "object") {
    throw new Error(`the server sent an event that is not a JSON object: ${data.slice(0, 200)}`);
  }
  if (event.error) throw new Error(errorText(event) || JSON.stringify(event.error));
  if (event.usage) {
    t.tokens = event.usage.completion_tokens;
    t.prompt = event.usage.prompt_tokens;
    t.cached = (event.usage.prompt_tokens_details || {}).cached_tokens || 0;
  }
  for (const choice of Array.isArray(event.choices) ? event.choices : []) {
    const column = choice && Number.isInteger(choice.index) ? columns[choice.index] : undefined;
    if (!column) continue;
    if (typeof choice.text === "string" && choice.text) {
      const now = performance.now();
      if (t.first === null) t.first = now;
      t.last = now;
      t.tokens += 1; // one event a token, but for characters split across tokens
      column.text.append(choice.text);
    }
    if (choice.finish_reason) column.finish.textContent = `Finished: ${choice.finish_reason}`;
  }
}

// Tokens the prompt leaves in the model's context, at most the run's default: the default
// alone (up to the context, less one) was refused for any prompt of two tokens or more. On
// a refusal the run's own request says why.
async function roomFor(body, signal) {
  const asked = JSON.stringify({ model: body.model, prompt: body.prompt });
  const r = await send("/tokenize", { method: "POST", headers: headers(), body: asked, signal });
  let answer = {};
  try { answer = r.ok ? await r.json() : {}; } catch { /* not JSON: as if refused */ }
  const { count, max_model_len: context } = answer;
  if (!Number.isInteger(count) || !Number.isInteger(context)) return body.max_tokens;
  return Math.max(1, Math.min(body.max_tokens, context - Math.max(count, 1)));
}

// fetch, with a failure to connect said as one ("Failed to fetch" said nothing of where)
async function send(url, options) {
  try {
    return await fetch(url, options);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error(`Cannot reach the server at ${location.origin} (${e.message})`);
  }
}

class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function makeColumns(n, prompt) {
  const outputs = $("outputs");
  outputs.replaceChildren();
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
  // The model stays the one the run asks for (picked meanwhile, another's text was shown
  // under its name)
  $("model-picker").disabled = state === "streaming" || models.length < 2;
  // One of the two buttons is disabled: if it has the focus (pressed from the keyboard), the
  // focus goes to the other rather than to the page's start.
  const streaming = state === "streaming";
  const [off, on] = streaming ? ["generate", "stop"] : ["stop", "generate"];
  $(on).disabled = false;
  if (document.activeElement === $(off)) $(on).focus();
  $(off).disabled = true;
}

function showError(message, status) {
  curlError = false;
  $("error").textContent = message;
  $("error").hidden = !message;
  $("error").dataset.status = status || "";
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

// The run's requests: max new tokens as a run would ask for it (the room the prompt leaves)
async function curlText() {
  const body = openaiBody();
  if (!maxTokensTyped) body.max_tokens = await roomFor(body);
  const auth = $("api_key").value.trim()
    ? ` \\\n  -H "Authorization: Bearer $GPT2SERVE_API_KEY"` : "";
  const json = " \\\n  -H 'Content-Type: application/json' \\\n  -d ";
  const v1 = `${location.origin}/v1/models/${encodeURIComponent(modelName || "MODEL")}:predict`;
  const openai = `${location.origin}/openai/v1/completions`;
  return [auth ? "# with the API key in $GPT2SERVE_API_KEY\n" : "",
    `# KServe V1\ncurl -s ${shellQuote(v1)}${auth}${json}${shellQuote(toJSON(v1Body(body)))}\n\n`,
    `# OpenAI completions, streamed\ncurl -sN ${shellQuote(openai)}${auth}${json}`,
    `${shellQuote(toJSON(body))}\n`].join("");
}

let curlError = false; // the error shown is curl's own, which a good request clears

async function showCurl() {
  let text;
  try {
    text = await curlText();
  } catch (e) { // a field that is not a number, a server out of reach
    if (controller) return; // (a run began meanwhile: its own errors are shown)
    showError(e.message);
    curlError = true;
    return;
  }
  if (controller) return; // a run began while the prompt was counted: the box stays hidden
  if (curlError) showError("");
  $("curl-text").textContent = text;
  $("curl-box").hidden = false;
  let copied = false;
  try { await navigator.clipboard.writeText(text); copied = true; } catch { /* not allowed */ }
  $("curl").textContent = copied ? "Copied" : "Copy as curl";
  if (!copied) getSelection().selectAllChildren($("curl-text")); // ready for Ctrl+C
  setTimeout(() => { $("curl").textContent = "Copy as curl"; }, 1500);
}

setUp();
