// The decoding explorer: one prompt, several decoding settings side by side, each streamed from the
// server's OpenAI-compatible HTTP API (same origin) in the same batch, every token coloured by its
// probability, with its top alternatives on hover or click, and the whole output's log-probability.

const TOP_N = 5;
// Sampled presets carry a fixed seed so that a rerun repeats them.
const PRESETS = {
  "greedy": {temperature: 0},
  "beam 5": {temperature: 0, num_beams: 5, no_repeat_ngram_size: 2, n: 5},
  "temperature 0.5": {temperature: 0.5, seed: 1},
  "temperature 2.0": {temperature: 2.0, seed: 1},
  "top-k 50": {temperature: 1.0, top_k: 50, seed: 1},
  "top-p 0.9": {temperature: 1.0, top_p: 0.9, seed: 1},
};
// In the menu only (a page opens six columns: a browser runs six requests per host at once).
// Constrained decoding: the tokens keep their raw probabilities, so a forced token shows how
// unlikely the model found it.
const MENU_PRESETS = {
  "regex: a date": {temperature: 1.0, seed: 1, guided_regex: "(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"},
  "JSON object": {temperature: 0, response_format: {type: "json_object"}},
  "choice": {temperature: 0, guided_choice: ["yes", "no", "maybe"]},
  "beam 3, JSON object": {temperature: 0, num_beams: 3, n: 3, response_format: {type: "json_object"}},
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const percent = (p) => (p >= 0.001 ? `${(100 * p).toFixed(1)} %` : p.toExponential(1));
const formatParams = (params) =>
  `{${Object.entries(params).map(([key, value]) => `"${key}": ${JSON.stringify(value)}`).join(", ")}}`;

// ---- the columns ----

function addColumn(name, params) {
  const column = $("#column-template").content.firstElementChild.cloneNode(true);
  const nameInput = $(".name", column);
  nameInput.value = column.dataset.setting = name;
  nameInput.addEventListener("input", () => { column.dataset.setting = nameInput.value; });
  $(".params", column).value = formatParams(params);
  $(".remove", column).addEventListener("click", () => column.remove());
  $("#columns").append(column);
}

function uniqueName(name) {
  const taken = new Set([...document.querySelectorAll(".column")].map((c) => c.dataset.setting));
  let candidate = name;
  for (let i = 2; taken.has(candidate); i++) candidate = `${name} (${i})`;
  return candidate;
}

function setStatus(column, text) {
  const status = $(".status", column);
  status.textContent = text;
  status.classList.toggle("error", text.startsWith("error"));
}

function clearColumn(column) {
  setStatus(column, "");
  for (const part of [".best-so-far", ".outputs", ".hypotheses", ".sequence-logprob", ".usage", ".details"]) {
    $(part, column).replaceChildren();
  }
}

// ---- talking to the server ----

function headers(token) {
  const result = {"Content-Type": "application/json"};
  if (token) result.Authorization = `Bearer ${token}`;
  return result;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return `HTTP ${response.status} ${text.slice(0, 200)}`;
  }
}

