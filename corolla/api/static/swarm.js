// Corolla swarm map: draws /api/v1/state (servers x blocks) and re-reads it every state_refresh_s seconds.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function row(label, cells) {
  const div = el("div", "map-row");
  div.append(el("div", "map-label", label), ...cells);
  return div;
}

function drawMap(state) {
  const ruler = [];
  for (let b = 0; b < state.num_blocks; b++) ruler.push(el("div", "cell ruler", b % 5 === 0 ? String(b) : ""));
  const rows = [row("block", ruler)];
  for (const server of state.servers) {
    const cells = [];
    for (let b = 0; b < state.num_blocks; b++) {
      const held = b >= server.start_block && b < server.end_block;
      const cell = el("div", "cell" + (held ? " held " + server.state : ""));
      if (held) cell.title = `${server.name}: block ${b} (${server.state})`;
      cells.push(cell);
    }
    const r = row(server.name, cells);
    r.dataset.peer = server.peer_id;
    r.classList.add("server-row");
    rows.push(r);
  }
  const coverage = state.blocks.map((block) => {
    const cell = el("div", "cell coverage " + (block.covered ? "covered" : "missing"), String(block.servers.length));
    cell.dataset.block = block.index;
    cell.title = `block ${block.index}: ${block.servers.length} online server(s)`;
    return cell;
  });
  rows.push(row("coverage", coverage));
  $("map").replaceChildren(...rows);
}

function drawTable(state) {
  const body = $("servers").querySelector("tbody");
  body.replaceChildren(...state.servers.map((s) => {
    const tr = el("tr");
    const cells = [
      el("td", "", s.name), el("td", "", `${s.start_block}..${s.end_block - 1}`),
      el("td", "state-" + s.state, s.state), el("td", "num", s.throughput.toFixed(1)),
      el("td", "num", String(s.cache_tokens_left)), el("td", "", s.adapters.join(", ") || "–"),
      el("td", "", s.version || "–"), el("td", "num", s.rtt_ms === null ? "–" : s.rtt_ms.toFixed(2)),
      el("td", "", s.reached || "–"),
      el("td", "num", String(s.served_block_tokens)),
      el("td", "", s.dtype), el("td", "", s.quant), el("td", "peer", s.peer_id),
    ];
    tr.append(...cells);
    return tr;
  }));
}

function drawSummary(state) {
  const summary = $("summary");
  const complete = state.covered_blocks === state.num_blocks;
  summary.className = complete ? "complete" : "incomplete";
  summary.dataset.covered = state.covered_blocks;
  summary.dataset.blocks = state.num_blocks;
  const online = state.servers.filter((s) => s.state === "online").length;
  summary.textContent = complete
    ? `All ${state.num_blocks} blocks are served (${online} of ${state.servers.length} servers online).`
    : `${state.covered_blocks} of ${state.num_blocks} blocks served; NOT served: ` +
      state.missing.map(([a, b]) => `${a}..${b - 1}`).join(", ");
}

async function refresh() {
  try {
    const response = await fetch("/api/v1/state", {cache: "no-store"});
    const state = await response.json();
    if (!response.ok) throw new Error(state.error ? state.error.message : response.statusText);
    $("model-name").textContent = `${state.model} (${state.model_id})`;
    drawSummary(state);
    drawMap(state);
    drawTable(state);
    $("updated").textContent = "updated " + new Date(state.updated_at * 1000).toLocaleTimeString();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (error) {
    $("updated").textContent = "cannot read the swarm: " + error.message;
  }
}

async function start() {
  let every = 2;
  try {
    every = (await (await fetch("/api/v1/info")).json()).state_refresh_s;
  } catch (error) { /* keep the default */ }
  await refresh();
  setInterval(refresh, every * 1000);
}

start();
