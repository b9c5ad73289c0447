"""Placement in simulated swarms: the rules of corolla/server/placement.py (the ones servers run) over hundreds
of simulated servers with log-normal throughputs and memory-sized spans of an 80-block model
(corolla/simulator.py). Pure Python, deterministic for a seed; no processes, no network.

For each scenario it prints the swarm's throughput (its weakest block) at the end, the upper bound for the same
servers (sum of throughput x span length / blocks), their ratio, the worst ratio over the steps after the
initial joins, a greedy offline placement of the same servers, blocks left uncovered and the moves made.

    .venv/bin/python benchmarks/simulate_swarm.py                 # every scenario, one table (about a minute)
    .venv/bin/python benchmarks/simulate_swarm.py --quick         # without the 500-server scenarios
    .venv/bin/python benchmarks/simulate_swarm.py --only churn-100 --steps-table
    .venv/bin/python benchmarks/simulate_swarm.py --margin 0.1 --seed 3 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from corolla.server.placement import DEFAULT_MOVE_MARGIN
from corolla.simulator import Outage, Placement, Scenario, SimulationResult, simulate


def scenarios(margin: float, seed: int, steps: int, quick: bool) -> list[Scenario]:
    def make(name: str, servers: int, **settings) -> Scenario:
        return Scenario(name, servers, steps=settings.pop("steps", steps), move_margin=margin, seed=seed, **settings)

    churn = dict(leave_probability=0.05)  # 5% of servers leave per step, as many join
    shrink = dict(leave_probability=0.03, join_probability=0.0)  # 3% leave per step, nobody joins
    outage = dict(outage=Outage(step=3, start=30, end=40), steps=min(steps, 10))
    chosen = [
        make("static-100", 100),
        make("churn-100", 100, **churn),
        make("churn-100-no-moves", 100, rebalance=False, **churn),
        make("random-100-no-moves", 100, placement=Placement.RANDOM, rebalance=False),
        make("random-100", 100, placement=Placement.RANDOM),
        make("shrink-200", 200, **shrink),
        make("shrink-200-no-moves", 200, rebalance=False, **shrink),
        make("outage-200", 200, **outage),
        make("outage-200-no-moves", 200, rebalance=False, **outage),
    ]
    if not quick:
        chosen += [
            make("static-500", 500),
            make("churn-500", 500, **churn),
            make("churn-500-no-moves", 500, rebalance=False, **churn),
            make("random-500-no-moves", 500, placement=Placement.RANDOM, rebalance=False),
            make("random-500", 500, placement=Placement.RANDOM, steps=min(steps, 5)),
        ]
    return chosen


COLUMNS = ("scenario", "servers", "swarm tok/s", "bound", "ratio", "worst", "offline", "vs offline",
           "gaps (churn)", "gaps (end)", "moves", "departed", "seconds")


def row(result: SimulationResult, seconds: float) -> tuple[str, ...]:
    final = result.final
    return (result.scenario.name, str(final.servers), f"{final.swarm_throughput:.1f}", f"{final.upper_bound:.1f}",
            f"{final.ratio:.3f}", f"{result.worst_ratio:.3f}", f"{result.offline_best:.1f}",
            f"{result.ratio_to_offline:.3f}", str(result.max_uncovered_after_churn), str(final.uncovered_blocks),
            str(result.total_moves), str(sum(r.departures for r in result.steps)), f"{seconds:.1f}")


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(r, widths)), flush=True)


def print_steps(result: SimulationResult) -> None:
    header = ("step", "servers", "joins", "departed", "moves", "swarm tok/s", "bound", "ratio",
              "gaps (churn)", "gaps (end)")
    rows = [(str(r.step), str(r.servers), str(r.joins), str(r.departures), str(r.moves),
             f"{r.swarm_throughput:.1f}", f"{r.upper_bound:.1f}", f"{r.ratio:.3f}", str(r.uncovered_after_churn),
             str(r.uncovered_blocks)) for r in result.steps]
    print(f"\n{result.scenario.name}, step by step:")
    print_table(header, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--margin", type=float, default=DEFAULT_MOVE_MARGIN, help="should_move's margin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20, help="time steps after the initial joins")
    parser.add_argument("--quick", action="store_true", help="skip the 500-server scenarios")
    parser.add_argument("--only", action="append", default=[], help="run only this scenario (repeatable)")
    parser.add_argument("--steps-table", action="store_true", help="also print each scenario step by step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    chosen = scenarios(args.margin, args.seed, args.steps, quick=args.quick and not args.only)
    if args.only:
        unknown = set(args.only) - {s.name for s in chosen}
        if unknown:
            parser.error(f"unknown scenario(s) {sorted(unknown)}; known: {[s.name for s in chosen]}")
        chosen = [s for s in chosen if s.name in args.only]

    print(f"80-block model, margin {args.margin}, seed {args.seed}; 'gaps' = uncovered blocks "
          f"(most after a step's churn, and at the end)\n", flush=True)
    results, rows = [], []
    for scenario in chosen:
        began = time.perf_counter()
        result = simulate(scenario)
        results.append(result)
        rows.append(row(result, time.perf_counter() - began))
    print_table(COLUMNS, rows)
    if args.steps_table:
        for result in results:
            print_steps(result)
    if args.json:
        args.json.write_text(json.dumps([{"scenario": dataclasses.asdict(r.scenario), "offline_best": r.offline_best,
                                          "steps": [dataclasses.asdict(s) for s in r.steps]} for r in results],
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