async function send(path, token, body) {
  const init = body === undefined ? {headers: headers(token)}
    : {method: "POST", headers: headers(token), body: JSON.stringify(body)};
  const response = await fetch(path, init);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

async function modelName(token) {
  const models = await (await send("/v1/models", token)).json();
  $("#model").textContent = models.data[0].id;
  return models.data[0].id;
}

// Server-sent events of a POST response: each `data:` payload, parsed, until `[DONE]`.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) throw new Error("the stream ended before [DONE]");
      buffer += value;
      let boundary;
      while ((boundary = /\r?\n\r?\n/.exec(buffer))) {
        const data = buffer.slice(0, boundary.index).split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        buffer = buffer.slice(boundary.index + boundary[0].length);
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function readInputs() {
  return {
    chat: $('input[name="mode"]:checked').value === "chat",
    prompt: $("#prompt").value,
    maxTokens: Number($("#max-tokens").value),
    token: $("#token").value.trim(),
  };
}

const promptOf = (run) => (run.chat ? {messages: [{role: "user", content: run.prompt}]} : {prompt: run.prompt});

function requestBody(run, params, beam) {
  const body = {
    model: run.model, ...promptOf(run), max_tokens: run.maxTokens,
    stream: true, stream_options: {include_usage: true}, return_token_ids: true,
  };
  // Beam requests refuse logprobs: their output is scored once it is done instead.
  if (!beam) Object.assign(body, run.chat ? {logprobs: true, top_logprobs: TOP_N} : {logprobs: TOP_N});
  return {...body, ...params};
}

// ---- one column's run ----

async function runColumn(column, run) {
  let params;
  try {
    params = JSON.parse($(".params", column).value || "{}");
  } catch (error) {
    setStatus(column, `error: the parameters are not JSON (${error.message})`);
    return;
  }
  const state = {column, chat: run.chat, beam: (params.num_beams ?? 1) > 1, sequences: new Map(), hypotheses: []};
  setStatus(column, "running…");
  try {
    const path = run.chat ? "/v1/chat/completions" : "/v1/completions";
    const response = await send(path, run.token, requestBody(run, params, state.beam));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      onChunk(state, chunk);
    }
  } catch (error) {
    setStatus(column, `error: ${error.message}`);
    return;
  }
  setStatus(column, "done");
  await showSequenceLogprob(state, run);
}

function onChunk(state, chunk) {
  const {column} = state;
  if (chunk.usage) {
    $(".usage", column).textContent =
      `· ${chunk.usage.completion_tokens} tokens after ${chunk.usage.prompt_tokens} of prompt`;
  }
  if (chunk.best_so_far) $(".best-so-far", column).textContent = chunk.best_so_far.text;
  for (const choice of chunk.choices ?? []) {
    if (state.beam) addHypothesis(state, choice);
    else addTokens(state, choice);
  }
}

function addHypothesis(state, choice) {
  const text = state.chat ? choice.delta?.content ?? "" : choice.text ?? "";
  state.hypotheses[choice.index] = {text, ids: choice.token_ids ?? []};
  const item = el("li", {className: "hypothesis", title: `finish: ${choice.finish_reason}`},
    el("span", {className: "text", textContent: text}), " ",
    el("span", {className: "score", title: "beam score: length-penalised sum of log-probabilities",
                textContent: choice.score.toFixed(4)}));
  item.dataset.index = choice.index;
  const list = $(".hypotheses", state.column);
  const after = [...list.children].find((other) => Number(other.dataset.index) > choice.index);
  list.insertBefore(item, after ?? null);
  // The final winner may differ from the last best so far.
  if (choice.index === 0) $(".best-so-far", state.column).textContent = text;
}

function sequence(state, index) {
  if (!state.sequences.has(index)) {
    const node = el("div", {className: "output"});
    node.dataset.index = index;
    const outputs = $(".outputs", state.column);
    const after = [...outputs.children].find((other) => Number(other.dataset.index) > index);
    outputs.insertBefore(node, after ?? null);
    state.sequences.set(index, {node, ids: []});
  }
  return state.sequences.get(index);
}

// One {text, logprob, top: [{text, logprob}]} per token, from either endpoint's logprobs.
function chatTokens(logprobs) {
  return (logprobs?.content ?? []).map((t) => ({
    text: t.token, logprob: t.logprob,
    top: (t.top_logprobs ?? []).map((alt) => ({text: alt.token, logprob: alt.logprob})),
  }));
}

function completionTokens(logprobs) {
  return (logprobs?.tokens ?? []).map((text, i) => ({
    text, logprob: logprobs.token_logprobs[i],
    top: Object.entries(logprobs.top_logprobs?.[i] ?? {}).map(([alt, logprob]) => ({text: alt, logprob})),
  }));
}

function addTokens(state, choice) {
  const output = sequence(state, choice.index ?? 0);
  const ids = choice.token_ids ?? [];
  const tokens = state.chat ? chatTokens(choice.logprobs) : completionTokens(choice.logprobs);
  if (choice.finish_reason) output.node.title = `finish: ${choice.finish_reason}`;
  if (tokens.length === 0) {
    // Logprobs turned off in the column's parameters: plain text.
    output.node.append(state.chat ? choice.delta?.content ?? "" : choice.text ?? "");
  }
  tokens.forEach((token, i) => {
    output.node.append(tokenSpan(state.column, token, output.ids.length + i + 1, ids[i]));
  });
  output.ids.push(...ids);
}

function tokenSpan(column, token, step, id) {
  const p = Math.exp(token.logprob);
  const span = el("span", {className: "token", textContent: token.text, title: `step ${step}: p = ${percent(p)}`});
  span.dataset.logprob = token.logprob;
  if (id !== undefined) span.dataset.tokenId = id;
  span.style.setProperty("--p", p);
  const show = () => showAlternatives(column, span, token, step);
  span.addEventListener("mouseenter", show);
  span.addEventListener("click", show);
  return span;
}

function showAlternatives(column, span, token, step) {
  column.querySelector(".token.selected")?.classList.remove("selected");
  span.classList.add("selected");
  const rows = [...token.top].sort((a, b) => b.logprob - a.logprob).map((alt, rank) => {
    const prob = Math.exp(alt.logprob);
    const row = el("tr", {className: "alternative"},
      el("td", {textContent: rank + 1}),
      el("td", {textContent: JSON.stringify(alt.text)}),
      el("td", {}, el("span", {className: "bar", style: `width: ${(4 * prob).toFixed(2)}em`})),
      el("td", {textContent: percent(prob)}));
    row.dataset.prob = prob;
    row.classList.toggle("chosen", alt.text === token.text);
    return row;
  });
  const caption = `step ${step}: ${JSON.stringify(token.text)} chosen, p = ${percent(Math.exp(token.logprob))}`;
  const table = el("table", {className: "alternatives"}, el("caption", {textContent: caption}), el("tbody", {}, ...rows));
  $(".details", column).replaceChildren(table);
}

async function showSequenceLogprob(state, run) {
  const ids = state.beam ? state.hypotheses[0]?.ids : state.sequences.get(0)?.ids;
  if (!ids?.length) return;
  const target = $(".sequence-logprob", state.column);
  target.title = "log-probability of the (first) output under the model, from POST /v1/score";
  try {
    const body = {model: run.model, ...promptOf(run), continuation_ids: ids};
    const score = await (await send("/v1/score", run.token, body)).json();
    target.textContent = score.total_logprob.toFixed(3);
  } catch (error) {
    target.textContent = `error: ${error.message}`;
  }
}

// ---- the page ----

async function compare(event) {
  event.preventDefault();
  const button = $("#compare");
  const columns = [...document.querySelectorAll(".column")];
  const run = readInputs();
  button.disabled = true;
  columns.forEach(clearColumn);
  try {
    run.model = await modelName(run.token);
    // Every column at once: they share the server's batch.
    await Promise.all(columns.map((column) => runColumn(column, run)));
  } catch (error) {
    columns.forEach((column) => setStatus(column, `error: ${error.message}`));
  } finally {
    button.disabled = false;
  }
}

for (const [name, params] of Object.entries(PRESETS)) addColumn(name, params);
for (const name of Object.keys({...PRESETS, ...MENU_PRESETS})) {
  $("#preset").append(el("option", {value: name, textContent: name}));
}
$("#add-column").addEventListener("click", () => {
  const name = $("#preset").value;
  addColumn(uniqueName(name), PRESETS[name] ?? MENU_PRESETS[name]);
});
$("#inputs").addEventListener("submit", compare);
modelName("").catch(() => {});  // the header's model name; a server with tokens answers once one is given
