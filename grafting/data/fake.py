"""Generated stand-ins for CIFAR and ImageNet, written in the datasets' real on-disk formats.

Tests, the quickstart and the benchmarks need data without a download. The stand-ins go through
exactly the code that reads the real datasets (torchvision's CIFAR pickles, ImageFolder trees of
JPEG files), and their images are learnable: every class has its own colour and stripe pattern
under noise, so a few epochs of training reach accuracy well above chance.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Callable, ClassVar, cast

import numpy as np
from PIL import Image

from grafting.errors import GraftingError, UsageError

__all__ = [
    "write_fake_cifar",
    "write_fake_imagefolder",
    "MARKER_NAME",
    "is_generated_stand_in",
    "stand_in_description",
    "MAX_IMAGE_SIZE",
    "MAX_CIFAR_SPLIT",
]

logger = logging.getLogger(__name__)

MARKER_NAME = "GENERATED_STAND_IN.txt"
_MARKER_TEXT = (
    "The files in this folder are GENERATED stand-ins written by grafting.data.fake ({what}).\n"
    "They are not the real dataset: accuracies measured on them say nothing about the paper.\n"
)
_IMAGE_EXTENSIONS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}
# Rows generated at once: bounds the float64 scratch memory to about 100 MB at 32x32.
_CHUNK = 4000
# The largest side of a generated ImageFolder image: above ImageNet's typical 500 pixels, and small enough that
# one image's float64 scratch (about 40 MB at 1024 + a sixth) never exhausts memory.
MAX_IMAGE_SIZE = 1024
# The most images of one split of a generated CIFAR: ten times CIFAR's training set. Every row is held in
# memory before it is written (3 KB each, about twice that while pickling): 1.5 GB at this bound, where
# 10**9 would ask for terabytes.
MAX_CIFAR_SPLIT = 500_000
# What a real dataset leaves in a folder: a stand-in is never written over it.
_REAL_DATA = ("cifar-10-batches-py", "cifar-100-python", "train", "val")


class _Py2Str(bytes):
    """Bytes that pickle as a Python 2 ``str``, which is what the real CIFAR files hold.

    A Python 2 string unpickles as ``bytes`` with ``encoding='bytes'`` (the CIFAR web page's recipe,
    giving keys like ``b'data'``) and as ``str`` with ``encoding='latin1'`` (torchvision's reader).
    Only this opcode makes one file serve both readers, as the real files do.
    """


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: the only one with a per-type table
    """Protocol-2 pickler that writes :class:`_Py2Str` values and numpy buffers as Python 2 strings."""

    # write, memoize and dispatch are the pure-Python pickler's internals: typeshed does not describe them.
    dispatch: ClassVar[dict[type, Callable[..., None]]] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: _Py2Str) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + bytes(obj))  # type: ignore[attr-defined]
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + bytes(obj))  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[_Py2Str] = _save_py2_str

    def reducer_override(self, obj: Any) -> Any:
        """Store an array's raw buffer as a Python 2 string, as numpy under Python 2 did."""
        if isinstance(obj, np.ndarray):
            rebuild, args, state = cast(tuple[Any, Any, tuple[Any, ...]], obj.__reduce__())
            return rebuild, args, state[:4] + (_Py2Str(state[4]),)
        return NotImplemented


def _dump_py2(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        _Py2Pickler(handle, protocol=2).dump(obj)


def _py2_keys(entries: dict[str, Any]) -> dict[_Py2Str, Any]:
    return {_Py2Str(key.encode("ascii")): value for key, value in entries.items()}


class _ClassLook:
    """Per-class colour, stripe direction, frequency and channel mix: what makes the classes learnable."""

    def __init__(self, num_classes: int, rng: np.random.Generator) -> None:
        self.colours = rng.uniform(50.0, 205.0, size=(num_classes, 3))
        self.angles = rng.uniform(0.0, math.pi, size=num_classes)
        self.frequencies = rng.uniform(0.25, 0.9, size=num_classes)
        self.channel_mix = rng.uniform(-1.0, 1.0, size=(num_classes, 3))

    def render(self, labels: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """Images of the given classes as uint8 (N, 3, height, width); stripe phase and noise vary per image."""
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        # Frequencies are per pixel of a 32-pixel image, so larger images show the same pattern.
        scale = 32.0 / max(height, width)
        direction = (
            np.cos(self.angles[labels])[:, None, None] * xs + np.sin(self.angles[labels])[:, None, None] * ys
        ) * scale
        phase = rng.uniform(0.0, 2.0 * math.pi, size=len(labels))[:, None, None]
        stripes = np.sin(self.frequencies[labels][:, None, None] * direction + phase)
        images = (
            self.colours[labels][:, :, None, None]
            + 45.0 * self.channel_mix[labels][:, :, None, None] * stripes[:, None]
            + rng.normal(0.0, 22.0, size=(len(labels), 3, height, width))
        )
        return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _balanced_labels(size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(size) % num_classes)


def _cifar_rows(labels: np.ndarray, look: _ClassLook, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3072): 1024 red, then 1024 green, then 1024 blue values, each plane row-major."""
    rows = np.empty((len(labels), 3 * 32 * 32), dtype=np.uint8)
    for start in range(0, len(labels), _CHUNK):
        chunk = labels[start : start + _CHUNK]
        rows[start : start + len(chunk)] = look.render(chunk, 32, 32, rng).reshape(len(chunk), -1)
    return rows


def is_generated_stand_in(folder: str | Path) -> bool:
    """Whether the data folder ``folder`` holds a stand-in written here (it carries :data:`MARKER_NAME`)."""
    return (Path(folder).expanduser() / MARKER_NAME).is_file()


def stand_in_description(folder: str | Path) -> str | None:
    """What the stand-in in ``folder`` holds, from its marker file (layout, sizes, seed): two stand-ins with
    different descriptions are different datasets. None when ``folder`` holds no stand-in; '' for a marker
    without a description (written by hand or by an older version)."""
    try:
        first = (Path(folder).expanduser() / MARKER_NAME).read_text(errors="replace").split("\n", 1)[0]
    except OSError:
        return None
    match = re.search(r"grafting\.data\.fake \((.*)\)\.?$", first)
    return match.group(1) if match else ""


def _prepare_root(root: Path) -> None:
    """Create ``root`` for a stand-in; a one-line error when a file is in the way or when it holds a dataset
    that is not a stand-in (the project takes such a folder for the real data: writing over it would lose it)."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is a file, not a folder; pass a folder for the generated stand-in")
    if root.is_dir() and not is_generated_stand_in(root):
        found = [name for name in _REAL_DATA if (root / name).exists()]
        if found:
            raise UsageError(
                f"{root} holds {found[0]}/ without the marker {MARKER_NAME}: a real dataset, which a stand-in would "
                f"overwrite; pass another folder"
            )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {root} ({err.strerror or err}); pass another folder") from None


def _write_marker(root: Path, what: str) -> None:
    (root / MARKER_NAME).write_text(_MARKER_TEXT.format(what=what))


def write_fake_cifar(
    root: str | Path, num_classes: int = 10, train_size: int = 5000, test_size: int = 1000, seed: int = 0
) -> Path:
    """Write a generated CIFAR-10 or CIFAR-100 in the exact layout torchvision reads, and return ``root``.

    10 classes: ``root/cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch`` and
    ``batches.meta``; 100 classes: ``root/cifar-100-python/`` with ``train``, ``test`` and ``meta``.
    The files are Python-2-style pickles like the originals (keys such as ``b'data'``), so both
    ``pickle.load(f, encoding='bytes')`` and torchvision can read them. CIFAR-100 coarse labels are
    ``fine // 5``. A marker file ``root/GENERATED_STAND_IN.txt`` says the data is not CIFAR.
    """
    if num_classes not in (10, 100):
        raise GraftingError(f"a generated CIFAR has 10 or 100 classes, not {num_classes}")
    if not (1 <= train_size <= MAX_CIFAR_SPLIT and 1 <= test_size <= MAX_CIFAR_SPLIT):
        raise UsageError(
            f"a generated CIFAR has 1 to {MAX_CIFAR_SPLIT} images per split, got train_size={train_size} "
            f"test_size={test_size}"
        )
    if seed < 0:
        raise UsageError(f"the seed of a generated CIFAR must be >= 0, got {seed}")
    root = Path(root)
    _prepare_root(root)
    rng = np.random.default_rng(seed)
    look = _ClassLook(num_classes, rng)
    train_labels = _balanced_labels(train_size, num_classes, rng)
    test_labels = _balanced_labels(test_size, num_classes, rng)
    train_rows = _cifar_rows(train_labels, look, rng)
    test_rows = _cifar_rows(test_labels, look, rng)

    def filenames(prefix: str, count: int) -> list[_Py2Str]:
        return [_Py2Str(f"stand_in_{prefix}_{n:06d}.png".encode("ascii")) for n in range(count)]

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        # The real training set is five equal batches; uneven sizes are split as evenly as possible.
        for number, part in enumerate(np.array_split(np.arange(train_size), 5), start=1):
            _dump_py2(
                _py2_keys(
                    {
                        "batch_label": _Py2Str(f"training batch {number} of 5 (generated stand-in)".encode("ascii")),
                        "labels": [int(label) for label in train_labels[part]],
                        "data": train_rows[part],
                        "filenames": filenames(f"train{number}", len(part)),
                    }
                ),
                folder / f"data_batch_{number}",
            )
        _dump_py2(
            _py2_keys(
                {
                    "batch_label": _Py2Str(b"testing batch 1 of 1 (generated stand-in)"),
                    "labels": [int(label) for label in test_labels],
                    "data": test_rows,
                    "filenames": filenames("test", test_size),
                }
            ),
            folder / "test_batch",
        )
        _dump_py2(
            _py2_keys(
                {
                    "num_cases_per_batch": int(math.ceil(train_size / 5)),
                    "label_names": [_Py2Str(f"class_{index:02d}".encode("ascii")) for index in range(10)],
                    "num_vis": 3 * 32 * 32,
                }
            ),
            folder / "batches.meta",
        )
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, labels, rows in (("train", train_labels, train_rows), ("test", test_labels, test_rows)):
            _dump_py2(
                _py2_keys(
                    {
                        "filenames": filenames(name, len(labels)),
                        "batch_label": _Py2Str(f"{name} (generated stand-in)".encode("ascii")),
                        "fine_labels": [int(label) for label in labels],
                        "coarse_labels": [int(label) // 5 for label in labels],
                        "data": rows,
                    }
                ),
                folder / name,
            )
        _dump_py2(
            _py2_keys(
                {
                    "fine_label_names": [_Py2Str(f"class_{index:03d}".encode("ascii")) for index in range(100)],
                    "coarse_label_names": [_Py2Str(f"superclass_{index:02d}".encode("ascii")) for index in range(20)],
                }
            ),
            folder / "meta",
        )
    _write_marker(root, f"CIFAR-{num_classes} layout, {train_size} train and {test_size} test images, seed {seed}")
    logger.info("wrote a generated CIFAR-%d stand-in to %s", num_classes, folder)
    return root


def write_fake_imagefolder(
    root: str | Path,
    num_classes: int = 3,
    train_per_class: int = 16,
    val_per_class: int = 8,
    image_size: int = 48,
    seed: int = 0,
    ext: str = "jpg",
) -> Path:
    """Write ``root/train/<class>/<n>.<ext>`` and ``root/val/<class>/<n>.<ext>`` image files; return ``root``.

    Classes are named ``class_000``, ``class_001``, ... so ImageFolder's sorted order is their index.
    Each image's height and width vary independently by up to a sixth of ``image_size`` around it,
    and image 1 of the first class of each split is stored as greyscale, as a few ImageNet files
    are. ``ext`` is ``jpg``, ``jpeg`` or ``png``.
    """
    image_format: str | None = _IMAGE_EXTENSIONS.get(ext.lower())
    if image_format is None:
        raise GraftingError(f"cannot write images with extension {ext!r}; use one of {sorted(_IMAGE_EXTENSIONS)}")
    if num_classes < 1 or not 8 <= image_size <= MAX_IMAGE_SIZE:
        raise UsageError(
            f"a generated image folder needs num_classes >= 1 and an image size from 8 to "
            f"{MAX_IMAGE_SIZE}, got {num_classes} and {image_size}"
        )
    if seed < 0:
        raise UsageError(f"the seed of a generated image folder must be >= 0, got {seed}")
    root = Path(root)
    _prepare_root(root)
    rng = np.random.default_rng(seed)
    look = _ClassLook(num_classes, rng)
    spread = max(1, image_size // 6)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(per_class):
                height, width = (int(v) for v in rng.integers(image_size - spread, image_size + spread + 1, size=2))
                pixels = look.render(np.array([label]), height, width, rng)[0].transpose(1, 2, 0)
                image = Image.fromarray(np.ascontiguousarray(pixels))
                if label == 0 and number == 1:
                    image = image.convert("L")
                options = {"quality": 92} if image_format == "JPEG" else {}
                image.save(folder / f"{number}.{ext}", format=image_format, **options)
    _write_marker(
        root,
        f"ImageFolder layout, {num_classes} classes, {train_per_class} train and "
        f"{val_per_class} val images per class, {image_size} pixels, seed {seed}",
    )
    logger.info("wrote a generated image folder stand-in to %s", root)
    return root
