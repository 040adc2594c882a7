"""Sharded safetensors written tensor by tensor, straight from where each tensor lives.

`safetensors.torch.save_file` needs every tensor of a file in memory at once and copies them
all into one buffer before writing: an export held a 2 GB shard plus its copy, and spent most
of its time copying. A safetensors file is an 8-byte little-endian header length, a JSON header
(each tensor's dtype, shape and [begin, end) byte offsets in the data) and the tensors' bytes
back to back. An export knows every tensor's dtype and shape before reading any (the
checkpoint's metadata), so it plans the shards, writes each file's header first and then each
tensor's bytes as they are produced: a frozen tensor that needs no arithmetic goes from the
checkpoint's memory map to the file in pieces (each rank's fragment), one copy, as `cp` makes.
The files are read by safetensors itself (tests/test_export.py compares every tensor).
"""

from __future__ import annotations

import json
import math
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from ..checkpoint.format import SAFETENSORS_DTYPES


@dataclass(frozen=True)
class Planned:
    """One tensor of the output, as the header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """The entries in order, cut into files of at most max_bytes (a larger tensor alone)."""
    shards: list[list[Planned]] = []
    size = 0
    for e in entries:
        if not shards or (shards[-1] and size + e.nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def file_names(n: int) -> list[str]:
    """transformers' names for n shards (one file: model.safetensors)."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def header(entries: list[Planned], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header of a file holding `entries` back to back."""
    h: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        if e.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{e.name}: safetensors has no code for {e.dtype}")
        h[e.name] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                     "data_offsets": [offset, offset + e.nbytes]}  # fmt: skip
        offset += e.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: Path, entries: list[Planned], pieces: Iterable[list[torch.Tensor]],
               metadata: dict[str, str]) -> None:  # fmt: skip
    """One safetensors file: the header, then for each entry its pieces' bytes (flat tensors of
    the entry's dtype whose concatenation is the tensor in row-major order)."""
    with open(path, "wb") as f:
        f.write(header(entries, metadata))
        for e, parts in zip(entries, pieces, strict=True):
            written = 0
            for p in parts:
                if p.dtype != e.dtype:
                    raise ValueError(f"{e.name}: a piece of dtype {p.dtype}, {e.dtype} planned")
                raw = p.contiguous().reshape(-1).view(torch.uint8)
                f.write(raw.numpy().data)
                written += raw.numel()
            if written != e.nbytes:
                raise ValueError(f"{e.name}: {written} bytes produced, {e.nbytes} planned")


T = TypeVar("T")
R = TypeVar("R")


def ahead(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """fn(item) for each item in order, the next item's computed on a worker thread while the
    caller uses this one (torch and file writes let go of the GIL, so reading and merging the
    next tensor overlaps writing this one; at most two results live at once)."""
    with ThreadPoolExecutor(1) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
