"""Data pipelines: CIFAR (torchvision and on-device paths), ImageNet folders, generated stand-ins.

Every loader yields ``(images, labels)`` already on the training device and needs
``set_epoch(e)`` before epoch ``e`` (see :class:`EpochLoader`).
"""

from grafting.data.cifar import (
    CIFAR_MEAN,
    CIFAR_PIPELINES,
    CIFAR_STD,
    TensorCifarLoader,
    cifar_loaders,
    load_cifar,
    random_crop_flip,
)
from grafting.data.fake import write_fake_cifar, write_fake_imagefolder
from grafting.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_loaders, read_rgb
from grafting.data.loading import (
    DataLoaderEpochLoader,
    EpochLoader,
    SeededSampler,
    SeededTransformDataset,
    channel_stats,
    epoch_seed,
    normalise,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_PIPELINES",
    "CIFAR_STD",
    "DataLoaderEpochLoader",
    "EpochLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SeededSampler",
    "SeededTransformDataset",
    "TensorCifarLoader",
    "channel_stats",
    "cifar_loaders",
    "epoch_seed",
    "imagenet_loaders",
    "load_cifar",
    "normalise",
    "random_crop_flip",
    "read_rgb",
    "write_fake_cifar",
    "write_fake_imagefolder",
]
