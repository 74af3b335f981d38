// The lorag playground: chat, compare, knowledge and adapters over the daemon's public
// HTTP API, nothing else. Plain ES modules, no framework and no build step: four screens
// do not need a bundle, and the file the browser runs is the file in the repository.
// The API key lives in sessionStorage (gone with the tab) and travels only in the
// Authorization header.

const $ = (id) => document.getElementById(id);
const KEY = "lorag.apiKey";
const state = {server: null, models: [], namespaces: [], chat: [], controller: null,
               compare: []};

// ---- the API ----

class ApiError extends Error {}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch { /* not JSON: the status line says it */ }
  return new ApiError(message);
}

async function api(path, {method = "GET", body, form} = {}) {
  const init = {method, headers: headers(body ? {"Content-Type": "application/json"} : {})};
  if (body) init.body = JSON.stringify(body);
  if (form) init.body = form;
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// A streamed chat completion: calls onText with each piece, returns what the reply
// carried (text, usage, sources, rag) and its timings. Aborting `signal` closes the
// connection, and the daemon cancels the request.
async function streamChat(body, signal, onText) {
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", {
    method: "POST", signal, headers: headers({"Content-Type": "application/json"}),
    body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}}),
  });
  if (!response.ok) throw await failure(response);
  const reply = {text: "", usage: null, sources: null, rag: null, declined: false,
                 ttft: null, finish: null};
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.replace(/^data: /, "");
      if (!event.startsWith("data: ") || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message);
      if (chunk.sources) { reply.sources = chunk.sources; reply.rag = chunk.rag; }
      if (chunk.rag && "declined" in chunk.rag) reply.declined = chunk.rag.declined;
      if (chunk.usage) reply.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (reply.ttft === null) reply.ttft = performance.now() - started;
          reply.text += piece;
          onText(reply.text);
        }
        if (choice.finish_reason) reply.finish = choice.finish_reason;
      }
    }
  }
  reply.latency = performance.now() - started;
  return reply;
}

// ---- small DOM helpers ----

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

const NOT_CONNECTED = new ApiError("not connected: enter an API key and press Connect");

function showError(error) {
  const box = $("error");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = error instanceof ApiError ? error.message : String(error.message || error);
  box.hidden = false;
}

function option(value, label = value) {
  return el("option", {value, textContent: label});
}

function fillSelect(select, options, keep = true) {
  const previous = select.value;
  select.replaceChildren(...options);
  if (keep && [...select.options].some((o) => o.value === previous)) select.value = previous;
}

// ---- connecting: the key, then what the server offers ----

async function connect() {
  showError(null);
  try {
    state.server = await api("/v1/server");
  } catch (error) {
    state.server = null;
    $("whoami").textContent = "Not connected.";
    showError(error);
    return false;
  }
  const {caller, defaults, rag, model} = state.server;
  $("whoami").textContent = `Connected to ${model} as tenant ${caller.tenant}` +
    (caller.admin ? " (admin)." : " (user key).");
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    $(name).value = defaults[name] ?? "";
  }
  $("rag-top-k").value = rag.top_k;
  $("rag-top-k").max = rag.max_top_k;
  fillSelect($("rag-mode"), rag.modes.map((mode) => option(mode)), false);
  $("rag-mode").value = rag.mode;
  $("file-types").textContent = state.server.ingest_file_types.join(" ");
  $("ingest-files").accept = state.server.ingest_file_types.join(",");
  $("format-settings").hidden = !state.server.structured_outputs.includes("json_schema");
  await Promise.all([loadModels(), loadNamespaces()]);
  buildColumns();
  return true;
}

async function loadModels() {
  const {data} = await api("/v1/models");
  state.models = data;
  const options = () => data.map((m) => option(m.id, m.parent ? `${m.id} (adapter` +
    (m.owned_by === state.server.caller.tenant ? ")" : `, shared by ${m.owned_by})`)
    : `${m.id} (base)`));
  fillSelect($("chat-model"), options());
  fillSelect($("rag-rerank"), rerankOptions());
  for (const select of document.querySelectorAll(".column-model")) fillSelect(select, options());
  for (const select of document.querySelectorAll(".composition-adapter")) {
    fillSelect(select, adapterOptions());
  }
}

function adapterOptions() {
  return state.models.filter((m) => m.parent).map((m) => option(m.id));
}

