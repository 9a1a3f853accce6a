"""ImageNet-style folders (``root/train/<class>/<image>``, ``root/val/<class>/<image>``) as device batches.

Cheaper than the usual PIL pipeline: workers decode files straight to uint8 tensors with
``torchvision.io.decode_image``, crop and resize them as uint8 with ``transforms.v2``, and collate
uint8 batches, which are a quarter of the bytes of float batches to pin and copy. Conversion to
float and normalisation happen on the training device. The per-epoch contract is that of
:class:`grafting.data.cifar.EpochLoader`: ``set_epoch(e)`` before epoch ``e`` makes its order and
augmentation depend only on ``(seed, e)``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DistributedSampler

from grafting.checkpoint import open_regular_file
from grafting.data.loading import (
    DataLoaderEpochLoader,
    EpochLoader,
    SeededSampler,
    SeededTransformDataset,
    worker_count,
)
from grafting.errors import DatasetNotFoundError, GraftingError, first_line

if TYPE_CHECKING:  # torchvision is imported where it is used: the CIFAR script imports this package too
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_loaders", "imagenet_val_loader", "read_rgb"]

logger = logging.getLogger(__name__)

# The largest ImageNet JPEG is about 15 MB: a file far larger than that is not a training image.
IMAGE_FILE_LIMIT = 256 * 2**20
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor (greyscale and CMYK files are converted).

    The file is read the way every file of the project is (:func:`grafting.checkpoint.open_regular_file`):
    a FIFO in the image folder would otherwise block a DataLoader worker for ever."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        with open(open_regular_file(path), "rb") as handle:
            data = handle.read(IMAGE_FILE_LIMIT + 1)
    except OSError as err:
        raise GraftingError(f"cannot read image {path} ({err.strerror or err}); replace or remove that file") from None
    if len(data) > IMAGE_FILE_LIMIT:
        raise GraftingError(
            f"image {path} is larger than {IMAGE_FILE_LIMIT // 2**20} MiB, far more than a training image; "
            f"replace or remove that file"
        )
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 announces a move of its decoders to TorchCodec on every call; the
            # decoder is current here and that extra dependency would buy nothing.
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise GraftingError(f"cannot decode image {path} ({first_line(err)}); replace or remove that file") from None


def _image_folder(folder: Path, split: str) -> ImageFolder:
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet {split} folder not found: {folder} (expected {split}/<class>/<image> under "
            f"{folder.parent}); point --data at the folder that holds train/ and val/"
        )
    try:
        return ImageFolder(str(folder), loader=read_rgb)
    except FileNotFoundError as err:
        hint = " (validation images must be sorted into one folder per class)" if split == "val" else ""
        raise DatasetNotFoundError(
            f"no usable images in {folder}: {err}{hint}; point --data at the folder that holds train/ and val/"
        ) from err


def _index_sampler(dataset: ImageFolder, *, shuffle: bool, distributed: bool, seed: int) -> DistributedSampler | None:
    if not distributed:
        return None
    # Validation is padded to equal shards like torchvision's reference scripts: at most
    # world_size - 1 repeated images, which moves top-1 by less than 0.01 points on ImageNet.
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)


def _epoch_loader(
    dataset: ImageFolder,
    transform: v2.Compose,
    *,
    train: bool,
    batch_size: int,
    workers: int,
    device: torch.device,
    distributed: bool,
    seed: int,
    channels_last: bool,
) -> DataLoaderEpochLoader:
    sampler = SeededSampler(
        len(dataset),
        shuffle=train,
        seed=seed,
        index_sampler=_index_sampler(dataset, shuffle=train, distributed=distributed, seed=seed),
    )
    return DataLoaderEpochLoader(
        SeededTransformDataset(dataset, transform),
        sampler,
        batch_size,
        device=device,
        workers=workers,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels_last=channels_last,
    )


def _val_loader(val_set: ImageFolder, image_size: int, **kwargs) -> DataLoaderEpochLoader:
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)])
    loader = _epoch_loader(val_set, transform, train=False, **kwargs)
    # Each rank sees a shard of the validation set: grafting.train.loop.evaluate sums the counts over the ranks.
    loader.sharded = kwargs["distributed"]
    return loader


def _check_sizes(image_size: int, batch_size: int) -> None:
    """Both loaders' sizes are whole numbers of at least 1."""
    if image_size < 1 or batch_size < 1:
        raise GraftingError(f"--image-size and --batch-size must be positive, got {image_size} and {batch_size}")


def imagenet_val_loader(
    root: str | Path,
    *,
    image_size: int = 224,
    batch_size: int = 256,
    workers: int = 4,
    device: torch.device,
    distributed: bool = False,
    channels_last: bool = False,
) -> tuple[EpochLoader, int]:
    """The validation loader of :func:`imagenet_loaders` alone (``root/train`` is never read: evaluating
    needs no scan of the training images) and the number of classes."""
    _check_sizes(image_size, batch_size)
    root = Path(root).expanduser().resolve()
    val_set = _image_folder(root / "val", "val")
    loader = _val_loader(
        val_set,
        image_size,
        batch_size=batch_size,
        workers=worker_count(workers),
        device=torch.device(device),
        distributed=distributed,
        seed=0,
        channels_last=channels_last,
    )
    logger.info(
        "ImageNet folder %s: %d classes, %d validation images", root / "val", len(val_set.classes), len(val_set)
    )
    return loader, len(val_set.classes)


def imagenet_loaders(
    root: str | Path,
    *,
    image_size: int = 224,
    batch_size: int = 256,
    workers: int = 4,
    device: torch.device,
    distributed: bool = False,
    seed: int = 0,
    channels_last: bool = False,
) -> tuple[EpochLoader, EpochLoader, int]:
    """Training and validation loaders over ``root/train`` and ``root/val``, and the number of classes.

    Training: ``RandomResizedCrop(image_size)`` and horizontal flip; validation:
    ``Resize(round(image_size * 256 / 224))`` then ``CenterCrop(image_size)``. Batches arrive on
    ``device`` as float32 NCHW normalised with the ImageNet mean and std (channels-last memory
    when asked) and int64 labels. ``batch_size`` is per process; with ``distributed`` each process
    reads its shard through a ``DistributedSampler`` (``torch.distributed`` must be initialised).
    Call ``set_epoch(e)`` on both loaders before epoch ``e``.
    """
    _check_sizes(image_size, batch_size)
    device = torch.device(device)
    root = Path(root).expanduser().resolve()
    train_set = _image_folder(root / "train", "train")
    val_set = _image_folder(root / "val", "val")
    if train_set.classes != val_set.classes:
        raise DatasetNotFoundError(
            f"{root / 'val'} has {len(val_set.classes)} class folders and {root / 'train'} has "
            f"{len(train_set.classes)}, or their names differ; both need the same class folders"
        )

    from torchvision.transforms import v2

    workers = worker_count(workers)
    train_transform = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
    loaders = [
        _epoch_loader(
            train_set,
            train_transform,
            train=True,
            batch_size=batch_size,
            workers=workers,
            device=device,
            distributed=distributed,
            seed=seed,
            channels_last=channels_last,
        ),
        _val_loader(
            val_set,
            image_size,
            batch_size=batch_size,
            workers=workers,
            device=device,
            distributed=distributed,
            seed=seed,
            channels_last=channels_last,
        ),
    ]
    logger.info(
        "ImageNet folders %s: %d classes, %d training and %d validation images",
        root,
        len(train_set.classes),
        len(train_set),
        len(val_set),
    )
    return loaders[0], loaders[1], len(train_set.classes)
