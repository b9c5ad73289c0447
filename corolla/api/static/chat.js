// Corolla web chat: streams /v1/chat/completions (server-sent events, OpenAI chunk format) into the page.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "seed"];
let modelName = null;
let history = [];          // [{role, content}] of finished turns
let controller = null;     // AbortController of the answer being streamed

function loadSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("corolla." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem("corolla." + id, $(id).value));
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  div.append(label, content);
  $("messages").append(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...history);
  const body = {
    model: modelName, messages, stream: true, stream_options: {include_usage: true},
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

// Yields the parsed `data:` payloads of an SSE response body.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  history.push({role: "user", content: text});
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const content = bubble.querySelector(".content");
  bubble.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "waiting for the first token…";
  const began = performance.now();
  let answer = "", usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({error: {message: response.statusText}}));
      throw new Error(`${response.status}: ${problem.error.message}`);
    }
    $("status").textContent = "streaming…";
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          content.textContent = answer;
          bubble.scrollIntoView({block: "end"});
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const seconds = (performance.now() - began) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    $("status").textContent = `${tokens} tokens in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(1)} tokens/s)` +
      (finish === "length" ? "; cut at max tokens" : "");
  } catch (error) {
    if (error.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      bubble.classList.add("error");
      content.textContent = answer + (answer ? "\n" : "") + "Error: " + error.message;
      $("status").textContent = "error";
    }
  } finally {
    bubble.classList.remove("streaming");
    if (answer) history.push({role: "assistant", content: answer});
    else history.pop();
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
});

loadSettings();
fetch("/v1/models").then((r) => r.json()).then((models) => {
  modelName = models.data[0].id;
  $("model-name").textContent = modelName;
  document.body.dataset.ready = "true";
}).catch((error) => { $("status").textContent = "cannot list models: " + error; });
