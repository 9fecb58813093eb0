"""A checkpoint folder's files read defensively: bounded in size, validated before any tensor is
allocated, every failure a `CheckpointError` naming the file and what was expected.

- `adapter_config.json`: a regular file of at most 1 MiB, UTF-8, one JSON object; NaN, Infinity
  and numbers that overflow to them are refused (peft's `json` would load them as floats).
- `adapter_model.safetensors`: the 8-byte header length is checked against the file's size before
  the header is read; every entry must name a floating-point dtype (an integer one only where the
  model holds an integer buffer under that key), a shape of non-negative ints
  and data offsets inside the file whose length is exactly the shape's bytes. Only then are the
  tensors loaded, and every one must be finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from peftc.errors import CheckpointError

__all__ = ["read_config", "read_header", "check_finite", "check_integers", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# integer tensors load only where the model holds an integer buffer (SHiRA's positions)
INT_DTYPES = {"I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8}


def read_config(path: Path) -> dict[str, Any]:
    data = _read_regular(path, MAX_CONFIG_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path} is not UTF-8 text (byte {e.start}); it is not a config"
        ) from None
    try:
        config = json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object of config fields"
        )
    for key in ("peft_type", "peftc_technique", "task_type"):
        if key in config and config[key] is not None and not isinstance(config[key], str):
            raise CheckpointError(
                f"{path}: {key} must be a string, got {type(config[key]).__name__}"
            )
    if "peftc_technique" in config and not isinstance(config.get("options", {}), dict):
        raise CheckpointError(f"{path}: options must be an object of the technique's options")
    return config


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file, validated against its size."""
    size = _regular_size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even a header length")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is truncated or corrupt: its header claims {length:,} bytes, the file "
                f"holds {size - 8:,} after the length"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not an object")
    data_size = size - 8 - length
    return {
        name: _entry(path, name, info, data_size)
        for name, info in header.items()
        if name != "__metadata__"
    }


def check_integers(path: Path, found: dict[str, torch.Tensor], model: dict[str, torch.Tensor]):
    """Refuse integer tensors where the model's tensor of that key is floating point: an int64
    weight would be cast silently."""
    for key, tensor in found.items():
        if not tensor.is_floating_point() and key in model and model[key].is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {key!r} is {tensor.dtype}; it is a floating-point weight in "
                "the model, so the file is not this adapter or was written wrongly"
            )


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors holding NaN or infinity, by name (a model with them computes NaN)."""
    bad = sorted(
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensors hold NaN or infinity ({', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}); the adapter is broken, retrain or re-save it"
        )


def _entry(path: Path, name: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...]]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} has no dtype, shape and offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where} has no dtype")
    if dtype not in FLOAT_DTYPES and dtype not in INT_DTYPES:
        raise CheckpointError(
            f"{where} is {dtype}; adapter weights are floating point "
            f"({', '.join(FLOAT_DTYPES)}), so the file is not an adapter or was written wrongly"
        )
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise CheckpointError(f"{where} has shape {shape!r}; expected a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_count(o) for o in offsets)
        or not offsets[0] <= offsets[1] <= data_size
    ):
        raise CheckpointError(
            f"{where} has data offsets {offsets!r} outside the file's {data_size:,} data bytes"
        )
    expected = math.prod(shape) * {**FLOAT_DTYPES, **INT_DTYPES}[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{where}: shape {shape} in {dtype} is {expected:,} bytes, its offsets span "
            f"{offsets[1] - offsets[0]:,}"
        )
    return dtype, tuple(shape)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _regular_size(path: Path) -> int:
    if not path.is_file():  # a device (/dev/zero), a fifo: never read
        raise CheckpointError(f"{path} is not a regular file")
    return path.stat().st_size


def _read_regular(path: Path, limit: int) -> bytes:
    """The file's bytes, refused beyond `limit` bytes or when it is not a regular file."""
    size = _regular_size(path)
    if size > limit:
        raise CheckpointError(f"{path} is {size:,} bytes; a config is at most {limit:,}")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path} holds more than {limit:,} bytes; a config is not that long")
    return data


def _non_finite(constant: str) -> float:
    raise ValueError(f"{constant} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to {value}")
    return value
