"""Train network --i of --num on an ImageFolder dataset (ImageNet) with filter grafting (Meng et al., CVPR 2020).

One process per network, one GPU each:

    CUDA_VISIBLE_DEVICES=0 python grafting_imagenet/train.py --data /data/imagenet --s runs/r18 --num 2 --i 1 &
    CUDA_VISIBLE_DEVICES=1 python grafting_imagenet/train.py --data /data/imagenet --s runs/r18 --num 2 --i 2 &

Several GPUs for one network (DistributedDataParallel; -b and -j are the network's totals, split
over the K processes as in PyTorch's ImageNet example; rank 0 alone exchanges and grafts). The
``--`` keeps torchrun from reading ``--s`` and ``--num`` as abbreviations of its own options:

    CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc_per_node 2 -- grafting_imagenet/train.py \
        --data /data/imagenet --s runs/r18 --num 2 --i 1 &

``-e`` validates a checkpoint on the val/ images and writes nothing: ``--checkpoint PATH`` if given,
else the torchvision weights with ``--pretrained``, else network ``--i``'s ``<s>/net<i>/best.pt``. The
architecture and image size come from the ``config.json`` next to the checkpoint when there is one.
"""

from __future__ import annotations

import logging
import math
import sys
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from grafting.checkpoint import load_state_dict_file, load_weights_into, read_json_file
from grafting.data.fake import is_generated_stand_in, stand_in_description
from grafting.data.imagenet import imagenet_loaders, imagenet_val_loader
from grafting.data.loading import EpochLoader
from grafting.distributed import Processes, broadcast_from_main, check_sync_bn, per_process, sync_batchnorm
from grafting.errors import CheckpointError, UsageError
from grafting.method.graft import default_rule
from grafting.ring.layout import CONFIG_NAME, NetworkFiles
from grafting.train.cli import entry_point, given_settings, parse_config
from grafting.train.config import ImagenetConfig
from grafting.train.imagenet_models import ARCHS, create_model, model_classes, pretrained_weights
from grafting.train.log import setup_console
from grafting.train.loop import evaluate
from grafting.train.run import amp_dtype_for, run_ring
from grafting.train.runtime import available_cores, choose_process_device, configure_threads, seed_everything

log = logging.getLogger("grafting.imagenet")

# Other ranks wait in a collective while rank 0 waits for its ring predecessor, which may be a whole
# epoch behind: the process group must not give up before the grafting wait itself does.
PROCESS_GROUP_TIMEOUT = timedelta(days=7)


def parse_args(argv: list[str] | None = None) -> ImagenetConfig:
    """The checked configuration of ``argv`` (the flags of PyTorch's ImageNet example plus grafting)."""
    description = f"{__doc__.splitlines()[0]} Architectures (-a): {', '.join(ARCHS)}."
    return parse_config(ImagenetConfig, argv, prog="graft-imagenet", description=description)


# ----------------------------------------------------------------------------------------------
# Evaluation only


def checkpoint_to_evaluate(config: ImagenetConfig) -> Path | None:
    """The file -e/--evaluate validates: --checkpoint, else None for the --pretrained weights, else
    ``<s>/net<i>/best.pt``. A missing file is a UsageError (raised before any data is read)."""
    if config.checkpoint is None and config.pretrained:
        return None
    path = Path(config.checkpoint) if config.checkpoint else NetworkFiles(Path(config.s), config.i).best
    if not path.is_file():
        how = "check --checkpoint" if config.checkpoint else "train this network first or pass --checkpoint PATH"
        raise UsageError(f"-e/--evaluate: no checkpoint at {path}; {how}")
    return path


def _saved_settings(path: Path) -> tuple[Path, dict] | None:
    """The run's config.json next to checkpoint ``path`` and its settings, or None when there is none."""
    config_path = path.parent / CONFIG_NAME
    if not config_path.is_file():
        return None
    try:
        saved = read_json_file(config_path)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{config_path} is unreadable ({err}); fix or move it, or pass -a and --image-size with --checkpoint"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{config_path} does not hold a settings object; fix or move it")
    return config_path, saved


def recipe_for_evaluation(config: ImagenetConfig, path: Path | None, given: frozenset[str]) -> ImagenetConfig:
    """``config`` with the architecture and image size of the run that wrote checkpoint ``path`` (from the
    config.json next to it). A flag not given (``given``: the fields the command line set) takes the run's
    value; a flag given with another value than the run's, its default included, is a UsageError."""
    found = _saved_settings(path) if path is not None else None
    if found is None:
        return config
    config_path, saved = found
    checks = {
        "model": (lambda v: isinstance(v, str) and v in ARCHS, "-a/--arch"),
        "image_size": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= ImagenetConfig.MAX_IMAGE_SIZE,
            "--image-size",
        ),
    }
    changes = {}
    for name, (valid, flag) in checks.items():
        if name not in saved:
            continue
        value = saved[name]
        if not valid(value):
            raise CheckpointError(
                f"{config_path} records {flag} {value!r}, which is not valid; fix it, or move it away and pass {flag}"
            )
        current = getattr(config, name)
        if current == value:
            continue
        if name in given:
            raise UsageError(
                f"-e/--evaluate: {flag} {current} but {path} was trained with {value} ({config_path}); "
                f"leave {flag} out to use the run's"
            )
        changes[name] = value
    if changes:
        log.info(f"evaluate: {', '.join(f'{checks[n][1]} {v}' for n, v in changes.items())} from {config_path}")
    return config.replace(**changes)


