"""Server lifecycle: join the swarm, choose and load blocks, announce them, serve, move when the swarm needs it,
and announce itself offline when told to stop."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

import corolla
from corolla.credits.book import CreditBook, credits_key
from corolla.credits.ledger import Ledger
from corolla.errors import CorollaError
from corolla.models.checkpoint import DTYPES, config_dtype, load_blocks, make_span_helpers, meta_model
from corolla.models.hub_source import open_model, swarm_identity
from corolla.models.embedded import cache_dir
from corolla.models.layout import LAYOUTS, choose_layouts
from corolla.models.spec import family_for
from corolla.models.synthetic import synthetic_blocks, synthetic_name
from corolla.net.directory import read_servers
from corolla.net.messages import BACKWARD_PROTOCOL, FORWARD_PROTOCOL, INFERENCE_PROTOCOL, PUSH_PROTOCOL
from corolla.net.node import MessageStream, NetworkConfig, Node
from corolla.net.ping import measure_rtt, serve_ping
from corolla.net.records import ServerRecord, ServerState, block_key
from corolla.server.adapters import load_adapters
from corolla.server.backend import BlockBackend
from corolla.server.cache import CacheManager
from corolla.server.config import ServerConfig
from corolla.server.handlers import Handlers, Limits
from corolla.server.placement import blocks_that_fit, choose_span, should_move
from corolla.server.quantize import QUANT_TYPES, block_bytes, quantize_blocks
from corolla.server.engine import Engine
from corolla.server.throughput import Throughput, cached_measure

logger = logging.getLogger(__name__)

_STOP_POLL_S = 0.5  # a server waiting for a download notices a stop within this (a download takes minutes)


def parse_blocks(text: str, num_blocks: int) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise CorollaError(f"--blocks must look like START:END (e.g. 0:10), got {text!r}") from None
    if not 0 <= start < end <= num_blocks:
        raise CorollaError(f"--blocks {text}: need 0 <= START < END <= {num_blocks} (the model has {num_blocks} blocks)")
    return start, end


@dataclass
class Serving:
    """What a server runs for its current span; replaced as a whole when the server moves."""

    start: int
    end: int
    backend: BlockBackend
    engine: Engine
    handlers: Handlers
    throughput: Throughput


class Server:
    def __init__(self, config: ServerConfig, network: NetworkConfig):
        self.config, self.network = config, network
        # A directory, or a Hub repo id of which only config.json and the weight index are fetched now, and the
        # shards of the blocks when they are chosen (_load).
        self.source = open_model(config.model, revision=config.revision, cache_dir=config.hub_dir)
        name = config.model_name
        if config.synthetic_weights_seed is not None:
            name = synthetic_name(name or self.source.name, config.synthetic_weights_seed)
        identity = swarm_identity(self.source, name)
        self.model_config, self.model_id = identity.config, identity.model_id
        self.spec = family_for(self.model_config)
        self.num_blocks = self.model_config.num_hidden_layers
        if config.dtype is not None and config.dtype not in DTYPES:
            raise CorollaError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        if config.quant not in QUANT_TYPES:
            raise CorollaError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {config.quant!r}")
        if config.weight_layout not in LAYOUTS:
            raise CorollaError(f"--weight-layout must be one of {', '.join(LAYOUTS)}, got {config.weight_layout!r}")
        self.dtype = DTYPES[config.dtype] if config.dtype else config_dtype(self.model_config)
        self.device = torch.device(config.device)
        self.stop = asyncio.Event()
        self.started_at = time.time()
        self.cache = CacheManager(config.cache_tokens)
        self.serving: Serving | None = None
        self.next_pings: dict[str, float] = {}  # round trips to servers of the blocks after ours (for routing)
        self.credits: CreditBook | None = None  # kept across span moves; made once the peer id is known

    # ---- choosing blocks --------------------------------------------------------------------------------------

    def _default_num_blocks(self) -> int:
        """As many blocks as fit the device's free memory, after the attention-cache budget."""
        # Counted on the meta model (no file read): a Hub repo's shards are fetched only once the span is chosen.
        block = meta_model(self.spec, self.model_config, self.dtype).get_submodule(self.spec.block_path(0))
        per_block = sum(p.numel() for p in block.parameters()) * torch.empty((), dtype=self.dtype).element_size()
        if self.config.quant != "none":
            per_block //= 4 if self.config.quant == "int8" else 7
        kv_heads = getattr(self.model_config, "num_key_value_heads", None) or self.model_config.num_attention_heads
        head_dim = getattr(self.model_config, "head_dim", None) or self.model_config.hidden_size // self.model_config.num_attention_heads
        cache_per_block = 2 * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size() * self.config.cache_tokens
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = psutil.virtual_memory().available // 2  # leave room for the rest of the machine
        fitting = blocks_that_fit(free, per_block + cache_per_block, 0, self.num_blocks)
        if fitting == 0:
            raise CorollaError(f"not even one block ({(per_block + cache_per_block) / 2**20:.0f} MiB with its cache) fits "
                               f"the {free / 2**20:.0f} MiB free on {self.device}; lower --cache-tokens or use --quant")
        return fitting

    async def _choose_blocks(self, node: Node) -> tuple[int, int]:
        if self.config.blocks is not None:
            return parse_blocks(self.config.blocks, self.num_blocks)
        length = self.config.num_blocks or self._default_num_blocks()
        servers = await read_servers(node, self.model_id, self.num_blocks)
        return choose_span(servers, self.num_blocks, length)

    # ---- loading and serving ----------------------------------------------------------------------------------

    def _load(self, start: int, end: int, node: Node) -> Serving:
        if self.config.synthetic_weights_seed is not None:
            logger.warning("BENCHMARK SERVER: blocks %d:%d get random weights (seed %d), not the checkpoint's",
                           start, end, self.config.synthetic_weights_seed)
            blocks = synthetic_blocks(self.model_config, start, end, self.device, self.dtype,
                                      self.config.synthetic_weights_seed,
                                      prepare=lambda block: quantize_blocks([block], self.config.quant, self.device,
                                                                            self.dtype)[0])
        else:
            load_device = "cpu" if self.config.quant != "none" else self.device
            model_dir = self.source.fetch_blocks(self.model_config, start, end)
            blocks = load_blocks(model_dir, self.model_config, start, end, load_device, self.dtype, progress=True)
            blocks = quantize_blocks(blocks, self.config.quant, self.device, self.dtype)
        layout = ""
        if self.device.type == "cpu" and self.config.weight_layout != "row":
            layout = f"|layout={self.config.weight_layout}"
            began = time.perf_counter()
            blocks, timings = choose_layouts(blocks, self.config.weight_layout)
            if timings or self.config.weight_layout != "auto":  # auto with no float linear weights: nothing done
                measured = f" (measured in {time.perf_counter() - began:.2f} s, one-token products)" if timings else ""
                print(f"weight layout {self.config.weight_layout}{measured}"
                      + "".join(f"; {t.describe()}" for t in timings), flush=True)
        helpers = make_span_helpers(self.spec, self.model_config, self.device, self.dtype)
        backend = BlockBackend(self.model_config, self.spec, blocks, helpers, start, self.device, self.dtype,
                               prefill_chunk=self.config.prefill_chunk_tokens,
                               # nf4 layers replay from graphs (tests/test_gpu.py); int8 ones (LLM.int8's
                               # outlier split) do host-side work per call, which a graph cannot hold
                               cuda_graphs=self.config.cuda_graphs and self.config.quant in ("none", "nf4"))
        cache_file = Path(self.config.throughput_cache or cache_dir() / "throughput.json")
        key = f"{self.model_id}|{self.device}|{torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else 'cpu'}" \
              f"|{self.dtype}|{self.config.quant}|threads={torch.get_num_threads()}{layout}" \
              f"{'|graphs' if backend.cuda_graphs else ''}"
        engine = Engine(backend, self.cache, max_batch=self.config.max_batch_size)
        throughput = cached_measure(engine, cache_file, key)
        logger.info("blocks %d:%d loaded: %.1f MiB, %.1f decode tokens/s for the span", start, end,
                    sum(block_bytes(b) for b in blocks) / 2**20, throughput.for_span(end - start)[0])
        max_length = self.config.max_session_length or getattr(self.model_config, "max_position_embeddings", None) or 8192
        limits = Limits(max_session_length=max_length, max_batch_size=self.config.max_batch_size,
                        max_step_tokens=self.config.max_step_tokens,
                        max_message_bytes=int(self.config.max_request_mb * 2**20),
                        max_sessions_per_peer=self.config.max_sessions_per_peer,
                        session_idle_timeout=self.config.session_idle_timeout,
                        link_delay=self.config.debug_delay_ms / 1000, fail_file=self.config.debug_fail_file,
                        perturb=self.config.debug_perturb_outputs)
        adapters = load_adapters(self.config.adapters, self.spec, blocks, start, self.device, self.dtype,
                                 self.config.hub_dir)
        if adapters.names:
            logger.info("hosting adapters: %s", ", ".join(adapters.names))
        handlers = Handlers(backend, engine, self.model_id, limits, node, adapters, credits=self.credits)
        return Serving(start, end, backend, engine, handlers, throughput)

    def _record(self, state: ServerState, node: Node) -> ServerRecord:
        serving = self.serving
        decode, forward = serving.throughput.for_span(serving.end - serving.start) if serving else (0.0, 0.0)
        bandwidth = node.meter.bytes_per_second
        return ServerRecord(state=state, start_block=self.start, end_block=self.end,
                            throughput=decode if state == ServerState.ONLINE else 0.0, forward_throughput=forward,
                            network_mbps=bandwidth * 8 / 1e6 if bandwidth else None,
                            dtype=str(self.dtype).removeprefix("torch."), quant=self.config.quant,
                            cache_tokens_left=self.cache.tokens_left if state == ServerState.ONLINE else 0,
                            cache_tokens_total=self.cache.total_tokens,
                            version=corolla.__version__, public_name=self.config.public_name,
                            started_at=self.started_at, next_pings=self.next_pings, relay_addresses=node.relay_addresses,
                            served_block_tokens=self.credits.served_block_tokens if self.credits else 0,
                            adapters=serving.handlers.adapters.names if serving else [])

    async def _announce(self, node: Node, state: ServerState) -> None:
        expiration = time.time() + 3 * self.config.announce_period
        value = self._record(state, node).model_dump(mode="json")
        await node.store([(block_key(self.model_id, block), node.peer_id, value, expiration)
                          for block in range(self.start, self.end)])
        if self.credits is not None and state == ServerState.ONLINE:
            await self._exchange_credits(node, expiration)

    async def _exchange_credits(self, node: Node, expiration: float) -> None:
        """Publish our receipts under our own subkey; read the other servers' and recompute standing."""
        key = credits_key(self.model_id)
        await node.store([(key, node.peer_id, self.credits.publication(), expiration)])
        found = await node.get([key])
        self.credits.refresh({peer: value for peer, (value, _) in found.get(key, {}).items()})

    async def _register(self, node: Node) -> None:
        # Registered once; each call goes to whatever span is served now.
        async def inference(stream: MessageStream) -> None:
            await self.serving.handlers.inference(stream)

        async def forward(stream: MessageStream) -> None:
            await self.serving.handlers.forward(stream)

        async def push(stream: MessageStream) -> None:
            await self.serving.handlers.push(stream)

        async def backward(stream: MessageStream) -> None:
            await self.serving.handlers.backward(stream)

        max_bytes = int(self.config.max_request_mb * 2**20)
        await node.serve(INFERENCE_PROTOCOL, inference, max_frame_bytes=max_bytes)
        await node.serve(FORWARD_PROTOCOL, forward, max_frame_bytes=max_bytes)
        await node.serve(PUSH_PROTOCOL, push, max_frame_bytes=max_bytes)
        await node.serve(BACKWARD_PROTOCOL, backward, max_frame_bytes=max_bytes)
        await serve_ping(node, reply_delay=2 * self.config.debug_delay_ms / 1000)

    async def _serve_span(self, node: Node, start: int, end: int) -> None:
        self.start, self.end = start, end
        print(f"loading blocks {start}:{end} of {self.model_id} ({self.dtype}, {self.device}, quant {self.config.quant})",
              flush=True)
        await self._announce(node, ServerState.JOINING)
        self.serving = await asyncio.to_thread(self._load, start, end, node)
        await self._announce(node, ServerState.ONLINE)

    async def _measure_next_pings(self, node: Node, limit: int = 8) -> None:
        """Round trips to the servers that can take over where our span ends: clients use them to estimate a
        chain's latency when servers push activations to each other."""
        servers = await read_servers(node, self.model_id, self.num_blocks)
        nexts = [s.peer_id for s in servers if s.peer_id != node.peer_id and s.record.state == ServerState.ONLINE
                 and s.record.start_block <= self.end < s.record.end_block][:limit]

        async def ping(peer_id: str) -> tuple[str, float | None]:
            try:
                return peer_id, await asyncio.wait_for(measure_rtt(node, peer_id, timeout=2.0), 5.0)
            except (ConnectionError, EOFError, OSError, asyncio.TimeoutError):
                return peer_id, None

        self.next_pings = {peer: rtt for peer, rtt in await asyncio.gather(*(ping(p) for p in nexts)) if rtt is not None}

    async def _fetch_while_serving(self, node: Node, target: tuple[int, int]) -> bool:
        """Fetch the target span's files (a repo id's shards: minutes for a large model; nothing for a directory)
        while the current span still serves and is announced. False, with a warning, when they cannot be had
        (offline without them, the Hub unreachable) or the server is stopping: better stay where we are."""
        fetch = _in_daemon_thread(self.source.fetch_blocks, self.model_config, *target)
        next_announce = time.monotonic() + self.config.announce_period
        while not fetch.done() and not self.stop.is_set():
            await asyncio.wait({fetch}, timeout=_STOP_POLL_S)
            if not fetch.done() and time.monotonic() >= next_announce:
                await self._announce(node, ServerState.ONLINE)
                next_announce = time.monotonic() + self.config.announce_period
        if not fetch.done():
            fetch.cancel()  # the thread finishes on its own; its outcome is dropped
            return False
        try:
            fetch.result()
            return True
        except Exception as e:  # huggingface_hub re-raises httpx's errors, which are not OSErrors: staying is safe
            reason = e if isinstance(e, CorollaError) else repr(e)  # ours are written for people; name the others
            logger.warning("staying on blocks %d:%d: cannot fetch blocks %d:%d: %s", self.start, self.end, *target,
                           reason)
            return False

    async def _maybe_move(self, node: Node) -> None:
        servers = await read_servers(node, self.model_id, self.num_blocks)
        target = should_move(servers, node.peer_id, self.num_blocks)
        if target is None or target == (self.start, self.end):
            return
        if not await self._fetch_while_serving(node, target):
            return
        # Servers sharing a span may all see the same gap at once (seen under load in test_rebalance: two moved).
        # After a random pause, look again: one that moved first has announced the gap as taken by then.
        await asyncio.sleep(random.uniform(0, self.config.rebalance_period / 4))
        if should_move(await read_servers(node, self.model_id, self.num_blocks), node.peer_id, self.num_blocks) != target:
            return
        print(f"rebalancing: moving from blocks {self.start}:{self.end} to {target[0]}:{target[1]}", flush=True)
        await self._announce(node, ServerState.OFFLINE)  # clients stop routing here, open sessions fail over
        old = self.serving
        self.start, self.end = target
        await self._announce(node, ServerState.JOINING)  # the gap is taken: others' confirmations see it at once
        await old.handlers.close_all()
        old.engine.shutdown()
        self.serving = None
        await self._serve_span(node, *target)
        print(f"ready: serving blocks {self.start}:{self.end} of {self.model_id} as {node.peer_id}", flush=True)

    async def run(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        node = await Node.create(self.network)
        if self.config.credits:
            ledger = Ledger(self.config.credits_ledger or cache_dir() / "credits" / f"{node.peer_id}.sqlite")
            self.credits = CreditBook(ledger, self.model_id, node.peer_id, frozenset(self.config.trusted_peers))
        try:
            start, end = await self._choose_blocks(node)
            print(f"joined the swarm as {node.peer_id}", flush=True)
            await self._register(node)
            await self._serve_span(node, start, end)
            print(f"ready: serving blocks {self.start}:{self.end} of {self.model_id} as {node.peer_id}", flush=True)
            rebalance = self.config.rebalance_period if self.config.blocks is None else 0
            next_check = time.monotonic() + _jittered(rebalance)
            while not self.stop.is_set():
                try:
                    await asyncio.wait_for(self.stop.wait(), self.config.announce_period)
                except asyncio.TimeoutError:
                    await self._measure_next_pings(node)
                    await self._announce(node, ServerState.ONLINE)
                if rebalance > 0 and time.monotonic() >= next_check and not self.stop.is_set():
                    await self._maybe_move(node)
                    next_check = time.monotonic() + _jittered(rebalance)
            print("shutting down: announcing offline", flush=True)
            await asyncio.wait_for(self._announce(node, ServerState.OFFLINE), 5)
        finally:
            if self.serving is not None:
                self.serving.engine.shutdown()
            try:
                await asyncio.wait_for(node.shutdown(), 10)
            finally:  # after the node: a handler still running may keep a receipt until then
                if self.credits is not None:
                    self.credits.close()


def _in_daemon_thread(function, *args) -> asyncio.Future:
    """`function(*args)` in a daemon thread, as a future of this loop. Not asyncio.to_thread: asyncio.run joins
    the default executor's threads without a timeout at exit, so a download stuck on the network would hold up a
    server told to stop; a daemon thread is left behind instead."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits for it any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            outcome = (function(*args), None)
        except BaseException as e:
            outcome = (None, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop has closed: the server stopped while this ran
            pass

    threading.Thread(target=work, name=f"corolla-{getattr(function, '__name__', 'work')}", daemon=True).start()
    return future


def _jittered(period: float) -> float:
    # Servers that joined together should not all re-evaluate on the same view of the swarm at the same moment.
    return period * random.uniform(0.75, 1.25)
