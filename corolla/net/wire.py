"""Wire format: length-prefixed msgpack frames holding one typed message each, tensors as raw bytes.

A frame is a 4-byte big-endian length, then msgpack of {"type": <message type>, "v": <version>, "body": {...}}.
Tensors travel as {"dtype", "shape", "data"} with the raw little-endian bytes (bf16 carried as is).
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from typing import ClassVar

import msgpack
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corolla.errors import BadRequestError

WIRE_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 256 * 2**20

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_ITEMSIZES = {name: dtype.itemsize for name, dtype in _DTYPES.items()}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class WireTensor(BaseModel):
    """A tensor on the wire: dtype name, shape and raw bytes (C order)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: str = Field(description="one of float32, float16, bfloat16, int64, int32, bool, uint8 (after decoding)")
    shape: tuple[int, ...] = Field(description="tensor shape; every dimension >= 0")
    data: bytes = Field(description="raw: prod(shape) * itemsize bytes; int8: see INT8_BLOCK")
    codec: str = Field(default="raw", description="raw, or int8: blockwise 8-bit (lossy, float tensors only)")

    @classmethod
    def from_torch(cls, tensor: torch.Tensor, codec: str = "raw") -> "WireTensor":
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise TypeError(f"dtype {tensor.dtype} cannot be sent")
        if codec == "int8":
            return cls(dtype=dtype, shape=tuple(tensor.shape), data=_int8_encode(tensor), codec="int8")
        if codec != "raw":
            raise ValueError(f"unknown codec {codec!r}")
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bytes go through a uint8 view
            flat = tensor.contiguous().reshape(-1)
            data = (flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)).numpy().tobytes()
        else:
            data = tensor.numpy().tobytes()  # C order whatever the strides; one call on the per-token path
        return cls(dtype=dtype, shape=tuple(tensor.shape), data=data)

    def to_torch(self, field: str = "tensor") -> torch.Tensor:
        """Decode, checking that dtype, shape and byte count agree; `field` names the tensor in errors."""
        dtype = _DTYPES.get(self.dtype)
        if dtype is None:
            raise BadRequestError(f"{field}: unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
        if any(d < 0 for d in self.shape):
            raise BadRequestError(f"{field}: negative dimension in shape {list(self.shape)}")
        if self.codec == "int8":
            if self.dtype not in _FLOAT_DTYPES:
                raise BadRequestError(f"{field}: the int8 codec carries float tensors only, not {self.dtype}")
            return _int8_decode(self.data, self.shape, dtype, field)
        if self.codec != "raw":
            raise BadRequestError(f"{field}: unknown codec {self.codec!r}; expected raw or int8")
        expected = math.prod(self.shape) * _ITEMSIZES[self.dtype]
        if len(self.data) != expected:
            raise BadRequestError(
                f"{field}: {len(self.data)} bytes do not match shape {list(self.shape)} of {self.dtype} ({expected} bytes)"
            )
        if expected == 0:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)  # a writable copy

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES


class FrameTooLargeError(BadRequestError):
    """A frame header announced more bytes than allowed. Its payload was not read: the stream is out of sync."""


INT8_BLOCK = 64  # values per block: int8 values (padded to whole blocks), then one float32 scale per block


def wire_bytes(shape: tuple[int, ...], dtype: str, codec: str = "raw") -> int:
    """How many data bytes a tensor of `shape` and `dtype` takes on the wire in `codec` (what WireTensor.data holds)."""
    numel = math.prod(shape)
    if codec == "int8":
        return -(-numel // INT8_BLOCK) * (INT8_BLOCK + 4)
    return numel * _ITEMSIZES[dtype]


FRAME_SLACK_BYTES = 64 * 1024  # a frame's bytes besides its tensors' data: msgpack keys, shapes, small fields


def _int8_encode(tensor: torch.Tensor) -> bytes:
    flat = tensor.float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % INT8_BLOCK)).reshape(-1, INT8_BLOCK)
    scales = padded.abs().amax(dim=1).clamp_min(1e-12) / 127
    quantized = torch.round(padded / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized.numpy().tobytes() + scales.numpy().astype("<f4").tobytes()


def _int8_decode(data: bytes, shape: tuple[int, ...], dtype: torch.dtype, field: str) -> torch.Tensor:
    numel = math.prod(shape)
    blocks = -(-numel // INT8_BLOCK)
    if len(data) != blocks * INT8_BLOCK + 4 * blocks:
        raise BadRequestError(f"{field}: {len(data)} bytes do not match int8 blocks for shape {list(shape)} "
                              f"({blocks * (INT8_BLOCK + 4)} bytes)")
    quantized = torch.from_numpy(np.frombuffer(data, dtype=np.int8, count=blocks * INT8_BLOCK).copy())
    scales = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=blocks * INT8_BLOCK).copy())
    values = quantized.reshape(blocks, INT8_BLOCK).float() * scales[:, None]
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)


