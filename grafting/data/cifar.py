"""CIFAR-10/100 files and loaders that yield normalised batches already on the training device.

Every loader here follows one contract (:class:`EpochLoader`): call ``set_epoch(e)`` before epoch
``e``; the order and augmentation of that epoch then depend only on ``(seed, e)``, so a run resumed
at epoch ``e`` sees exactly the batches an uninterrupted run would have seen.

Two pipelines give the same training distribution (random 32-pixel crop of the image padded by
4 zero pixels, horizontal flip with probability 0.5, normalisation):

* ``"torchvision"``: the original recipe, PIL transforms in DataLoader workers.
* ``"tensor"``: the whole split as one uint8 tensor on the device; each batch is gathered, cropped,
  flipped and normalised there with a handful of batched tensor operations.

``"auto"`` picks ``tensor`` on every device. On CUDA it takes the CPU out of the input pipeline.
On the CPU it was measured on the project's 2-core development machine (torch 2.14.1, a
generated 50 000-image CIFAR-10, batch 128, seconds per epoch; the machine was shared with
other jobs, load 2-5, so wall times are medians of interleaved runs):

============================================  ==========  ==============================
what                                          ``tensor``  ``torchvision``
============================================  ==========  ==============================
data path alone, CPU s incl. workers          0.52        7.78 (1 worker), 7.73 (2)
data path alone, wall, 1 thread / 1 worker    0.71        8.57
data path alone, wall, 2 threads / 2 workers  0.36        5.71
ResNet-32 SGD step included, wall,            305         311
1 thread / 1 worker, 5 paired runs            (faster in all 5 pairs, by 1-8 %)
============================================  ==========  ==============================

The step dominates, but the tensor path costs 15 times less CPU, and on 2 cores every
CPU-second the workers spend is taken from the training step. (Wall times with 2 training
threads were too disturbed by the other jobs to report.)

The machinery that is not CIFAR-specific (the epoch-loader contract, seeding, DataLoader wrapper)
lives in :mod:`grafting.data.loading`, shared with :mod:`grafting.data.imagenet`.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from grafting.data.loading import (
    DataLoaderEpochLoader,
    EpochLoader,
    SeededSampler,
    SeededTransformDataset,
    channel_stats,
    device_generator,
    epoch_seed,
    normalise,
    worker_count,
)
from grafting.errors import DatasetNotFoundError, GraftingError

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFAR_PIPELINES",
    "CifarSplit",
    "load_cifar",
    "cifar_loaders",
    "random_crop_flip",
    "TensorCifarLoader",
]

logger = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_PIPELINES = ("auto", "tensor", "torchvision")
CROP_PADDING = 4


@dataclass(frozen=True)
class _CifarFiles:
    """Where a CIFAR dataset's pickled batches live under ``--data``, and the keys inside them (the layout
    of the archives from www.cs.toronto.edu/~kriz, which torchvision unpacks unchanged)."""

    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: str
    labels_key: str

    def names(self) -> list[str]:
        return [*self.train, self.test, self.meta]


_CIFAR_FILES = {
    10: _CifarFiles(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "label_names",
        "labels",
    ),
    100: _CifarFiles("cifar-100-python", ("train",), "test", "meta", "fine_label_names", "fine_labels"),
}


class CifarSplit(Dataset):
    """One split of CIFAR as the pickled batches hold it: ``data`` uint8 (N, 32, 32, 3), ``targets`` a list
    of ints, ``classes`` the label names; items are ``(PIL image, label)``, as torchvision's reader gives them.

    Read with ``pickle`` alone (the files are plain pickles, checked for presence, not hashed: hashing costs
    seconds at each start and rejects the generated stand-ins, whose bytes differ from the originals).
    """

    def __init__(self, folder: Path, files: _CifarFiles, *, train: bool) -> None:
        batches, targets = [], []
        for name in files.train if train else (files.test,):
            with open(folder / name, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            batches.append(entry["data"])
            targets.extend(entry[files.labels_key])
        self.data: np.ndarray = np.vstack(batches).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets: list[int] = targets
        with open(folder / files.meta, "rb") as handle:
            self.classes: list[str] = list(pickle.load(handle, encoding="latin1")[files.names_key])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image  # only the torchvision pipeline asks for images

        return Image.fromarray(self.data[index]), self.targets[index]


def _download(root: Path, num_classes: int) -> None:
    """Fetch and unpack CIFAR-``num_classes`` into ``root`` with torchvision's downloader (checked by its md5)."""
    import torchvision  # only needed to download

    dataset_class = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    try:
        torchvision.datasets.utils.download_and_extract_archive(
            dataset_class.url, str(root), filename=dataset_class.filename, md5=dataset_class.tgz_md5
        )
    except OSError as err:  # no network, or the download broke off
        raise DatasetNotFoundError(
            f"could not download CIFAR-{num_classes} into {root} ({err}); fetch {dataset_class.url} by hand, unpack "
            f"it there and run without --download"
        ) from err