// the reranker choices: the namespace's default, none, late interaction on the embedder
// (named by the embedding model), or a relevance adapter
const RERANK_OFF = "off";
function rerankOptions() {
  const embedder = state.server.embedding_model;
  return [option("", "namespace default"), option(RERANK_OFF, "off"),
          option(embedder, `${embedder} (sentences)`), ...adapterOptions()];
}

async function loadNamespaces() {
  const {data} = await api("/v1/namespaces");
  state.namespaces = data;
  const options = () => data.length ? data.map((n) => option(n.name))
    : [option("", "(no namespaces yet)")];
  fillSelect($("rag-namespace"), options());
  for (const select of document.querySelectorAll(".column-namespace")) {
    fillSelect(select, options());
  }
  $("namespace-names").replaceChildren(...data.map((n) => option(n.name)));
  $("namespace-rows").replaceChildren(...data.map((n) => el("tr", {},
    el("td", {textContent: n.name}), el("td", {textContent: n.owner}),
    el("td", {textContent: n.shared ? "yes" : "no"}),
    el("td", {textContent: n.documents}), el("td", {textContent: n.chunks}))));
}

// ---- chat ----

function sampling() {
  const body = {};
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = Number(value);
  }
  const schema = $("json-schema").value.trim();
  if (schema && !$("format-settings").hidden) {
    let parsed;
    try { parsed = JSON.parse(schema); } catch (error) {
      throw new ApiError(`response format: the JSON schema is not valid JSON (${error.message})`);
    }
    body.response_format = {type: "json_schema",
                            json_schema: {name: "playground", schema: parsed}};
  }
  return body;
}

function ragOptions(on, namespace) {
  if (!on) return {};
  if (!namespace) throw new ApiError("retrieval: choose a namespace (add documents under Knowledge)");
  const rag = {namespace, top_k: Number($("rag-top-k").value), mode: $("rag-mode").value};
  const rerank = $("rag-rerank").value;  // "": the namespace's default
  if (rerank === RERANK_OFF) rag.rerank = false;
  else if (rerank) rag.rerank_model = rerank;
  return {rag};
}

function composition() {
  const rows = [...document.querySelectorAll("#composition-rows li")];
  if (!rows.length) return null;
  return rows.map((row) => ({name: row.querySelector("select").value,
                             weight: Number(row.querySelector("input").value)}));
}

function addCompositionRow() {
  const index = $("composition-rows").children.length + 1;
  const select = el("select", {class: "composition-adapter", id: `composition-adapter-${index}`},
                    ...adapterOptions());
  const weight = el("input", {type: "number", step: "0.1", value: "1",
                              id: `composition-weight-${index}`});
  const remove = el("button", {type: "button", textContent: "Remove",
                               onclick: () => row.remove()});
  const row = el("li", {},
    el("label", {htmlFor: select.id, textContent: "Adapter"}), select,
    el("label", {htmlFor: weight.id, textContent: "Weight"}), weight, remove);
  $("composition-rows").append(row);
  select.focus();
}

function sourcesList(sources) {
  if (!sources || !sources.length) return null;
  return el("details", {class: "sources", open: true},
    el("summary", {textContent: `Sources (${sources.length})`}),
    el("ol", {}, ...sources.map((source) => el("li", {class: "source"},
      el("details", {},
        el("summary", {},
          el("strong", {textContent: source.document_id}),
          ` score ${Number(source.score).toFixed(3)}`,
          Object.keys(source.metadata || {}).length
            ? el("span", {class: "muted", textContent: " " + JSON.stringify(source.metadata)})
            : null),
        el("blockquote", {class: "passage", textContent: source.text}))))));
}

function usageLine(reply) {
  const parts = [];
  if (reply.latency !== undefined) parts.push(`${Math.round(reply.latency)} ms`);
  if (reply.ttft !== null && reply.ttft !== undefined) {
    parts.push(`first token ${Math.round(reply.ttft)} ms`);
  }
  if (reply.usage) {
    parts.push(`${reply.usage.prompt_tokens} prompt + ${reply.usage.completion_tokens} completion tokens`);
  }
  if (reply.finish) parts.push(`finish: ${reply.finish}`);
  const timing = reply.rag && reply.rag.timing;
  if (timing) {
    parts.push(`search ${Math.round(timing.search_ms)} ms`);
    if (timing.rerank_ms !== null) {
      parts.push(`rerank ${Math.round(timing.rerank_ms)} ms (${reply.rag.reranker})`);
    }
  }
  return parts.join(" · ");
}

// A grounded answer that declined (the daemon says so in the stream's last chunk:
// rag.declined) is marked as such.
function declinedNote(reply) {
  return reply.declined
    ? el("p", {class: "declined", textContent:
      "Declined: the model says the retrieved passages do not hold the answer."})
    : null;
}

