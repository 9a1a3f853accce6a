"""The exchange file: one network's weights after one epoch, as its ring successor reads them.

A flat file that is read with one ``read`` and viewed, never unpickled, so it can hold no code and the
656 tensors of a ResNet-110 load in a few milliseconds (``torch.load`` spends about 30 ms unpickling
them). Layout, all integers little-endian::

    bytes 0-7        the signature b"GRAFTEX1"
    bytes 8-15       H, the header's length in bytes (unsigned)
    bytes 16-(16+H)  the header: UTF-8 JSON, padded with spaces so that the data starts at a multiple of 64
    the rest         the data: D bytes (a multiple of 64), every tensor in its dtype's native
                     (little-endian) layout, contiguous, at a multiple of 64 bytes from the data's start

The header is ``{"format": FORMAT, "meta": {...}, "data_bytes": D, "tensors": [[key, dtype, shape,
offset], ...]}``, the tensors in state_dict order and ``offset`` counted from the data's start. A file is
exactly ``16 + H + D`` bytes; any other size is a truncated or corrupt file. ``meta`` holds plain JSON
values (the ring's identity, the network, the epoch, the architecture and the grafting settings).

Files are written through :func:`grafting.checkpoint.write_atomic` (a temporary file, fsync, rename), so
a reader sees a complete file or none. A :class:`Packed` snapshot can be taken on the training thread
and written later by another one: the snapshot is a copy, so the weights may change meanwhile.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from grafting.checkpoint import open_to_read, write_atomic
from grafting.errors import CheckpointError, UsageError

__all__ = ["FORMAT", "SIGNATURE", "Packed", "pack", "read"]

FORMAT = "filter-grafting-exchange/1"
SIGNATURE = b"GRAFTEX1"
_PREFIX = struct.Struct("<8sQ")  # the signature and the header's length
_ALIGN = 64  # bytes: where the data and every tensor start (a cache line; any dtype's alignment)
_MAX_HEADER = 64 << 20  # a header beyond this is corrupt (ResNet-110's is about 60 kB)
# The dtypes a state_dict holds, by the names the header uses.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# What a torch.save file starts with: a zip archive (since torch 1.6) or a bare pickle (older).
_TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")


def _round_up(value: int) -> int:
    return -(-value // _ALIGN) * _ALIGN


@functools.lru_cache(maxsize=1024)  # a network has a few dozen shapes, met again in every file
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


Index = list[tuple[str, torch.dtype, tuple[int, ...], int]]  # (key, dtype, shape, offset in the data) per tensor


def _views(buffer: torch.Tensor, start: int, index: Index) -> dict[str, torch.Tensor]:
    """One tensor per index entry, each a view into ``buffer`` (uint8, a length that is a multiple of 8)
    at ``start + offset``: the buffer is viewed once per dtype and each tensor is one ``as_strided``."""
    whole: dict[torch.dtype, torch.Tensor] = {}
    views: dict[str, torch.Tensor] = {}
    for key, dtype, shape, offset in index:
        if dtype not in whole:
            whole[dtype] = buffer.view(dtype)
        size = whole[dtype].element_size()
        views[key] = whole[dtype].as_strided(shape, _strides(shape), (start + offset) // size)
    return views


@dataclass
class Packed:
    """A state_dict ready to be written: the header, and every tensor's bytes in one CPU buffer.

    ``ready`` is set when the bytes are still being copied from a GPU (a CUDA event recorded after the
    copy, into ``data`` in pinned memory): :meth:`write` waits for it, so the copy never holds up the
    thread that packed.
    """

    header: bytes
    index: Index
    data: torch.Tensor
    views: list[torch.Tensor]  # one per index entry, into ``data``
    pinned: bool = False
    ready: Any = None

    def write(self, path: str | Path) -> None:
        """Write the file to ``path`` atomically (``CheckpointError`` when the disk refuses)."""
        if self.ready is not None:
            self.ready.synchronize()
        write_atomic(path, self._write_to)

    def _write_to(self, handle: BinaryIO) -> None:
        handle.write(self.header)
        handle.write(self.data.numpy().data)


def _index(state: Mapping[str, Any]) -> tuple[Index, int]:
    """Where each tensor of ``state`` goes in the data, and the data's size."""
    index: Index = []
    end = 0
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(
                f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor; only tensors are exchanged"
            )
        if value.dtype not in _NAMES:
            raise UsageError(
                f"state_dict entry '{key}' has dtype {value.dtype}, which exchange files do not hold; "
                f"use one of: {', '.join(DTYPES)}"
            )
        index.append((key, value.dtype, tuple(value.shape), end))
        end = _round_up(end + value.numel() * value.element_size())
    return index, end


