"""Weight quantization of a server's blocks: bitsandbytes int8 / nf4 on CUDA, torch's dynamic int8 on CPU.

Replaces the nn.Linear modules inside transformers' decoder layers with quantized ones (module instances only;
no transformers code is changed). Embeddings, norms and the client's parts stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from corolla.errors import CorollaError

QUANT_TYPES = ("none", "int8", "nf4")


def quantize_blocks(blocks: list[nn.Module], quant: str, device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
    """Quantize CPU-resident blocks and move them to `device`."""
    if quant not in QUANT_TYPES:
        raise CorollaError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    if quant == "none":
        return [block.to(device) for block in blocks]
    if device.type == "cuda":
        return [_bitsandbytes(block, quant, device, dtype) for block in blocks]
    if quant == "int8" and device.type == "cpu":
        if dtype != torch.float32:
            raise CorollaError("--quant int8 on CPU uses torch's dynamic int8 kernels, which need --dtype float32")
        return [torch.ao.quantization.quantize_dynamic(block, {nn.Linear}, dtype=torch.qint8) for block in blocks]
    raise CorollaError(f"--quant {quant} needs a CUDA device (bitsandbytes); on CPU use --quant int8 or none")


def _bitsandbytes(block: nn.Module, quant: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise CorollaError(f"--quant {quant} needs the bitsandbytes package (pip install bitsandbytes): {e}") from e
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):  # (Falcon's FalconLinear is a subclass; MoE experts are not Linear)
                continue
            if quant == "int8":
                quantized = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                                has_fp16_weights=False, threshold=6.0)
                quantized.weight = bnb.nn.Int8Params(child.weight.data.to(dtype), requires_grad=False,
                                                     has_fp16_weights=False)
            else:
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=dtype, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(child.weight.data.to(dtype), requires_grad=False,
                                                     quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, quantized)
    return block.to(device)  # bitsandbytes quantizes the weights as they move to the GPU


def block_bytes(block: nn.Module) -> int:
    """Bytes of a block's parameters and buffers as stored (quantized weights count their packed size)."""
    total = sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))
    for module in block.modules():  # torch's dynamic int8 keeps packed weights outside parameters
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = module.weight(), module.bias()
            total += weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
    return total
