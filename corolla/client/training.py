"""Autograd through remote blocks: `loss.backward()` on the client computes gradients through every remote block.

Forward: the batch is split into chunks (at most `max_request_tokens` tokens each) that run concurrently, each over
its own load-spread route; the input of every hop is kept. Backward: hop by hop in reverse, each server recomputes
its blocks' forward from the kept input and returns the gradients for the input, the deep prompts and the client's
LoRA weights (servers keep nothing and never update their weights). A server that fails during backward is
replaced: its blocks are re-run forward on other servers from the kept input, then backward through them, so a
training step survives losing a server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from corolla.client.extras import ClientLora, Extras
from corolla.client.remote import (_RECOVERABLE, RemoteSequence, _Attempts, _check_reply, _optional,
                                   _RetryableRemoteError, encode_hidden, stateless_accepted, stateless_receipt,
                                   wire_signature)
from corolla.client.routing import Hop
from corolla.net.messages import BACKWARD_PROTOCOL, BackwardRequest, BackwardResult


@dataclass
class _Chunk:
    rows: slice  # batch rows of this chunk
    hops: list[tuple[Hop, torch.Tensor]]  # hops run in the forward pass, each with its input


@dataclass
class _ChunkGrads:
    hidden: torch.Tensor
    prompts: torch.Tensor | None  # [num_blocks, chunk rows, pre_seq_len, hidden]
    lora: list[torch.Tensor]  # like ClientLora.flat(0, num_blocks)


class RemoteTraining:
    """Forward and backward passes of all blocks, for autograd (see RemoteBlocksFunction)."""

    def __init__(self, remote: RemoteSequence):
        self.remote, self.swarm = remote, remote.swarm

    def _row_slices(self, batch: int, tokens: int) -> list[slice]:
        rows = max(1, self.swarm.config.max_request_tokens // max(tokens, 1))
        return [slice(begin, min(begin + rows, batch)) for begin in range(0, batch, rows)]

    async def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                      extras: Extras, span: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[_Chunk]]:
        """Blocks [span) (default: all) on every chunk of rows."""
        start, end = span or (0, self.swarm.num_blocks)
        slices = self._row_slices(hidden.shape[0], hidden.shape[1])
        results = await asyncio.gather(*(
            self.remote.forward_span(start, end, hidden[rows], positions[rows],
                                     None if mask is None else mask[rows], extras, rows) for rows in slices))
        chunks = [_Chunk(rows, hops) for rows, (_, hops) in zip(slices, results)]
        return torch.cat([output for output, _ in results]), chunks

    async def backward(self, chunks: list[_Chunk], grad_output: torch.Tensor, positions: torch.Tensor,
                       mask: torch.Tensor | None, extras: Extras) -> _ChunkGrads:
        parts = await asyncio.gather(*(self._backward_chunk(chunk, grad_output[chunk.rows], positions[chunk.rows],
                                                            None if mask is None else mask[chunk.rows], extras)
                                       for chunk in chunks))
        prompts = torch.cat([p.prompts for p in parts], dim=1) if extras.prompts is not None else None
        lora = [torch.stack(grads).sum(0) for grads in zip(*(p.lora for p in parts))]
        return _ChunkGrads(torch.cat([p.hidden for p in parts]), prompts, lora)

    async def _backward_chunk(self, chunk: _Chunk, grad: torch.Tensor, positions: torch.Tensor,
                              mask: torch.Tensor | None, extras: Extras) -> _ChunkGrads:
        attempts = _Attempts(self.swarm)
        grad_prompts = None if extras.prompts is None else torch.zeros_like(extras.prompts[:, chunk.rows])
        grad_lora = [] if extras.lora is None else [torch.zeros_like(t) for t in extras.lora.flat(0, self.swarm.num_blocks)]
        per_block = 0 if extras.lora is None else 2 * len(extras.lora.targets)
        pending = list(chunk.hops)
        while pending:
            hop, x = pending.pop()
            try:
                reply = await self._call(hop, x, grad, positions, mask, extras, chunk.rows)
            except (_RetryableRemoteError, *_RECOVERABLE) as e:
                attempts.failed(hop, e)
                # Recompute this hop's blocks forward on other servers from its kept input; then backward there.
                _, replacement = await self.remote.forward_span(hop.start, hop.end, x, positions, mask, extras,
                                                                chunk.rows, attempts)
                pending.extend(replacement)
                continue
            grad = reply.grad_hidden.to_torch("grad_hidden").to(x)  # x's device and dtype
            if grad_prompts is not None:
                grad_prompts[hop.start:hop.end] += reply.grad_prompts.to_torch("grad_prompts").to(grad_prompts)
            for i, (a, b) in enumerate(zip(reply.grad_lora_a, reply.grad_lora_b)):
                index = hop.start * per_block + 2 * i
                grad_lora[index] += a.to_torch("grad_lora_a").to(grad_lora[index])
                grad_lora[index + 1] += b.to_torch("grad_lora_b").to(grad_lora[index + 1])
        return _ChunkGrads(grad, grad_prompts, grad_lora)

    async def _call(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor | None, extras: Extras, rows: slice) -> BackwardResult:
        wire_format = self.swarm.config.wire_format
        stream = await self.swarm.connect(hop.peer_id, BACKWARD_PROTOCOL)
        try:
            await stream.send(BackwardRequest(
                model_id=self.swarm.model_id, start_block=hop.start, end_block=hop.end,
                hidden=encode_hidden(hidden, wire_format), grad_output=encode_hidden(grad, wire_format),
                position_ids=_optional(positions), attention_mask=_optional(mask),
                prompts=extras.prompts_for(hop, rows), lora=extras.lora_for(hop), adapter=extras.adapter,
                edits=extras.edits_for(hop, rows), receipt=stateless_receipt(self.swarm, hop)))
            reply = _check_reply(await stream.recv(self.swarm.config.step_timeout), BackwardResult, hop)
        finally:
            stream.close()
        _check_grads(reply, hidden, extras, hop, rows, wire_format)
        stateless_accepted(self.swarm, hop, hidden, passes=2)
        return reply


def _check_grads(reply: BackwardResult, hidden: torch.Tensor, extras: Extras, hop: Hop, rows: slice,
                 wire_format: str) -> None:
    """The server's gradients have the shapes of what was sent (else try another server)."""
    problems = []
    if tuple(reply.grad_hidden.shape) != wire_signature(hidden, wire_format)[0]:
        problems.append(f"grad_hidden {list(reply.grad_hidden.shape)}")
    if extras.prompts is not None:
        expected = tuple(extras.prompts[hop.start:hop.end, rows].shape)
        if reply.grad_prompts is None or tuple(reply.grad_prompts.shape) != expected:
            problems.append("grad_prompts")
    if extras.lora is not None:
        sent = extras.lora.flat(hop.start, hop.end)
        got = [t.shape for pair in zip(reply.grad_lora_a, reply.grad_lora_b) for t in pair]
        if [tuple(s) for s in got] != [tuple(t.shape) for t in sent]:
            problems.append("grad_lora")
    if problems:
        raise _RetryableRemoteError(hop.peer_id, (hop.start, hop.end), f"malformed gradients: {', '.join(problems)}")


