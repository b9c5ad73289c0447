"""Server lifecycle: join the swarm, choose and load blocks, announce them, serve until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import torch

import corolla
from corolla.errors import CorollaError
from corolla.models.checkpoint import DTYPES, config_dtype, load_blocks, load_config, make_span_helpers, model_id
from corolla.models.spec import family_for
from corolla.net.messages import FORWARD_PROTOCOL, INFERENCE_PROTOCOL, PUSH_PROTOCOL
from corolla.net.node import NetworkConfig, Node
from corolla.net.ping import serve_ping
from corolla.net.directory import read_servers
from corolla.net.records import ServerRecord, ServerState, block_key
from corolla.server.backend import BlockBackend
from corolla.server.config import ServerConfig
from corolla.server.handlers import Handlers, Limits
from corolla.server.placement import choose_span
from corolla.server.cache import CacheManager
from corolla.server.scheduler import Scheduler

logger = logging.getLogger(__name__)


def parse_blocks(text: str, num_blocks: int) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise CorollaError(f"--blocks must look like START:END (e.g. 0:10), got {text!r}") from None
    if not 0 <= start < end <= num_blocks:
        raise CorollaError(f"--blocks {text}: need 0 <= START < END <= {num_blocks} (the model has {num_blocks} blocks)")
    return start, end


class Server:
    def __init__(self, config: ServerConfig, network: NetworkConfig):
        self.config, self.network = config, network
        self.model_config = load_config(config.model)
        self.spec = family_for(self.model_config)
        self.num_blocks = self.model_config.num_hidden_layers
        name = config.model_name or Path(config.model).resolve().name
        self.model_id = model_id(self.model_config, name)
        if config.dtype is not None and config.dtype not in DTYPES:
            raise CorollaError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        self.dtype = DTYPES[config.dtype] if config.dtype else config_dtype(self.model_config)
        self.device = torch.device(config.device)
        if config.blocks is None and config.num_blocks is None:
            raise CorollaError("give --blocks START:END or --num-blocks N")
        self.stop = asyncio.Event()
        self.started_at = time.time()

    async def _choose_blocks(self, node: Node) -> tuple[int, int]:
        if self.config.blocks is not None:
            return parse_blocks(self.config.blocks, self.num_blocks)
        servers = await read_servers(node, self.model_id, self.num_blocks)
        return choose_span(servers, self.num_blocks, self.config.num_blocks)

    def _record(self, state: ServerState, throughput: float, cache: CacheManager | None) -> ServerRecord:
        return ServerRecord(state=state, start_block=self.start, end_block=self.end, throughput=throughput,
                            dtype=str(self.dtype).removeprefix("torch."), quant="none",
                            cache_tokens_left=cache.tokens_left if cache else 0, version=corolla.__version__,
                            public_name=self.config.public_name, started_at=self.started_at)

    async def _announce(self, node: Node, record: ServerRecord, ttl: float) -> None:
        expiration = time.time() + ttl
        items = [(block_key(self.model_id, block), node.peer_id, record.model_dump(mode="json"), expiration)
                 for block in range(self.start, self.end)]
        await node.store(items)

    async def run(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        node = await Node.create(self.network)
        scheduler = None
        try:
            self.start, self.end = await self._choose_blocks(node)
            print(f"joined the swarm as {node.peer_id}; loading blocks {self.start}:{self.end} of {self.model_id} "
                  f"({self.dtype}, {self.device})", flush=True)
            ttl = 3 * self.config.announce_period
            await self._announce(node, self._record(ServerState.JOINING, 0.0, None), ttl)
            began = time.perf_counter()
            blocks = await asyncio.to_thread(load_blocks, self.config.model, self.model_config, self.start,
                                             self.end, self.device, self.dtype)
            helpers = make_span_helpers(self.spec, self.model_config, self.device, self.dtype)
            backend = BlockBackend(self.model_config, self.spec, blocks, helpers, self.start, self.device, self.dtype)
            throughput = await asyncio.to_thread(backend.measure_throughput)
            logger.info("loaded %d blocks in %.1f s; %.1f tokens/s", len(blocks), time.perf_counter() - began,
                        throughput)
            cache = CacheManager(self.config.cache_tokens)
            scheduler = Scheduler(backend, max_batch=self.config.max_batch_size)
            limits = Limits(max_session_length=self.config.max_session_length,
                            max_batch_size=self.config.max_batch_size, max_step_tokens=self.config.max_step_tokens,
                            session_idle_timeout=self.config.session_idle_timeout,
                            link_delay=self.config.debug_delay_ms / 1000, fail_file=self.config.debug_fail_file)
            handlers = Handlers(backend, scheduler, self.model_id, cache, limits, node)
            await node.serve(INFERENCE_PROTOCOL, handlers.inference)
            await node.serve(FORWARD_PROTOCOL, handlers.forward)
            await node.serve(PUSH_PROTOCOL, handlers.push)
            await serve_ping(node, reply_delay=2 * limits.link_delay)
            await self._announce(node, self._record(ServerState.ONLINE, throughput, cache), ttl)
            print(f"ready: serving blocks {self.start}:{self.end} of {self.model_id} as {node.peer_id}", flush=True)
            while not self.stop.is_set():
                try:
                    await asyncio.wait_for(self.stop.wait(), self.config.announce_period)
                except asyncio.TimeoutError:
                    await self._announce(node, self._record(ServerState.ONLINE, throughput, cache), ttl)
            print("shutting down: announcing offline", flush=True)
            await asyncio.wait_for(self._announce(node, self._record(ServerState.OFFLINE, 0.0, None), ttl), 5)
        finally:
            if scheduler is not None:
                scheduler.shutdown()
            await asyncio.wait_for(node.shutdown(), 10)