function renderMessage(role, text) {
  const body = el("div", {class: "text", textContent: text});
  const item = el("li", {class: `message ${role}`},
                  el("span", {class: "role", textContent: role}), body);
  $("messages").append(item);
  item.scrollIntoView({block: "end"});
  return {item, body};
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.controller) return;
  if (!state.server) { showError(NOT_CONNECTED); return; }
  showError(null);
  let body;
  try {
    const adapters = composition();
    body = {model: adapters ? state.server.model : $("chat-model").value,
            messages: [...state.chat, {role: "user", content: text}],
            ...(adapters ? {adapters} : {}), ...sampling(),
            ...ragOptions($("rag-on").checked, $("rag-namespace").value)};
  } catch (error) { showError(error); return; }
  state.chat.push({role: "user", content: text});
  renderMessage("user", text);
  $("chat-input").value = "";
  const {item, body: answer} = renderMessage("assistant", "");
  item.setAttribute("aria-busy", "true");
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const reply = await streamChat(body, state.controller.signal, (all) => {
      answer.textContent = all;
    });
    state.chat.push({role: "assistant", content: reply.text});
    const note = declinedNote(reply);
    if (note) item.append(note);
    item.append(el("p", {class: "meta", textContent: usageLine(reply)}));
    const sources = sourcesList(reply.sources);
    if (sources) item.append(sources);
  } catch (error) {
    if (error.name === "AbortError") {
      item.append(el("p", {class: "meta", textContent: "stopped"}));
      state.chat.push({role: "assistant", content: answer.textContent});
    } else {
      item.remove();
      state.chat.pop();
      showError(error);
    }
  } finally {
    item.removeAttribute("aria-busy");
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// ---- compare: one question, up to four columns streamed at once ----

const PRESETS = [{rag: false, adapter: false}, {rag: true, adapter: false},
                 {rag: false, adapter: true}, {rag: true, adapter: true}];

function buildColumns() {
  const count = Number($("compare-count").value);
  const adapters = state.models.filter((m) => m.parent);
  const columns = [];
  for (let i = 0; i < count; i++) {
    const preset = PRESETS[i];
    const id = (name) => `column-${i + 1}-${name}`;
    const model = el("select", {id: id("model"), class: "column-model"},
      ...state.models.map((m) => option(m.id)));
    if (preset.adapter && adapters.length) model.value = adapters[0].id;
    const rag = el("input", {type: "checkbox", id: id("rag"), checked: preset.rag});
    const namespace = el("select", {id: id("namespace"), class: "column-namespace"},
      ...(state.namespaces.length ? state.namespaces.map((n) => option(n.name))
        : [option("", "(no namespaces yet)")]));
    const output = el("div", {class: "text", id: id("output"), "aria-live": "polite"});
    const meta = el("p", {class: "meta", id: id("meta")});
    const sources = el("div", {id: id("sources")});
    const column = el("article", {class: "column", "aria-label": `Column ${i + 1}`},
      el("h3", {textContent: `Column ${i + 1}`}),
      el("label", {htmlFor: model.id, textContent: "Model"}), model,
      el("label", {class: "inline"}, rag, " Retrieval"),
      el("label", {htmlFor: namespace.id, textContent: "Namespace"}), namespace,
      output, meta, sources);
    columns.push(column);
    state.compare[i] = {model, rag, namespace, output, meta, sources};
  }
  state.compare.length = count;
  $("columns").replaceChildren(...columns);
}

async function runCompare(event) {
  event.preventDefault();
  const question = $("compare-question").value.trim();
  if (!question || state.controller) return;
  if (!state.server) { showError(NOT_CONNECTED); return; }
  showError(null);
  let bodies;
  try {
    bodies = state.compare.map((column) => ({
      model: column.model.value, messages: [{role: "user", content: question}],
      ...sampling(), ...ragOptions(column.rag.checked, column.namespace.value)}));
  } catch (error) { showError(error); return; }
  state.controller = new AbortController();
  $("compare-run").disabled = true;
  $("compare-stop").disabled = false;
  await Promise.all(state.compare.map(async (column, i) => {
    column.output.textContent = "";
    column.meta.textContent = "running…";
    column.sources.replaceChildren();
    column.output.closest("article").setAttribute("aria-busy", "true");
    try {
      const reply = await streamChat(bodies[i], state.controller.signal, (all) => {
        column.output.textContent = all;
      });
      column.meta.textContent = usageLine(reply);
      const note = declinedNote(reply);
      if (note) column.sources.append(note);
      const sources = sourcesList(reply.sources);
      if (sources) column.sources.append(sources);
    } catch (error) {
      column.meta.textContent = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
    } finally {
      column.output.closest("article").removeAttribute("aria-busy");
    }
  }));
  state.controller = null;
  $("compare-run").disabled = false;
  $("compare-stop").disabled = true;
}

// ---- knowledge: namespaces and file drops ----

async function upload(files) {
  const namespace = $("ingest-namespace").value.trim();
  showError(null);
  if (!namespace) { showError(new ApiError("knowledge: give a namespace to add the files to")); return; }
  if (!files.length) { showError(new ApiError("knowledge: choose or drop at least one file")); return; }
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  try {
    const result = await api(`/v1/namespaces/${encodeURIComponent(namespace)}/files`,
                             {method: "POST", form});
    $("ingest-results").replaceChildren(...result.files.map((file) => el("tr",
      {class: file.error ? "failed" : "ok"},
      el("td", {textContent: file.file}),
      el("td", {textContent: file.error ? `error: ${file.error}`
        : file.documents.map((d) => `${d.id}: ${d.status}`).join(", ")}))));
    $("ingest-files").value = "";
    await loadNamespaces();
  } catch (error) { showError(error); }
}

// ---- adapters ----

function status(row) {
  if (row.active) return "in a slot";
  if (row.in_ram) return "in RAM";
  return "registered";
}

async function loadAdapters() {
  if (!state.server) { showError(NOT_CONNECTED); return; }
  showError(null);
  try {
    const {data} = await api("/v1/adapters");
    $("adapter-rows").replaceChildren(...data.map((row) => {
      const mine = row.owner === state.server.caller.tenant;
      const act = (label, method, path) => el("button", {type: "button",
        textContent: label, "aria-label": `${label} ${row.name}`,
        onclick: () => adapterAction(method, path)});
      const name = encodeURIComponent(row.name);
      return el("tr", {"data-adapter": row.name},
        el("td", {textContent: row.name}), el("td", {textContent: row.owner +
          (row.shared ? " (shared)" : "")}),
        el("td", {textContent: status(row)}), el("td", {textContent: row.pinned ? "yes" : "no"}),
        el("td", {textContent: row.running_requests}),
        el("td", {}, ...(mine ? [
          row.pinned ? act("Unpin", "POST", `/v1/adapters/${name}/unpin`)
            : act("Pin", "POST", `/v1/adapters/${name}/pin`),
          act("Unload", "DELETE", `/v1/adapters/${name}`)] : [])));
    }));
  } catch (error) { showError(error); }
}

async function adapterAction(method, path) {
  showError(null);
  try {
    await api(path, {method});
    await Promise.all([loadAdapters(), loadModels()]);
  } catch (error) { showError(error); }
}

async function loadAdapter(event) {
  event.preventDefault();
  showError(null);
  try {
    await api("/v1/adapters", {method: "POST", body: {name: $("load-name").value.trim(),
      path: $("load-path").value.trim(), shared: $("load-shared").checked}});
    $("load-form").reset();
    await Promise.all([loadAdapters(), loadModels()]);
  } catch (error) { showError(error); }
}

// ---- tabs (arrow keys move between them, as WAI-ARIA's tabs pattern says) ----

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const chosen = other === tab;
    other.setAttribute("aria-selected", String(chosen));
    other.tabIndex = chosen ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !chosen;
  }
  tab.focus();
  if (tab.id === "tab-adapters" && state.server) loadAdapters();
  if (tab.id === "tab-knowledge" && state.server) loadNamespaces().catch(showError);
}

function wire() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
      if (step) selectTab(tabs[(i + step + tabs.length) % tabs.length]);
    });
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
    $("api-key").value = "";
    connect();
  });
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) sendChat(event);
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => { state.chat = []; $("messages").replaceChildren(); });
  $("composition-add").addEventListener("click", addCompositionRow);
  $("compare-form").addEventListener("submit", runCompare);
  $("compare-count").addEventListener("change", buildColumns);
  $("compare-stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("ingest-form").addEventListener("submit", (event) => {
    event.preventDefault();
    upload([...$("ingest-files").files]);
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    upload([...event.dataTransfer.files]);
  });
  $("adapters-refresh").addEventListener("click", loadAdapters);
  $("load-form").addEventListener("submit", loadAdapter);
}

wire();
connect();