class RemoteBlocksFunction(torch.autograd.Function):
    """hidden (and deep prompts, LoRA weights) -> output of the last remote block of `span` (None: all blocks),
    differentiable; `edits` (client/edits.py) apply in the forward and in the servers' recomputed forwards."""

    @staticmethod
    def forward(ctx, training: RemoteTraining, positions: torch.Tensor, mask: torch.Tensor | None,
                lora_layout: tuple[float, tuple[str, ...]] | None, adapter: str | None,
                span: tuple[int, int] | None, edits: tuple, hidden: torch.Tensor,
                prompts: torch.Tensor | None, *lora_flat: torch.Tensor) -> torch.Tensor:
        lora = None
        if lora_layout is not None:
            scale, targets = lora_layout
            lora = ClientLora.from_flat(scale, targets, [t.detach() for t in lora_flat])
        extras = Extras(prompts=None if prompts is None else prompts.detach(), lora=lora, adapter=adapter, edits=edits)
        swarm = training.swarm
        output, chunks = swarm.call(training.forward(hidden.detach(), positions, mask, extras, span),
                                    swarm.config.call_timeout)
        ctx.training, ctx.positions, ctx.mask, ctx.extras, ctx.chunks = training, positions, mask, extras, chunks
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        training = ctx.training
        grads = training.swarm.call(training.backward(ctx.chunks, grad_output.contiguous(), ctx.positions, ctx.mask,
                                                      ctx.extras), training.swarm.config.call_timeout)
        return (None, None, None, None, None, None, None, grads.hidden, grads.prompts, *grads.lora)