def _header(index: Index, size: int, meta: Mapping[str, Any]) -> bytes:
    entries = [[key, _NAMES[dtype], list(shape), offset] for key, dtype, shape, offset in index]
    try:
        text = json.dumps(
            {"format": FORMAT, "meta": dict(meta), "data_bytes": size, "tensors": entries},
            separators=(",", ":"),
            allow_nan=False,
        )
        plain = json.loads(json.dumps(dict(meta))) == dict(meta)  # what a reader gets back (no tuples)
    except (TypeError, ValueError):
        plain = False
    if not plain:
        raise UsageError(
            f"exchange meta must hold plain JSON values (str, int, finite float, bool), got {dict(meta)!r}"
        )
    body = text.encode()
    padded = _round_up(_PREFIX.size + len(body)) - _PREFIX.size
    return _PREFIX.pack(SIGNATURE, padded) + body + b" " * (padded - len(body))


def pack(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any], reuse: Packed | None = None) -> Packed:
    """Copy ``state`` (tensors on any one device) and ``meta`` into a :class:`Packed` file.

    ``reuse``, the previous epoch's Packed of the same network, lends its buffer when the tensors'
    keys, dtypes and shapes are the same (write it before: its bytes are overwritten). From a GPU the
    tensors are gathered into one buffer there and copied to pinned memory with one asynchronous copy.
    """
    index, size = _index(state)
    tensors = [state[key].detach() for key, _, _, _ in index]
    devices = {t.device for t in tensors}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")  # mixed: copied one by one
    on_gpu = device.type == "cuda"
    if reuse is not None and reuse.index == index and reuse.pinned == on_gpu:
        data, views = reuse.data, reuse.views
    else:  # zeros: the padding between tensors is written too, and must not carry stray memory
        data = torch.zeros(size, dtype=torch.uint8, pin_memory=on_gpu)
        views = list(_views(data, 0, index).values())
    ready = None
    if on_gpu:
        gathered = torch.zeros(size, dtype=torch.uint8, device=device)
        torch._foreach_copy_(list(_views(gathered, 0, index).values()), tensors)
        data.copy_(gathered, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))  # the stream the copy was queued on
    elif tensors:
        torch._foreach_copy_(views, tensors)
    return Packed(_header(index, size, meta), index, data, views, on_gpu, ready)


# ----------------------------------------------------------------------------------------------
# Reading


def _open(path: Path) -> tuple[int, int]:
    """An open descriptor of the regular file ``path`` and its size; one-line errors otherwise."""
    fd, mode = open_to_read(path, "exchange file")
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file (a folder, a pipe or a device); move it away")
    return fd, os.fstat(fd).st_size


def _read_into(fd: int, buffer: torch.Tensor) -> int:
    """Fill ``buffer`` from the start of ``fd``; the number of bytes read (less at the end of the file)."""
    view, done = buffer.numpy().data, 0
    while done < len(view):
        got = os.readv(fd, [view[done:]])
        if got == 0:
            break
        done += got
    return done


def _check_entry(entry: Any, data_bytes: int) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    """One index entry as ``(key, dtype, shape, offset)``; ValueError saying what is wrong with it."""
    if type(entry) is not list or len(entry) != 4:
        raise ValueError(f"has a malformed tensor entry {str(entry)[:60]}")
    key, dtype_name, shape, offset = entry
    if type(key) is not str or dtype_name not in DTYPES:
        raise ValueError(f"has an entry with an unknown dtype or key ({str(entry)[:60]})")
    if type(shape) is not list or any(type(s) is not int or s < 0 for s in shape):
        raise ValueError(f"gives '{key}' an impossible shape {shape}")
    dtype = DTYPES[dtype_name]
    if (
        type(offset) is not int
        or offset < 0
        or offset % _ALIGN
        or offset + math.prod(shape) * dtype.itemsize > data_bytes
    ):
        raise ValueError(f"places '{key}' outside its data")
    return key, dtype, tuple(shape), offset