def evaluate_only(
    config: ImagenetConfig,
    procs: Processes,
    device: torch.device,
    *,
    batch_size: int,
    workers: int,
    given: frozenset[str] = frozenset(),
) -> None:
    """``-e``: validate one checkpoint (see :func:`checkpoint_to_evaluate`) on the val/ images alone; ``given``:
    the fields the command line set (see :func:`recipe_for_evaluation`)."""
    path = checkpoint_to_evaluate(config) if procs.is_main else None
    config = broadcast_from_main(recipe_for_evaluation(config, path, given) if procs.is_main else None)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    val_loader, num_classes = imagenet_val_loader(
        config.data,
        image_size=config.image_size,
        batch_size=batch_size,
        workers=workers,
        device=device,
        distributed=procs.distributed,
        channels_last=channels_last,
    )
    model = create_model(config.model, num_classes, pretrained=config.pretrained).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    evaluate_checkpoint(config, model, val_loader, procs, device, path)


def evaluate_checkpoint(
    config: ImagenetConfig,
    model: nn.Module,
    val_loader: EpochLoader,
    procs: Processes,
    device: torch.device,
    path: Path | None,
) -> None:
    """Validate ``path`` (from :func:`checkpoint_to_evaluate`; None: the model's own pretrained weights)
    and log top-1 / top-5; writes nothing.

    Under torchrun rank 0 reads the file and hands the weights to the others; the ranks split the
    validation set and sum their counts.
    """
    path = broadcast_from_main(path)
    if path is None:
        source = f"torchvision's pretrained {config.model}"
    else:
        source = str(path)
        state = broadcast_from_main(load_state_dict_file(path) if procs.is_main else None)
        load_weights_into(
            model,
            state,
            source=source,
            expected=f"-a {config.model} with {model_classes(model)} classes",
            advice="pass the matching --arch and --data",
        )
    stats = evaluate(model, val_loader, amp_dtype=amp_dtype_for(device, config.amp))
    top5 = f" top-5 {stats.top5:.2f}" if stats.top5 is not None else ""  # None for 5 classes or fewer
    stand_in = " (GENERATED stand-in data)" if is_generated_stand_in(config.data) else ""
    log.info(
        f"evaluate {source}: top-1 {stats.top1:.2f}{top5} loss {stats.loss:.4f} on {len(val_loader)} batches "
        f"of {config.data}/val{stand_in}"
    )


# ----------------------------------------------------------------------------------------------


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Parse, set up device(s) and data, build the model, then train the network (or only validate)."""
    config = parse_args(argv)
    procs = Processes.from_environment()
    batch_size = per_process(config.batch_size, procs, "-b/--batch-size")
    total_workers = config.workers if config.workers is not None else default_workers()
    config = config.replace(workers=total_workers)
    workers = math.ceil(total_workers / procs.world_size)
    tag = f"net {config.i}/{config.num}" + (f" rank {procs.rank}" if procs.distributed else "")
    setup_console(tag, level=logging.INFO if procs.is_main else logging.WARNING)  # epoch lines from rank 0 only
    device = choose_process_device(f"cuda:{config.gpu}" if config.gpu is not None else config.device, procs)
    threads = configure_threads(config.threads, config.num * procs.world_size, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: the fastest kernels, same numerics
    if procs.distributed:
        timeout = timedelta(seconds=config.peer_timeout + 600) if config.peer_timeout else PROCESS_GROUP_TIMEOUT
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    try:
        given = given_settings(ImagenetConfig, argv) if config.evaluate else frozenset()
        train(config, procs, device, batch_size=batch_size, workers=workers, threads=threads, given=given)
    finally:
        if procs.distributed:
            torch.distributed.destroy_process_group()


def default_workers() -> int:
    """-j when it is not given: 4 (PyTorch's ImageNet example), at most the cores this process may use."""
    return min(ImagenetConfig.DEFAULT_WORKERS, available_cores())


def train(
    config: ImagenetConfig,
    procs: Processes,
    device: torch.device,
    *,
    batch_size: int,
    workers: int,
    threads: int,
    given: frozenset[str] = frozenset(),
) -> None:
    """Everything after process set-up: data, model, then run_ring (or :func:`evaluate_only` with -e, which
    needs ``given``: the fields the command line set)."""
    # Fail on missing files and impossible settings before the data is read and anything is started.
    check_sync_bn(config.sync_bn, procs, device)
    if config.pretrained:
        pretrained_weights(config.model)
    if config.evaluate:
        evaluate_only(config, procs, device, batch_size=batch_size, workers=workers, given=given)
        return
    seed = config.seed + config.i  # the networks of a ring must start apart; the ranks of one network must not
    seed_everything(seed)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    train_loader, val_loader, num_classes = imagenet_loaders(
        config.data,
        image_size=config.image_size,
        batch_size=batch_size,
        workers=workers,
        device=device,
        distributed=procs.distributed,
        seed=seed,
        channels_last=channels_last,
    )

    model = create_model(config.model, num_classes, pretrained=config.pretrained).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    rule = config.graft_rule or default_rule(model)
    model = sync_batchnorm(model, procs, device, config.sync_bn)
    if procs.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)

    config = config.replace(
        num_classes=num_classes,
        graft_rule=rule,
        threads=threads,
        device=str(device),
        world_size=procs.world_size,
        channels_last=channels_last,
        generated_data=is_generated_stand_in(config.data),
        stand_in=stand_in_description(config.data) or "",
    )
    run_ring(
        config,
        model,
        train_loader,
        val_loader,
        is_main=procs.is_main,
        build_model=lambda name, classes: create_model(name, classes),
    )


if __name__ == "__main__":
    main()
