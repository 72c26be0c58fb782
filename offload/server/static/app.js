// The chat page of `offload serve`: streams replies from /v1/chat/completions and draws the
// expert cache from /v1/offload/experts (polled fast while a reply streams, slowly otherwise).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // OpenAI messages, without the system prompt
let controller = null;    // the running reply's AbortController
let modelName = "";

const SETTINGS = ["system", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed", "api_key"];
for (const id of SETTINGS) {  // kept across reloads
  const saved = localStorage.getItem("offload." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("offload." + id, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").className = "status " + (kind || "");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text || "";
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function requestBody() {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push(...conversation);
  const body = { model: modelName, messages, stream: true, stream_options: { include_usage: true } };
  for (const id of ["temperature", "top_p", "min_p", "repeat_penalty"]) {
    if ($(id).value !== "") body[id] = parseFloat($(id).value);
  }
  for (const id of ["top_k", "max_tokens", "seed"]) {
    if ($(id).value !== "") body[id] = parseInt($(id).value, 10);
  }
  return body;
}

// Server-sent events: "data: {...}" lines separated by blank lines, ending with "data: [DONE]".
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const content = div.querySelector(".content");
  let reasoning = null;
  const reply = { role: "assistant", content: "" };
  const meta = document.createElement("div");
  meta.className = "meta";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  pollFast = true;
  const started = performance.now();
  let finish = "", usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(err.error ? err.error.message : response.statusText);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        if (!reasoning) {
          reasoning = document.createElement("div");
          reasoning.className = "reasoning";
          div.insertBefore(reasoning, content);
        }
        reasoning.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        reply.content += delta.content;
        content.textContent = reply.content;
      }
      if (delta.tool_calls) {
        for (const call of delta.tool_calls) {
          reply.tool_calls = reply.tool_calls || [];
          const c = reply.tool_calls[call.index] ||= { id: call.id, type: "function", function: { name: "", arguments: "" } };
          if (call.function && call.function.name) c.function.name = call.function.name;
          if (call.function && call.function.arguments) c.function.arguments += call.function.arguments;
          content.textContent = reply.content + reply.tool_calls.map(
            (t) => `\n[tool call: ${t.function.name} ${t.function.arguments}]`).join("");
        }
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      div.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      div.className = "msg error";
      content.textContent = (reply.content ? reply.content + "\n" : "") + "error: " + e.message;
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    pollFast = false;
  }
  conversation.push(reply);
  const seconds = (performance.now() - started) / 1000;
  meta.textContent = [finish && "finish: " + finish, usage && `${usage.completion_tokens} tokens`,
                      `${seconds.toFixed(1)} s`].filter(Boolean).join(" · ");
  div.appendChild(meta);
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  conversation.length = 0;
  $("messages").textContent = "";
});

// -- the expert panel ---------------------------------------------------------------------
let pollFast = false;
const COLORS = { hit: [63, 185, 80], miss: [248, 81, 73], prefetched: [56, 139, 253], loading: [210, 153, 34],
                 held: [59, 68, 80], none: [11, 13, 16] };

function mib(bytes) { return (bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 2 : 0) + " MiB"; }

function drawHeatmap(p) {
  const canvas = $("heatmap");
  const rows = p.layers.length, cols = p.n_expert;
  const cell = Math.max(2, Math.min(16, Math.floor(560 / cols)));
  canvas.width = cols * cell;
  canvas.height = rows * cell;
  const ctx = canvas.getContext("2d");
  let most = 1;
  for (let r = 0; r < rows; r++) for (let e = 0; e < cols; e++) most = Math.max(most, p.hits[r][e] + p.misses[r][e]);
  for (let r = 0; r < rows; r++) {
    for (let e = 0; e < cols; e++) {
      const last = p.last[r][e], held = p.held[r][e];
      let color = last === 1 ? COLORS.hit : last === 2 ? COLORS.miss : held === 2 ? COLORS.prefetched
        : held === 3 ? COLORS.loading : held === 1 ? COLORS.held : COLORS.none;
      const uses = p.hits[r][e] + p.misses[r][e];
      const k = last ? 1 : 0.55 + 0.45 * Math.sqrt(uses / most);  // brighter: used more by this reply
      ctx.fillStyle = `rgb(${color.map((c) => Math.round(c * k)).join(",")})`;
      ctx.fillRect(e * cell, r * cell, cell - (cell > 3 ? 1 : 0), cell - (cell > 3 ? 1 : 0));
    }
  }
}

function showFigures(p) {
  const live = p.live;
  $("tok-s").textContent = live.tok_s ? live.tok_s.toFixed(1) + " tok/s" : "–";
  $("hit-rate").textContent = live.hit_rate === null ? "–"
    : `${(100 * live.hit_rate).toFixed(1)}% (${live.hits} hits, ${live.misses} misses)`;
  $("mib-token").textContent = mib(live.bytes_read) + " in all, " + live.mib_per_token.toFixed(2) + " MiB/token";
  $("tokens").textContent = `${live.tokens} generated, ${live.prompt_tokens} prompt` + (live.running ? " (running)" : "");
  $("memory").textContent = (live.memory_budget ? "model " + mib(live.model_rss_bytes) + " of a " + mib(live.memory_budget) +
    " budget (process RSS " + mib(live.rss_bytes) + ")" : "RSS " + mib(live.rss_bytes));
  $("policy").textContent = live.cache_policy === "resident" ? "every expert in RAM"
    : `${live.cache_policy}, ${live.expert_slots} slots`;
  $("queue").textContent = p.queue_depth ? p.queue_depth + " waiting" : "empty";
}

async function poll() {
  try {
    const r = await fetch("/v1/offload/experts", { headers: headers() });
    if (r.ok) {
      const p = await r.json();
      drawHeatmap(p);
      showFigures(p);
      setStatus("ready", "ok");
    } else if (r.status === 503) {
      setStatus("loading the model", "");
    } else if (r.status === 401) {
      setStatus("API key needed (settings)", "bad");
    }
  } catch (e) {
    setStatus("server unreachable", "bad");
  }
  setTimeout(poll, pollFast ? 200 : 1500);
}

async function loadModelName() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.ok) {
      modelName = (await r.json()).data[0].id;
      $("model-name").textContent = modelName;
      return;
    }
  } catch (e) { /* retried below */ }
  setTimeout(loadModelName, 2000);
}

loadModelName();
poll();
