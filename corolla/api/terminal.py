"""The swarm map drawn for a terminal: one row per server, one column per block (`corolla health`)."""

from __future__ import annotations

from corolla.api.state import SwarmState
from corolla.net.records import ServerState

_MARKS = {ServerState.ONLINE: "█", ServerState.JOINING: "▒", ServerState.OFFLINE: "░"}


def render_state(state: SwarmState, width: int = 100) -> str:
    """A block map (rows: servers; columns: blocks, folded to `width` columns for large models)."""
    per_column = max(1, -(-state.num_blocks // width))  # blocks drawn per character
    columns = -(-state.num_blocks // per_column)
    label = max([len(s.name) for s in state.servers] + [len("coverage")])

    def row(name: str, marks: list[str]) -> str:
        return f"  {name:<{label}} |{''.join(marks)}|"

    if state.complete:
        summary = f"all {state.num_blocks} blocks served"
    else:
        gaps = ", ".join(f"{a}..{b - 1}" for a, b in state.missing)
        summary = f"{state.covered_blocks}/{state.num_blocks} blocks served; NOT served: {gaps}"
    lines = [f"model {state.model} ({state.model_id}): {len(state.servers)} servers, {summary}"]
    if per_column > 1:
        lines.append(f"  (one column = {per_column} blocks)")
    ruler = "".join(str((c * per_column) // 10 % 10) if (c * per_column) % 10 == 0 else " " for c in range(columns))
    lines.append(row("block", list(ruler)))
    for server in state.servers:
        marks = [" "] * columns
        for block in range(server.start_block, min(server.end_block, state.num_blocks)):
            marks[block // per_column] = _MARKS[server.state]
        lines.append(row(server.name, marks))
    coverage = []
    for c in range(columns):
        blocks = state.blocks[c * per_column:(c + 1) * per_column]
        least = min(len(b.servers) for b in blocks)
        coverage.append("!" if least == 0 else str(min(least, 9)))
    lines.append(row("coverage", coverage))
    lines.append(f"  ({_MARKS[ServerState.ONLINE]} online  {_MARKS[ServerState.JOINING]} joining  "
                 f"{_MARKS[ServerState.OFFLINE]} offline; coverage = online servers per block, ! = none)")
    lines.append("")
    header = f"  {'server':<{label}}  {'blocks':>9}  {'state':<7}  {'tokens/s':>8}  {'cache left':>10}  " \
             f"{'rtt ms':>7}  {'reached':<7}  {'served':>10}  {'dtype':<8}  {'quant':<5}  {'version':<8}  adapters  peer id"
    lines.append(header)
    for s in state.servers:
        rtt = f"{s.rtt_ms:.2f}" if s.rtt_ms is not None else "-"
        lines.append(f"  {s.name:<{label}}  {f'{s.start_block}..{s.end_block - 1}':>9}  {s.state.value:<7}  "
                     f"{s.throughput:>8.1f}  {s.cache_tokens_left:>10}  {rtt:>7}  {s.reached or '-':<7}  {s.served_block_tokens:>10}  {s.dtype:<8}  {s.quant:<5}  "
                     f"{s.version or '-':<8}  {','.join(s.adapters) or '-':<8}  {s.peer_id}")
    if not state.servers:
        lines.append("  (no server announces this model)")
    return "\n".join(lines)