def load_cifar(root: str | Path, num_classes: int, download: bool = False) -> tuple[CifarSplit, CifarSplit]:
    """The CIFAR-10 (``num_classes=10``) or CIFAR-100 training and test sets found under ``root``.

    Missing files raise :class:`DatasetNotFoundError` unless ``download`` is true, in which case
    torchvision fetches them.
    """
    files = _CIFAR_FILES.get(num_classes)
    if files is None:
        raise GraftingError(f"CIFAR has 10 or 100 classes, not {num_classes}; pass --cifar 10 or --cifar 100")
    root = Path(root).expanduser().resolve()
    folder = root / files.folder
    name = f"CIFAR-{num_classes}"
    if not all((folder / file).is_file() for file in files.names()):
        if not download:
            raise DatasetNotFoundError(
                f"{name} not found in {root} (expected {files.folder}/); pass --download to fetch it, "
                f"or point --data at the folder that holds it"
            )
        _download(root, num_classes)
    try:
        train_set = CifarSplit(folder, files, train=True)
        test_set = CifarSplit(folder, files, train=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise DatasetNotFoundError(
            f"{name} files in {folder} are unreadable ({type(err).__name__}: {err}); "
            f"delete that folder and pass --download to fetch it again"
        ) from err
    except OSError as err:
        raise DatasetNotFoundError(
            f"cannot read {name} from {folder} ({err}); check that the files are readable"
        ) from err
    for split, dataset in (("training", train_set), ("test", test_set)):
        _check_split(dataset, num_classes, f"{name} {split} files in {folder}")
    logger.info("%s: %d training and %d test images from %s", name, len(train_set), len(test_set), root)
    return train_set, test_set


def _check_split(dataset: CifarSplit, num_classes: int, what: str) -> None:
    """Refuse, once at load, images and labels that would fail (or silently mislead) in the middle of
    training: a label outside ``0..num_classes-1``, or as many labels as images."""
    labels = np.asarray(dataset.targets)
    images = np.asarray(dataset.data)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(labels) != len(images) or len(images) == 0:
        raise DatasetNotFoundError(
            f"{what} hold {len(images)} images of shape {images.shape[1:]} and {len(labels)} "
            f"labels, not CIFAR's 32x32x3 images with one label each; delete that folder and "
            f"fetch the dataset again"
        )
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)] if labels.dtype.kind in "iu" else labels[:1]
        raise DatasetNotFoundError(
            f"{what} hold label {bad[0].item()!r}, outside 0..{num_classes - 1}; the files are "
            f"damaged or of another dataset: delete that folder and fetch the dataset again"
        )


# ----------------------------------------------------------------------------------------------
# Batched operations shared by the device-side paths


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> Tensor:
    """Random crop of the zero-padded images and horizontal flip of a random half, batched.

    ``images`` is (B, C, H, W) of any dtype on ``generator``'s device. Per sample, the crop's top
    and left offsets into the padded image are uniform over ``0..2*padding`` and the flip happens
    with probability 0.5: the distribution of torchvision's ``RandomCrop(H, padding)`` followed by
    ``RandomHorizontalFlip()``.
    """
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    # A view of every crop window, (B, C, 9, 9, H, W), then one gather of whole windows: copying
    # rows of W pixels is several times faster than gathering single pixels with four indices.
    windows = padded.unfold(2, height, 1).unfold(3, width, 1)
    crops = windows[torch.arange(batch, device=device), :, top, left]
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


