"""Reader of the IDX format (MNIST, Fashion-MNIST), plain or gzipped, with validation."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["read_idx"]

# IDX magic numbers: 0x0000 08 <ndim> for unsigned bytes.
_UBYTE = 0x08


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> Tensor:
    """The uint8 tensor stored in an IDX file (``.gz`` is decompressed). Raises ``ValueError``
    naming the file when the magic number, the dimensions or the size do not check out (for
    example a truncated download)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip: a truncated or corrupt stream
        raise ValueError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _UBYTE or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x000008NN: unsigned bytes)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: expected {expected_ndim} dimensions, the header says {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count:
        raise ValueError(
            f"{path}: the header announces {count} bytes of data for shape {tuple(dims)}, "
            f"the file holds {len(raw) - header}"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(dims)
