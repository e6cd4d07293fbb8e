"""Bytes for objects that cross a process boundary: a worker's pipe, a Flower record."""

from __future__ import annotations

import io

import torch


def pack(obj) -> bytes:
    """``obj`` (tensors, dicts, lists; for trusted pipes also functions) as bytes.

    torch.save moves tensors as plain bytes: multiprocessing would put each of a client's
    hundreds of small tensors into its own shared-memory segment.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes, trusted: bool = False):
    """The object :func:`pack` made. Only a ``trusted`` source (this program's own worker)
    may send more than tensors and plain containers: anything else is refused on load."""
    return torch.load(io.BytesIO(data), weights_only=not trusted)
