"""A deterministic swarm simulator for the placement rules: no processes, no network, seeded random streams.

Hundreds of servers with log-normal throughputs and span lengths set by their device memory join one by one
(`place_span`, the rule behind `choose_span`), then come and go over time steps; after each step's churn every
server runs the rebalancing rule once (`plan_move`, the rule behind `should_move`), seeing the moves made before
it in that round as a server would after reading the DHT. Moves are instant here: the simulator measures where
the rules put servers, not the cost of reloading.

    from corolla.simulator import Scenario, simulate
    result = simulate(Scenario("demo", num_servers=200, leave_probability=0.05))
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from corolla.server.placement import (DEFAULT_MOVE_MARGIN, ServedSpan, best_window, blocks_that_fit, place_span,
                                      plan_move, swarm_throughput, uncovered_blocks)

GIB = 1 << 30


class Placement(str, Enum):
    CHOOSE = "choose"  # choose_span's rule
    RANDOM = "random"  # a uniformly random window: the baseline the rule must beat


@dataclass(frozen=True)
class Fleet:
    """How simulated servers differ: a log-normal throughput, and a device whose memory sets the span length."""

    median_throughput: float = 10.0  # tokens/s through a server's whole span
    throughput_sigma: float = 0.75  # standard deviation of log(throughput)
    device_memory_gib: tuple[int, ...] = (8, 12, 16, 24, 24, 40, 48, 80)  # drawn uniformly
    bytes_per_block: int = 1_712_000_000  # a Llama-2-70B block in bf16 (856M parameters)
    cache_bytes_reserved: int = 4 * GIB  # room kept for attention caches


@dataclass(frozen=True)
class Outage:
    """A correlated failure: at `step`, every server whose span overlaps blocks [start, end) leaves at once."""

    step: int
    start: int
    end: int


@dataclass(frozen=True)
class Scenario:
    """One simulated swarm: who joins, how often servers come and go, and which rules place them."""

    name: str
    num_servers: int  # servers that join, one by one, before the first step
    num_blocks: int = 80
    steps: int = 20
    leave_probability: float = 0.0  # chance that a server leaves during a step
    join_probability: float | None = None  # new servers per step / num_servers; None: as leave_probability
    placement: Placement = Placement.CHOOSE
    rebalance: bool = True  # each server runs the move rule once per step
    move_margin: float = DEFAULT_MOVE_MARGIN
    outage: Outage | None = None
    seed: int = 0
    fleet: Fleet = field(default_factory=Fleet)

    def __post_init__(self) -> None:
        if self.num_servers < 0 or self.steps < 0:
            raise ValueError(f"num_servers and steps must be >= 0, got {self.num_servers} and {self.steps}")
        for name in ("leave_probability", "join_probability"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def joins_per_server(self) -> float:
        return self.leave_probability if self.join_probability is None else self.join_probability


@dataclass(frozen=True)
class StepReport:
    """The swarm after one step (step 0: after the initial joins, before any rebalancing)."""

    step: int
    servers: int
    joins: int
    departures: int
    moves: int
    swarm_throughput: float  # tokens/s of the weakest block, after this step's moves
    upper_bound: float  # no placement of these servers can do better
    uncovered_after_churn: int  # blocks no server covered after the departures and joins, before moves
    uncovered_blocks: int  # blocks no server covers after this step's moves

    @property
    def ratio(self) -> float:
        """Swarm throughput as a fraction of the upper bound."""
        return self.swarm_throughput / self.upper_bound if self.upper_bound > 0 else 0.0


@dataclass(frozen=True)
class SimulationResult:
    scenario: Scenario
    steps: list[StepReport]
    offline_best: float  # best swarm throughput found for the final servers (greedy offline placement)

    @property
    def final(self) -> StepReport:
        return self.steps[-1]

    @property
    def total_moves(self) -> int:
        return sum(report.moves for report in self.steps)

    @property
    def worst_ratio(self) -> float:
        """Lowest ratio to the upper bound after step 0 (the whole run when there are no steps)."""
        later = self.steps[1:] or self.steps
        return min(report.ratio for report in later)

    @property
    def max_uncovered_after_churn(self) -> int:
        return max(report.uncovered_after_churn for report in self.steps)

    @property
    def max_uncovered(self) -> int:
        """Most blocks left uncovered at the end of a step, after its moves (step 0 included)."""
        return max(report.uncovered_blocks for report in self.steps)

    @property
    def ratio_to_offline(self) -> float:
        return self.final.swarm_throughput / self.offline_best if self.offline_best > 0 else 0.0


# --- the bound and the offline reference ----------------------------------------------------------------------

def upper_bound(spans: Iterable[ServedSpan], num_blocks: int) -> float:
    """A ceiling on the weakest block: the blocks share sum(throughput x length) tokens/s x blocks, and no block
    gets more than the sum of all throughputs."""
    spans = list(spans)
    total = sum(s.throughput for s in spans)
    block_throughput_sum = sum(s.throughput * min(s.length, num_blocks) for s in spans)
    return min(total, block_throughput_sum / num_blocks)


def offline_greedy(spans: Sequence[ServedSpan], num_blocks: int) -> float:
    """Swarm throughput when the same servers are placed from scratch, fastest first, each in `best_window`:
    a cheap offline reference (not an optimum)."""
    per_block = [0.0] * num_blocks
    for span in sorted(spans, key=lambda s: (-s.throughput, -s.length, s.peer_id)):
        length = min(span.length, num_blocks)
        start = best_window(per_block, length)
        for block in range(start, start + length):
            per_block[block] += span.throughput
    return min(per_block)


# --- the simulation -------------------------------------------------------------------------------------------

class _Swarm:
    """The simulated servers, in join order, and the draws that make new ones."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        # Separate streams, so that placement rules compared on one seed see the same servers and departures.
        self.fleet_rng = random.Random(f"{scenario.seed}:fleet")
        self.churn_rng = random.Random(f"{scenario.seed}:churn")
        self.placement_rng = random.Random(f"{scenario.seed}:placement")
        self.spans: dict[str, ServedSpan] = {}
        self._ids = itertools.count()

    def join(self) -> None:
        fleet, num_blocks = self.scenario.fleet, self.scenario.num_blocks
        throughput = fleet.median_throughput * math.exp(self.fleet_rng.gauss(0.0, fleet.throughput_sigma))
        memory = self.fleet_rng.choice(fleet.device_memory_gib) * GIB
        length = blocks_that_fit(memory, fleet.bytes_per_block, fleet.cache_bytes_reserved, num_blocks)
        if length == 0:
            return  # this device cannot hold a block: it never joins
        if self.scenario.placement == Placement.CHOOSE:
            start, _ = place_span(self.spans.values(), num_blocks, length)
        else:
            start = self.placement_rng.randrange(num_blocks - length + 1)
        peer_id = f"server-{next(self._ids):05d}"
        self.spans[peer_id] = ServedSpan(peer_id, start, start + length, throughput)

    def churn(self, step: int) -> tuple[int, int]:
        """Random departures (and the outage, if at this step), then random joins; returns (joins, departures)."""
        leaving = [p for p in self.spans if self.churn_rng.random() < self.scenario.leave_probability]
        outage = self.scenario.outage
        if outage is not None and outage.step == step:
            leaving += [p for p, span in self.spans.items()
                        if span.start < outage.end and span.end > outage.start and p not in leaving]
        for peer_id in leaving:
            del self.spans[peer_id]
        joins = sum(self.churn_rng.random() < self.scenario.joins_per_server for _ in range(self.scenario.num_servers))
        for _ in range(joins):
            self.join()
        return joins, len(leaving)

    def rebalance(self) -> int:
        """Every server, in a random order, applies the move rule to the swarm as it is now; returns the moves."""
        order = list(self.spans)
        self.placement_rng.shuffle(order)
        moves = 0
        for peer_id in order:
            target = plan_move(list(self.spans.values()), peer_id, self.scenario.num_blocks,
                               self.scenario.move_margin)
            if target is not None:
                self.spans[peer_id] = self.spans[peer_id].moved_to(target[0])
                moves += 1
        return moves

    def uncovered(self) -> int:
        return len(uncovered_blocks(self.spans.values(), self.scenario.num_blocks))

    def report(self, step: int, joins: int, departures: int, moves: int, uncovered_after_churn: int) -> StepReport:
        spans, num_blocks = list(self.spans.values()), self.scenario.num_blocks
        return StepReport(step=step, servers=len(spans), joins=joins, departures=departures, moves=moves,
                          swarm_throughput=swarm_throughput(spans, num_blocks),
                          upper_bound=upper_bound(spans, num_blocks),
                          uncovered_after_churn=uncovered_after_churn, uncovered_blocks=self.uncovered())


def simulate(scenario: Scenario) -> SimulationResult:
    """Run one scenario; the same scenario (seed included) always gives the same result."""
    swarm = _Swarm(scenario)
    for _ in range(scenario.num_servers):
        swarm.join()
    reports = [swarm.report(0, joins=len(swarm.spans), departures=0, moves=0, uncovered_after_churn=swarm.uncovered())]
    for step in range(1, scenario.steps + 1):
        joins, departures = swarm.churn(step)
        uncovered_after_churn = swarm.uncovered()
        moves = swarm.rebalance() if scenario.rebalance else 0
        reports.append(swarm.report(step, joins, departures, moves, uncovered_after_churn))
    final_spans = list(swarm.spans.values())
    offline = offline_greedy(final_spans, scenario.num_blocks) if final_spans else 0.0
    return SimulationResult(scenario, reports, offline_best=max(offline, reports[-1].swarm_throughput))