class TensorCifarLoader:
    """One CIFAR split held as a single uint8 (N, 3, 32, 32) tensor on the device.

    Each epoch draws a permutation (training) from a device generator seeded by ``(seed, epoch)``;
    each batch is gathered, cropped and flipped (training) and normalised on the device. No
    workers, no per-sample Python. The last batch may be partial.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"expected uint8 (N, C, H, W) images and N labels, got {tuple(images.shape)} "
                f"{images.dtype} and {len(labels)} labels"
            )
        self.images = images
        self.labels = labels.to(device=images.device, dtype=torch.long)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.mean = channel_stats(mean, images.device)
        self.std = channel_stats(std, images.device)
        self.channels_last = channels_last
        self.epoch = 0

    @property
    def device(self) -> torch.device:
        """Where the images live and the batches are made."""
        return self.images.device

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        count = len(self.images)
        generator = device_generator(self.device, epoch_seed(self.seed, self.epoch))
        if self.train:
            order = torch.randperm(count, generator=generator, device=self.device)
        else:
            order = torch.arange(count, device=self.device)
        for start in range(0, count, self.batch_size):
            indices = order[start : start + self.batch_size]
            images = self.images[indices]
            if self.train:
                images = random_crop_flip(images, generator)
            yield normalise(images, self.mean, self.std, self.channels_last), self.labels[indices]


def _split_as_tensors(dataset: CifarSplit, device: torch.device) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return images.to(device), labels.to(device)


# ----------------------------------------------------------------------------------------------
# DataLoader-based pipelines (also used for ImageNet)


def _torchvision_loader(
    dataset: CifarSplit,
    batch_size: int,
    *,
    train: bool,
    device: torch.device,
    workers: int,
    seed: int,
    channels_last: bool,
) -> DataLoaderEpochLoader:
    from torchvision import transforms  # only this pipeline needs torchvision

    steps: list[Callable[[Any], Any]] = []
    if train:
        steps += [transforms.RandomCrop(32, padding=CROP_PADDING), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    sampler = SeededSampler(len(dataset), shuffle=train, seed=seed)
    return DataLoaderEpochLoader(
        SeededTransformDataset(dataset, transforms.Compose(steps)),
        sampler,
        batch_size,
        device=device,
        workers=workers,
        channels_last=channels_last,
    )


def _choose_pipeline(pipeline: str) -> str:
    if pipeline not in CIFAR_PIPELINES:
        raise GraftingError(f"unknown data pipeline {pipeline!r}; pass --pipeline {'/'.join(CIFAR_PIPELINES)}")
    if pipeline != "auto":
        return pipeline
    # On CUDA the device-side path removes the CPU from the input pipeline entirely. On the CPU it
    # is also the faster one (table in the module docstring): batched gathers cost 15x less CPU
    # than per-image PIL work, and on few cores the workers take their CPU from the training step.
    return "tensor"


def cifar_loaders(
    root: str | Path,
    num_classes: int,
    batch_size: int = 128,
    test_batch_size: int = 100,
    *,
    device: torch.device,
    pipeline: str = "auto",
    workers: int = 2,
    download: bool = False,
    seed: int = 0,
    channels_last: bool = False,
) -> tuple[EpochLoader, EpochLoader, str]:
    """Training and test loaders for CIFAR-10/100 and the name of the pipeline used.

    Both yield ``(images, labels)`` on ``device``: float32 normalised NCHW images (channels-last
    memory when asked) and int64 labels. Training batches are shuffled and augmented (random crop
    32 with padding 4, horizontal flip), the last partial batch kept; test batches are in file
    order and only normalised. Call ``set_epoch(e)`` on both before epoch ``e``.
    ``pipeline`` is ``"tensor"``, ``"torchvision"`` or ``"auto"`` (see the module docstring).
    """
    device = torch.device(device)
    chosen = _choose_pipeline(pipeline)
    if batch_size < 1 or test_batch_size < 1:
        raise GraftingError(
            f"--batch-size and --test-batch-size must be positive, got {batch_size} and {test_batch_size}"
        )
    train_set, test_set = load_cifar(root, num_classes, download=download)
    if chosen == "tensor":
        train_images, train_labels = _split_as_tensors(train_set, device)
        test_images, test_labels = _split_as_tensors(test_set, device)
        train_loader: EpochLoader = TensorCifarLoader(
            train_images, train_labels, batch_size, train=True, seed=seed, channels_last=channels_last
        )
        test_loader: EpochLoader = TensorCifarLoader(
            test_images, test_labels, test_batch_size, train=False, seed=seed, channels_last=channels_last
        )
    else:
        workers = worker_count(workers)
        train_loader = _torchvision_loader(
            train_set, batch_size, train=True, device=device, workers=workers, seed=seed, channels_last=channels_last
        )
        test_loader = _torchvision_loader(
            test_set,
            test_batch_size,
            train=False,
            device=device,
            workers=workers,
            seed=seed,
            channels_last=channels_last,
        )
    logger.info("CIFAR-%d data pipeline: %s on %s", num_classes, chosen, device)
    return train_loader, test_loader, chosen
