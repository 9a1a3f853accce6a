"""Loading machinery shared by the CIFAR and ImageNet pipelines: the epoch-loader contract,
per-(seed, epoch) seeding that survives persistent DataLoader workers, and on-device normalisation."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from grafting.errors import GraftingError

__all__ = [
    "EpochLoader",
    "epoch_seed",
    "device_generator",
    "channel_stats",
    "normalise",
    "SeededSampler",
    "SeededTransformDataset",
    "DataLoaderEpochLoader",
    "worker_count",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class EpochLoader(Protocol):
    """An iterable of ``(images, labels)`` batches on the training device, reproducible per epoch."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the batches of the epoch last given to :meth:`set_epoch`."""
        ...

    def __len__(self) -> int:
        """Number of batches per epoch (the last one may be partial)."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffling and augmentation the next iteration uses."""
        ...


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch)``, well mixed so nearby epochs are unrelated."""
    # SeedSequence only takes non-negative entropy; masking keeps negative seeds distinct.
    words = np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch & 0xFFFF_FFFF_FFFF_FFFF])
    high, low = (int(word) for word in words.generate_state(2, dtype=np.uint32))
    return (high << 31) | (low >> 1)


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A random generator on ``device`` seeded with ``seed`` (the shuffles and crops of one epoch)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ----------------------------------------------------------------------------------------------
# The files


def channel_stats(values: Sequence[float] | Tensor, device: torch.device) -> Tensor:
    """Per-channel mean or std as a float32 (C, 1, 1) tensor on ``device``, made once per loader: building
    it from a list at every batch would copy from pageable memory and stall a CUDA stream."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def normalise(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor, channels_last: bool = False
) -> Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, in the operation order of torchvision's
    ``ToTensor`` + ``Normalize`` so both paths give the same floats. ``mean``/``std`` are best given
    as :func:`channel_stats` tensors on the images' device."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mean_t = channel_stats(mean, images.device)
    std_t = channel_stats(std, images.device)
    return images.float().div_(255).sub_(mean_t).div_(std_t)


# ----------------------------------------------------------------------------------------------
# The "tensor" pipeline


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)``: the order and every sample's augmentation seed follow ``(seed, epoch)``.

    DataLoader workers that persist across epochs keep their own random state, so seeding them
    once cannot make epoch ``e`` reproducible on its own. Instead each sample carries a seed derived
    from ``(seed, epoch, index)`` and :class:`SeededTransformDataset` seeds its transform with it;
    the result is also independent of the number of workers. With ``index_sampler`` (for example a
    ``DistributedSampler``) the order comes from it and its ``set_epoch`` is called.
    """

    def __init__(
        self, num_samples: int, *, shuffle: bool, seed: int = 0, index_sampler: Sampler[int] | None = None
    ) -> None:
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.index_sampler = index_sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (forwarded to the index sampler when it has one)."""
        self.epoch = epoch
        if self.index_sampler is not None and hasattr(self.index_sampler, "set_epoch"):
            self.index_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.index_sampler) if self.index_sampler is not None else self.num_samples  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = epoch_seed(self.seed, self.epoch)
        if self.index_sampler is not None:
            indices: Sequence[int] = list(self.index_sampler)
        elif self.shuffle:
            indices = torch.randperm(self.num_samples, generator=device_generator(torch.device("cpu"), base)).tolist()
        else:
            indices = range(self.num_samples)
        for index in indices:
            yield index, (base + index) % (1 << 63)


class SeededTransformDataset(Dataset):
    """Wraps a dataset whose items are ``(sample, label)``; applies ``transform`` under the seed the sampler gives.

    Indexed by ``(index, sample_seed)`` pairs from :class:`SeededSampler`. Seeding touches only
    the CPU generator; in the main process (``workers=0``) its state is restored afterwards so the
    training's own random stream is left alone.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Any]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type,unused-ignore]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any]:
        index, sample_seed = key
        sample, label = self.base[index]
        if get_worker_info() is not None:
            torch.default_generator.manual_seed(sample_seed)
            return self.transform(sample), label
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            return self.transform(sample), label


def worker_count(workers: int) -> int:
    """The DataLoader workers to start for ``--workers``/``-j workers``: at most the cores this process may
    use, with a warning. Each worker is a process (each loader of a run keeps its own), and thousands of
    them fork the machine out of memory; beyond the cores they only take turns."""
    from grafting.train.runtime import available_cores  # the one owner of "cores this process may use"

    cores = available_cores()
    if workers <= cores:
        return workers
    logger.warning(
        "--workers %d is more than the %d cores this process may use; using %d DataLoader workers",
        workers,
        cores,
        cores,
    )
    return cores


class DataLoaderEpochLoader:
    """A DataLoader over a :class:`SeededSampler` whose batches are moved to ``device``.

    With ``mean``/``std`` the workers deliver uint8 batches (a quarter of the bytes to copy) and
    the conversion to normalised float32 happens on the device; without, batches are used as
    they come. Workers persist across epochs; memory is pinned when the device is CUDA.
    """

    def __init__(
        self,
        dataset: SeededTransformDataset,
        sampler: SeededSampler,
        batch_size: int,
        *,
        device: torch.device,
        workers: int = 2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
    ) -> None:
        self.sampler = sampler
        self.device = torch.device(device)
        self.mean = channel_stats(mean, self.device) if mean is not None else None
        self.std = channel_stats(std, self.device) if std is not None else None
        self.channels_last = channels_last
        self.sharded = False  # each DDP rank holds its own part of the set (validation under DDP)
        # The DataLoader draws its workers' base seed from this generator; a private one keeps the
        # global random stream untouched (samples are seeded by the sampler anyway).
        loader_generator = torch.Generator()
        loader_generator.manual_seed(sampler.seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            generator=loader_generator,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        finished = False
        try:
            yield from self._batches()
            finished = True
        except (GraftingError, MemoryError) as err:
            # A worker's error comes back with the worker's traceback in its message: keep its own line.
            raise type(err)(_worker_error_line(str(err))) from None
        finally:
            if not finished:
                self._stop_workers()

    def _stop_workers(self) -> None:
        """Stop the persistent workers at once when an epoch ends early (an error, which ends the run). Left
        to the garbage collector (the error's traceback keeps the epoch's frames alive), their shutdown found
        the loader's queues already closed and waited 5 s per worker."""
        iterator = getattr(self.loader, "_iterator", None)  # where torch keeps the persistent workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.mean is not None and self.std is not None:
                images = normalise(images, self.mean, self.std, self.channels_last)
            elif self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels


def _worker_error_line(message: str) -> str:
    """The one-line message of an error raised in a DataLoader worker, from the text the DataLoader
    re-raises it with ("Caught X in DataLoader worker process N. Original Traceback ... module.X: line")."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) < 2 or "DataLoader worker" not in lines[0]:
        return message
    name, sep, text = lines[-1].partition(": ")
    return text if sep and "." in name and " " not in name else lines[-1]
