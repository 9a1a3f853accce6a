"""Checkpoint files: crash-safe writes, readable errors, the layouts users already have, RNG state.

Every file this project writes goes through :func:`save_atomic`, so a process killed at any instant
(SIGKILL included) or a full disk leaves either the previous complete file or the new complete file,
never a half-written one. Reading goes through :func:`load_file`, which turns the many ways
``torch.load`` fails on a damaged file into one :class:`CheckpointError` line that names the file.
The project's text files (``config.json``, ``ring.json``, ``metrics.jsonl``) are read with
:func:`read_text_file` and :func:`parse_json`: like :func:`load_file` they never block on a FIFO, and
they refuse a file far larger than any of its kind, or JSON nested too deeply to parse, as errors the
caller turns into one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pickle
import random
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from grafting.errors import CheckpointError, first_line

logger = logging.getLogger(__name__)

# Wrapper keys under which known projects store the weights, in the order they are tried:
# ours and torchvision's references use 'model'; many projects use 'state_dict'; the original
# filter-grafting .t7 files use 'net' (next to 'acc' and 'epoch').
_WRAPPER_KEYS = ("model", "state_dict", "net")

# Prefixes added by wrappers around a module: DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _temp_path(path: Path) -> Path:
    """The temporary file next to ``path``; the pid keeps concurrent writers apart."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable; silently skipped where directories cannot be synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems (and all of Windows) refuse fsync on a directory; the rename still happened.
        pass
    finally:
        os.close(fd)