class Message(BaseModel):
    """Base of every wire message. Subclasses set TYPE (the name on the wire, never the Python class name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str] = ""  # set by @message_type


_MESSAGE_TYPES: dict[str, type[Message]] = {}


def message_type(name: str):
    """Class decorator: register a Message subclass under a stable wire name."""

    def register(cls: type[Message]) -> type[Message]:
        if name in _MESSAGE_TYPES:
            raise ValueError(f"duplicate wire message type {name!r}")
        cls.TYPE = name
        _MESSAGE_TYPES[name] = cls
        return cls

    return register


def encode(message: Message) -> bytes:
    body = message.model_dump(mode="python")
    return msgpack.packb({"type": message.TYPE, "v": WIRE_VERSION, "body": body}, use_bin_type=True)


def decode(payload: bytes) -> Message:
    """Parse one frame's payload into its typed message; any malformation raises BadRequestError naming it."""
    try:
        envelope = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise BadRequestError(f"frame is not valid msgpack: {e}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"type", "v", "body"}:
        raise BadRequestError("frame must be a map with exactly the keys type, v, body")
    if envelope["v"] != WIRE_VERSION:
        raise BadRequestError(f"wire version {envelope['v']!r} is not supported (this peer speaks {WIRE_VERSION})")
    cls = _MESSAGE_TYPES.get(envelope["type"]) if isinstance(envelope["type"], str) else None
    if cls is None:
        raise BadRequestError(f"unknown message type {envelope['type']!r}")
    if not isinstance(envelope["body"], dict):
        raise BadRequestError(f"{envelope['type']}: body must be a map")
    try:
        return cls.model_validate(envelope["body"])
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadRequestError(f"{envelope['type']}.{where}: {first['msg']}") from None


_LENGTH = struct.Struct(">I")


async def write_frame(writer: asyncio.StreamWriter, message: Message) -> None:
    payload = encode(message)
    # One write, so one send(): two would wake the p2p daemon twice per frame (a measurable cost per token).
    writer.write(_LENGTH.pack(len(payload)) + payload)
    await writer.drain()


class TransferMeter:
    """Network speed seen in real transfers: payloads of large frames over the time their bytes took to arrive."""

    MIN_BYTES = 256 * 1024  # smaller frames measure latency, not bandwidth

    def __init__(self, keep: int = 32):
        self._samples: list[tuple[int, float]] = []
        self._keep = keep

    def record(self, nbytes: int, seconds: float) -> None:
        if nbytes >= self.MIN_BYTES and seconds > 0:
            self._samples = (self._samples + [(nbytes, seconds)])[-self._keep:]

    @property
    def bytes_per_second(self) -> float | None:
        if not self._samples:
            return None
        return sum(n for n, _ in self._samples) / sum(t for _, t in self._samples)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                     meter: TransferMeter | None = None) -> Message:
    """Read one message. Raises EOFError when the peer closed the stream cleanly between frames."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise EOFError("stream closed") from None
        raise ConnectionError("stream closed inside a frame header") from None
    (length,) = _LENGTH.unpack(header)
    if length > max_bytes:
        raise FrameTooLargeError(f"frame of {length} bytes exceeds the limit of {max_bytes} bytes")
    began = time.perf_counter()
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionError("stream closed inside a frame") from None
    if meter is not None:
        meter.record(length, time.perf_counter() - began)
    return decode(payload)