def _parse_header(text: bytes, data_bytes_left: int) -> tuple[dict[str, Any], Index, int]:
    """The header's meta, index and data size; ValueError saying what is wrong."""
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("is not readable JSON") from None
    if not isinstance(header, dict):
        raise ValueError("is not a JSON object")
    if header.get("format") != FORMAT:
        raise _OtherFormat(str(header.get("format")))
    meta, entries, data_bytes = header.get("meta"), header.get("tensors"), header.get("data_bytes")
    if not isinstance(meta, dict) or not isinstance(entries, list):
        raise ValueError("lacks its meta or its tensor index")
    if type(data_bytes) is not int or data_bytes % _ALIGN or data_bytes != data_bytes_left:
        raise ValueError(f"describes {data_bytes} bytes of data where the file holds {data_bytes_left}")
    index = [_check_entry(entry, data_bytes) for entry in entries]
    if len({key for key, _, _, _ in index}) != len(index):
        raise ValueError("names a tensor twice")
    return meta, index, data_bytes


class _OtherFormat(ValueError):
    """The header names another version of the format."""


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta of the exchange file ``path`` (its ring, network, epoch and settings), from its header alone:
    the tensors are not read. A file that is no readable exchange file of this format is a one-line
    :class:`CheckpointError`."""
    path = Path(path)
    fd, size = _open(path)
    try:
        start = os.pread(fd, _PREFIX.size, 0)
        if len(start) < _PREFIX.size or start[:8] != SIGNATURE:
            raise CheckpointError(f"{path} is not an exchange file of this version")
        _, header_bytes = _PREFIX.unpack(start)
        data_start = _PREFIX.size + header_bytes
        if header_bytes > _MAX_HEADER or data_start > size:
            raise CheckpointError(f"{path} is truncated or corrupt (its header's length is {header_bytes})")
        text = os.pread(fd, header_bytes, _PREFIX.size)
    finally:
        os.close(fd)
    try:
        meta, _, _ = _parse_header(text, size - data_start)
    except ValueError as err:
        raise CheckpointError(f"{path}'s header {err}") from None
    return meta


def read(
    path: str | Path, *, advice: str = "delete it", pin_memory: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (in state_dict order) and the meta of the exchange file ``path``.

    One read of the whole file into one buffer (pinned memory with ``pin_memory``, so that a copy to a
    GPU runs asynchronously); every tensor is a view into it. Everything the views depend on is checked
    first: the signature, the header, each tensor's place inside the data and the file's size. A file
    that fails is a one-line :class:`CheckpointError` naming it and ending with ``advice``; a
    ``torch.save`` file (an exchange file of an older version, or a checkpoint) is named as such and
    never unpickled.
    """
    path = Path(path)
    fd, size = _open(path)
    try:
        start = os.pread(fd, _PREFIX.size, 0)
        if len(start) < _PREFIX.size or start[:8] != SIGNATURE:
            if start.startswith(_TORCH_SAVE_STARTS):
                raise CheckpointError(
                    f"{path} is a torch.save file (an exchange file of an older version of filter-grafting, or a "
                    f"checkpoint), not an exchange file of this version, which holds flat tensors and no code; {advice}"
                )
            raise CheckpointError(f"{path} is not an exchange file (it lacks the {SIGNATURE!r} signature); {advice}")
        _, header_bytes = _PREFIX.unpack(start)
        data_start = _PREFIX.size + header_bytes
        if header_bytes > _MAX_HEADER or data_start > size or data_start % _ALIGN:
            raise CheckpointError(f"{path} is truncated or corrupt (its header's length is {header_bytes}); {advice}")
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
        got = _read_into(fd, buffer)
    finally:
        os.close(fd)
    if got != size:
        raise CheckpointError(f"{path} is truncated or corrupt (it shrank while being read); {advice}")
    try:
        meta, index, _ = _parse_header(buffer[_PREFIX.size : data_start].numpy().tobytes(), size - data_start)
    except _OtherFormat as other:
        raise CheckpointError(
            f"{path} is in exchange format {other}, this version of filter-grafting reads {FORMAT}: every network "
            f"of a ring must run the same version; {advice}"
        ) from None
    except ValueError as err:
        raise CheckpointError(f"{path} is truncated or corrupt (its header {err}); {advice}") from None
    state = _views(buffer, data_start, index)
    for key, dtype, _, _ in index:
        if dtype == torch.bool and state[key].numel() and int(state[key].view(torch.uint8).max()) > 1:
            raise CheckpointError(f"{path} is truncated or corrupt ('{key}' is not a valid bool tensor); {advice}")
    return state, meta