def _os_error_behind(err: BaseException) -> OSError | None:
    """The OSError that caused ``err``, if any; torch.save reports a failed write as a RuntimeError."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is always either the old or the new complete file
    (:func:`write_atomic`)."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a fresh file so that ``path`` is always either the old or the new complete file.

    The data goes to ``<path>.tmp-<pid>`` in the same folder, is flushed and fsynced, and then renamed
    onto ``path`` (a rename within one file system is atomic, also on NFS). If writing fails (a full disk,
    a quota, a vanished folder) the temporary file is removed, ``path`` is untouched and a
    :class:`CheckpointError` says so. A process killed meanwhile leaves only the temporary file, which
    no reader opens and :func:`remove_temp_files` deletes.
    """
    path = Path(path)
    temp = _temp_path(path)
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temp.unlink()
        os_error = _os_error_behind(err)
        if os_error is None:
            raise
        reason = os_error.strerror or str(os_error)
        raise CheckpointError(f"could not write {path}: {reason}; the previous checkpoint is intact") from err
    _fsync_dir(path.parent)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` the way :func:`save_atomic` writes checkpoints (temporary file, rename)."""
    path = Path(path)
    temp = _temp_path(path)
    try:
        temp.write_text(text)
        os.replace(temp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise CheckpointError(
            f"could not write {path}: {err.strerror or err}; free space or fix the permissions of its folder"
        ) from None


def remove_temp_files(folder: str | Path, names: re.Pattern[str] | None = None) -> list[Path]:
    """Delete the half-written ``<name>.tmp-<pid>`` files a killed writer left in ``folder``; return them.

    Only names whose ``<name>`` part matches ``names`` (all, when None). Call it only while holding
    the lock of the network that writes these files, so that no live writer owns them.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            name, sep, pid = entry.name.rpartition(".tmp-")
            if not (sep and pid.isdigit() and entry.is_file(follow_symlinks=False)):
                continue
            if names is not None and not names.fullmatch(name):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                logger.info("removed %s, left by an interrupted write", entry.path)
    return removed


# The most a JSON file of this project (config.json, ring.json) holds: a few kilobytes in practice.
JSON_FILE_LIMIT = 16 * 2**20


class NotRegularFileError(OSError):
    """A pipe, socket or device where a file is read (``strerror`` says so)."""


def open_regular_file(path: str | Path) -> int:
    """A read-only descriptor of the regular file ``path`` (the caller closes it), opened without waiting
    (:func:`_open_without_waiting`): a FIFO without a writer would wait for one forever, and a device may
    never end. A folder raises :class:`IsADirectoryError`, anything else that is not a regular file
    :class:`NotRegularFileError`, a missing file :class:`FileNotFoundError`."""
    fd, mode = _open_without_waiting(path)
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        raise NotRegularFileError(errno.EINVAL, "is not a regular file (a pipe or a device)", str(path))
    return fd


def _size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def read_text_file(path: str | Path, *, max_bytes: int = JSON_FILE_LIMIT) -> str:
    """The UTF-8 text of the regular file ``path``. Raises :class:`OSError` when it cannot be read, is not
    a regular file (:func:`open_regular_file`) or holds more than ``max_bytes`` (``strerror`` says which),
    and :class:`UnicodeDecodeError` (a :class:`ValueError`) when it is not text."""
    with open(open_regular_file(path), "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        size = max(os.stat(path).st_size, len(data))
        raise OSError(
            errno.EFBIG, f"holds {_size_text(size)}, far more than such a file ever does ({_size_text(max_bytes)})"
        )
    return data.decode("utf-8")


def parse_json(text: str) -> Any:
    """``json.loads`` that raises :class:`ValueError` also for JSON nested too deeply for Python's parser
    (a :class:`RecursionError` otherwise)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json_file(path: str | Path, *, max_bytes: int = JSON_FILE_LIMIT) -> Any:
    """The JSON value in ``path``: :func:`read_text_file` then :func:`parse_json` (OSError, ValueError)."""
    return parse_json(read_text_file(path, max_bytes=max_bytes))


def _short_reason(err: BaseException) -> str:
    """One short line describing why ``torch.load`` failed, without torch's multi-paragraph advice."""
    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unpickler:
        text = unpickler.group(1)
    line = text.strip().splitlines()[0] if text.strip() else ""
    # torch's messages continue with advice after the first sentence; keep only the diagnosis.
    first_sentence = line.split(". ")[0].rstrip(".")
    if len(first_sentence) > 120:
        first_sentence = first_sentence[:117] + "..."
    name = type(err).__name__
    if not first_sentence and isinstance(err, EOFError):
        first_sentence = "unexpected end of file"
    return f"{name}: {first_sentence}" if first_sentence else name


def _open_without_waiting(path: str | Path) -> tuple[int, int]:
    """A read-only descriptor of ``path`` and its ``st_mode``, blocking only for a regular file (the caller
    checks the file type and closes the descriptor). A FIFO opens at once instead of waiting for a writer,
    and reading it without O_NONBLOCK could still block: it is left non-blocking. OSError when it cannot
    be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        os.set_blocking(fd, True)
    return fd, mode


def open_to_read(path: Path, kind: str) -> tuple[int, int]:
    """:func:`_open_without_waiting`, with a one-line :class:`CheckpointError` naming the ``kind`` of file
    when it cannot be opened."""
    try:
        return _open_without_waiting(path)
    except FileNotFoundError:
        raise CheckpointError(f"{kind} {path} does not exist; check the path") from None
    except PermissionError:
        raise CheckpointError(f"cannot read {path}: permission denied; fix its permissions") from None
    except OSError as err:
        raise CheckpointError(f"cannot open {path}: {err.strerror or err}; check the path") from None


def load_file(
    path: str | Path,
    *,
    weights_only: bool = True,
    map_location: Any = "cpu",
    advice: str = "delete it or resume from an earlier checkpoint",
) -> Any:
    """``torch.load`` a checkpoint, turning every failure into a one-line :class:`CheckpointError`.

    A missing file, something that is not a regular file (a folder, a FIFO: read, it would block
    forever), a truncated or corrupt file, and a file holding Python objects that the safe
    ``weights_only`` loader refuses (a whole ``nn.Module``) each get their own message naming ``path``.
    ``advice`` ends the message for a damaged file.
    """
    path = Path(path)
    fd, mode = open_to_read(path, "checkpoint")
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"{path} is a directory, not a checkpoint file; pass the path of a .pt/.pth/.t7 file")
        raise CheckpointError(f"{path} is not a regular file (a pipe or a device); replace it by a checkpoint file")
    with open(fd, "rb") as handle:
        try:
            return torch.load(handle, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            # torch words it "Unsupported global: GLOBAL x" for classes, "unsupported GLOBAL x" for blocked modules.
            refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(err))
            if refused:
                raise CheckpointError(
                    f"{path} holds Python objects ({refused.group(1)}) that safe loading refuses; only tensors and "
                    "plain data are read: if you trust the file, re-save its model.state_dict()"
                ) from err
            raise _corrupt(path, err, advice) from err
        except Exception as err:  # zipfile, EOFError, RuntimeError from the zip reader, pickle errors, ...
            raise _corrupt(path, err, advice) from err


def _corrupt(path: Path, err: BaseException, advice: str) -> CheckpointError:
    """The error for a file that exists but cannot be read back."""
    return CheckpointError(f"{path} is truncated or corrupt ({_short_reason(err)}); {advice}")


# How many times larger than a reference (this network's own tensor) a value may be. Weights or
# BatchNorm statistics of two networks trained on the same task differ by small factors; a million
# times means a network that diverged or a file edited by hand, and grafted in or resumed from, such
# values spoil the run. Relative, so that large constant buffers (attention masks) pass.
MAGNITUDE_RATIO = 1e6


def largest_magnitudes(tensors: Sequence[torch.Tensor]) -> list[float]:
    """The largest absolute value of each tensor (NaN when it holds a NaN, else inf when it holds an
    infinity), with one host transfer per device: a few fused kernels for a whole model, not two host
    synchronisations per tensor. Every tensor must be floating and non-empty."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(i)
    per_device: dict[torch.device, list[tuple[list[int], torch.Tensor]]] = {}
    for (device, _), members in groups.items():
        chosen = [tensors[i].detach() for i in members]
        maxima = torch.stack(torch._foreach_max(torch._foreach_abs(chosen)))  # max propagates NaN
        per_device.setdefault(device, []).append((members, maxima.to(torch.float64)))
    values = [0.0] * len(tensors)
    for parts in per_device.values():
        flat = torch.cat([maxima for _, maxima in parts]).tolist()  # the one transfer of this device
        members = [i for indices, _ in parts for i in indices]
        for i, value in zip(members, flat):
            values[i] = value
    return values


def _checked(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0


def weights_problem(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None) -> str:
    """What makes ``state`` unfit to train on ('' when nothing), naming the first tensor concerned: NaN or
    infinite values, or, given a ``reference`` state_dict, values beyond :data:`MAGNITUDE_RATIO` times the
    reference tensor's largest magnitude (at least 1). Vectorised (:func:`largest_magnitudes`)."""
    keys = [key for key, value in state.items() if _checked(value)]
    largest = largest_magnitudes([state[key] for key in keys])
    # Only a value beyond MAGNITUDE_RATIO can exceed that many times a scale of at least 1: the
    # reference is read only for those tensors (usually none, so a GPU reference costs nothing).
    own_state = reference if reference is not None else {}
    suspects = [key for key, value in zip(keys, largest) if value > MAGNITUDE_RATIO and _checked(own_state.get(key))]
    scale = dict(zip(suspects, largest_magnitudes([own_state[key] for key in suspects])))
    for key, value in zip(keys, largest):
        if not math.isfinite(value):
            return f"holds NaN or infinite values ({key})"
        if key in scale:
            own = max(scale[key], 1.0)
            if value > MAGNITUDE_RATIO * own:
                return (
                    f"holds values up to {value:.3g} ({key}), more than {MAGNITUDE_RATIO:g} times this network's "
                    f"{own:.3g}"
                )
    return ""


def _is_state_dict(obj: Any) -> bool:
    """True for a non-empty mapping of string keys to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())
    )


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove 'module.' / '_orig_mod.' while every key carries it (they can be nested either way)."""
    stripped = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in stripped):
                stripped = {key[len(prefix) :]: value for key, value in stripped.items()}
                changed = True
    return stripped


def _describe_keys(obj: Any) -> str:
    """The top-level keys of ``obj`` for an error message, or its type when it is not a mapping."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}, not a dict"
    if not obj:
        return "keys: none"
    names = [str(key) for key in obj]
    shown = ", ".join(names[:12])
    if len(names) > 12:
        shown += f", ... ({len(names)} in all)"
    return f"keys: {shown}"


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint, in their original order, without wrapper prefixes.

    Accepted layouts: a bare state_dict, or a dict holding one under 'model', 'state_dict' or 'net'
    (other entries such as 'acc', 'epoch' or 'optimizer' are ignored). A ``module.`` (DataParallel/DDP)
    or ``_orig_mod.`` (torch.compile) prefix is removed when every key has it. ``source`` names the
    file in error messages.
    """
    if _is_state_dict(obj):
        return _strip_wrapper_prefixes(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key not in obj:
                continue
            inner = obj[key]
            if _is_state_dict(inner):
                return _strip_wrapper_prefixes(inner)
            if isinstance(inner, torch.nn.Module):
                raise CheckpointError(
                    f"{source}: '{key}' holds a whole {type(inner).__name__} module, which is not supported; "
                    "re-save it as model.state_dict()"
                )
            raise CheckpointError(
                f"{source}: '{key}' holds {_describe_keys(inner)} rather than a state_dict of tensors; "
                "expected a state_dict or a dict with 'model', 'state_dict' or 'net'"
            )
    if isinstance(obj, torch.nn.Module):
        raise CheckpointError(
            f"{source}: holds a whole {type(obj).__name__} module, which is not supported; "
            "re-save it as model.state_dict()"
        )
    raise CheckpointError(
        f"{source}: unknown checkpoint layout ({_describe_keys(obj)}); "
        "expected a state_dict or a dict with 'model', 'state_dict' or 'net'"
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in checkpoint ``path``, whatever its layout (see :func:`extract_state_dict`),
    loaded with ``weights_only=True``."""
    return extract_state_dict(load_file(path, weights_only=True), source=str(path))


def class_count_misfit(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """'has K classes but this run trains J' when the last weight matrix differs in its output count
    only, else ''."""
    classifier = next((k for k in reversed(list(expected)) if expected[k].dim() >= 2), None)
    if classifier is None or not isinstance(given.get(classifier), torch.Tensor):
        return ""
    mine, theirs = tuple(expected[classifier].shape), tuple(given[classifier].shape)
    if len(mine) == len(theirs) and mine[1:] == theirs[1:] and mine[0] != theirs[0]:
        return f"has {theirs[0]} classes but this run trains {mine[0]} ('{classifier}')"
    return ""


def state_dict_misfit(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """Why ``given`` cannot stand in for ``expected`` ('' when it can): the same keys, each with the same
    shape, and a floating dtype wherever ``expected`` has one. A different class count is named as such."""
    classes = class_count_misfit(expected, given)
    if classes:
        return classes
    for key, tensor in expected.items():
        if key not in given:
            return f"has no entry '{key}'"
        other = given[key]
        if not isinstance(other, torch.Tensor):
            return f"holds a {type(other).__name__} for '{key}', not a tensor"
        if tuple(other.shape) != tuple(tensor.shape):
            return f"has shape {tuple(other.shape)} for '{key}' where {tuple(tensor.shape)} is expected"
        if tensor.is_floating_point() and not other.is_floating_point():
            return f"has dtype {other.dtype} for '{key}' where a floating dtype ({tensor.dtype}) is expected"
    extra = next((k for k in given if k not in expected), None)
    if extra is not None:
        return f"has an entry '{extra}' that the architecture lacks"
    return ""


def load_weights_into(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str, expected: str, advice: str
) -> None:
    """``model.load_state_dict(state)``; a mismatch (other architecture or class count) becomes one
    CheckpointError line: ``<source> does not fit <expected>: it <reason>; <advice>``."""
    problem = state_dict_misfit(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source} does not fit {expected}: it {problem}; {advice}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit {expected} ({first_line(err)}); {advice}") from None


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator training touches, as plain data that ``weights_only`` loads.

    Covers Python's ``random``, numpy's global generator, torch's CPU generator and, when CUDA is
    available, the generator of every visible GPU. numpy's state tuple is stored as a dict with the
    key array as an int64 tensor, because numpy arrays do not survive ``torch.load(weights_only=True)``.
    """
    python_version, python_internal, python_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(python_version),
            "internal": [int(word) for word in python_internal],
            "gauss_next": python_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [tensor.cpu() for tensor in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back generator states captured by :func:`capture_rng_state` (after a save/load round trip)."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(word) for word in python["internal"]), python["gauss_next"]))

    numpy_state = state["numpy"]
    keys = numpy_state["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state(
        (
            numpy_state["name"],
            keys.astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )

    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))

    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if visible != len(cuda_states):
            # A run resumed on a different number of GPUs: restore what matches, the rest start fresh.
            logger.warning(
                "checkpoint holds RNG states of %d GPUs but %d are visible; restoring the first %d",
                len(cuda_states),
                visible,
                min(visible, len(cuda_states)),
            )
        for index, cuda_state in enumerate(cuda_states[:visible]):
            torch.cuda.set_rng_state(cuda_state.cpu().to(torch.uint8), device=index)
