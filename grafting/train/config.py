"""The settings of one training run: every flag of both training scripts, its default and its meaning,
in one typed object that each script builds once from its command line.

Each field says, in its metadata, how it behaves across runs:

- ``resume="fixed"``: it shapes the run, so ``--resume`` refuses a different value (the saved one is
  in ``<s>/net<i>/config.json``); ``resume="free"``: it may change on resume (paths, threads, speed
  options, ``--epochs`` to extend a finished run);
- ``peers=True``: every network of a ring must use the same value; it travels in each exchange file
  and a peer with another value is refused at the first exchange, before any weights are mixed.

The configuration is what ``config.json`` stores (:meth:`RunConfig.to_json`). Library functions
(``Grafter``, ``graft_layers`` ...) take plain keyword arguments; a user's own loop never needs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from grafting.errors import UsageError, Wording
from grafting.method.ablation import EXCHANGING_SOURCES, SOURCES
from grafting.method.distill import DISTILL_MODES, check_distillation
from grafting.method.graft import BN_BLENDS, CRITERIA, RULES
from grafting.method.weighting import DEFAULT_A, DEFAULT_C
from grafting.ring.grafter import LEVELS, check_grafting

__all__ = ["RunConfig", "CifarConfig", "ImagenetConfig", "setting", "CONFIG_FORMAT", "RESUME_AUTO", "SCRIPT_WORDING"]

CONFIG_FORMAT = "filter-grafting-config/1"
# Settings fixed on resume that came after this format: a config.json without one was written before the setting
# existed, by a run that trained as its value here does, so --resume takes that value as the recorded one.
SETTINGS_ADDED_LATER: dict[str, Any] = {"filter_bn_blend": "per-channel", "sync_bn": False}
# --resume auto: continue when there is something to continue, else start (what schedulers pass).
RESUME_AUTO = "auto"
_RESUME = ("fixed", "free")


def setting(
    default: Any, *flags: str, help: str, resume: str, peers: bool = False, group: str = "training", **argparse: Any
) -> Any:
    """A configuration field: its default, its command-line flags (none for values the script derives),
    its help line, whether it is fixed on resume and whether peers must agree, and extra
    ``add_argument`` keywords (type, choices, action, metavar, dest is the field's name)."""
    if resume not in _RESUME:
        raise ValueError(f"resume must be one of {_RESUME}, got {resume!r}")
    metadata = {"flags": flags, "help": help, "resume": resume, "peers": peers, "group": group, "argparse": argparse}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _override(base: type, name: str, default: Any, **changes: Any) -> Any:
    """The field ``name`` of ``base`` with another default (and, optionally, other flags or help)."""
    metadata = dict(base.__dataclass_fields__[name].metadata)  # type: ignore[attr-defined]
    metadata.update(changes)
    return field(default=default, metadata=metadata)


def _positive(value: float, flag: str) -> None:
    if not 0 < value < math.inf:  # also rejects NaN
        raise UsageError(f"{flag} must be positive, got {value}")


def _non_negative(value: float, flag: str) -> None:
    if not 0 <= value < math.inf:
        raise UsageError(f"{flag} must be >= 0, got {value}")


# The optimizer's values meet the weights in float32: anything larger fails in the middle of the first step.
_FLOAT32_MAX = 3.4028234663852886e38


def _float32(value: float, flag: str) -> None:
    if abs(value) > _FLOAT32_MAX:
        raise UsageError(
            f"{flag} must be at most {_FLOAT32_MAX:.3g} (the largest float32, the weights' type), got {value:g}"
        )


def _data_kind(generated: object) -> str:
    """The kind of data ``generated_data`` says a run trained on, for messages."""
    from grafting.data.fake import MARKER_NAME

    return f"a GENERATED stand-in (its folder holds {MARKER_NAME})" if generated else "the real data set"


@dataclass
class RunConfig:
    """Settings shared by the CIFAR and ImageNet scripts; see :class:`CifarConfig` and :class:`ImagenetConfig`."""

    # ---- the ring
    s: str = setting(
        "checkpoint",
        "--s",
        metavar="DIR",
        resume="free",
        group="ring",
        help="shared folder of the ring: exchange files, each network's checkpoints, TensorBoard",
    )
    num: int = setting(
        1,
        "--num",
        type=int,
        resume="fixed",
        peers=True,
        group="ring",
        help="number of networks in the ring (1 = baseline, no grafting)",
    )
    i: int = setting(
        1, "--i", type=int, resume="fixed", group="ring", help="which network of the ring this process trains (1..num)"
    )
    # ---- grafting (docs/METHOD.md §3-§5, §9)
    a: float = setting(
        DEFAULT_A,
        "--a",
        type=float,
        resume="fixed",
        peers=True,
        group="grafting",
        help="weighting hyper-parameter a, in [0, 1]",
    )
    c: float = setting(
        DEFAULT_C,
        "--c",
        type=float,
        resume="fixed",
        peers=True,
        group="grafting",
        help="weighting hyper-parameter c (>= 0)",
    )
    level: str = setting(
        "layer",
        "--level",
        choices=LEVELS,
        resume="fixed",
        peers=True,
        group="grafting",
        help="graft whole layers (entropy) or filters (BatchNorm scale, the VGG table)",
    )
    filter_bn_blend: str = setting(
        "per-channel",
        "--filter-bn-blend",
        choices=BN_BLENDS,
        resume="fixed",
        peers=True,
        group="grafting",
        help="--level filter: blend BatchNorm channel j with its own weight w_j (per-channel), or as the "
        "published loop did, the whole BatchNorm once per channel in turn, which leaves each network its "
        "peer's BatchNorm (repeated-whole)",
    )
    graft_rule: str | None = setting(
        None,
        "--graft-rule",
        choices=RULES,
        resume="fixed",
        peers=True,
        group="grafting",
        help="which tensors share a coefficient: 'name' = keys containing 'conv' "
        "(published), 'module' = by module type; default: name when the "
        "model's first entry is a conv, else module",
    )
    criterion: str = setting(
        "entropy",
        "--criterion",
        choices=CRITERIA,
        resume="fixed",
        peers=True,
        group="grafting",
        help="layer information measure",
    )
    source: str = setting(
        "external",
        "--graft-source",
        choices=SOURCES,
        resume="fixed",
        peers=True,
        group="grafting",
        help="where new weights come from after each epoch: 'external' = the ring predecessor "
        "(the method); ablations: 'internal' = the layer's own strong filters, 'noise' = "
        "Gaussian noise on invalid filters (both need no peers), 'average' = plain mean "
        "of all --num networks, 'filter-entropy' = each filter whose entropy is below "
        "--invalid-threshold gets the other networks' highest-entropy one added",
    )
    invalid_threshold: float = setting(
        0.1,
        "--invalid-threshold",
        type=float,
        metavar="L1",
        resume="fixed",
        peers=True,
        group="grafting",
        help="a filter is invalid when its l1 norm is below this (internal and "
        "noise grafting); with --graft-source filter-entropy, when its entropy is (as published)",
    )
    peer_timeout: float | None = setting(
        None,
        "--peer-timeout",
        type=float,
        metavar="SECONDS",
        resume="free",
        group="grafting",
        help="give up when the predecessor's epoch has not appeared after this long (default: wait forever)",
    )
    keep_all: bool = setting(
        False,
        "--keep-all",
        action="store_true",
        resume="free",
        group="grafting",
        help="keep every exchange file (default: remove those no peer needs)",
    )
    # ---- the recipe (docs/METHOD.md §6); the scripts set their own defaults
    model: str = setting("", help="architecture", resume="fixed", peers=True)
    data: str = setting("data", "--data", metavar="DIR", resume="free", help="dataset folder")
    epochs: int = setting(
        1,
        "--epochs",
        type=int,
        resume="free",
        peers=True,
        help="epochs to train; a finished run continues to a larger value with --resume",
    )
    lr: float = setting(0.1, "--lr", type=float, resume="fixed", peers=True, help="initial learning rate")
    momentum: float = setting(0.9, "--momentum", type=float, resume="fixed", peers=True, help="SGD momentum")
    weight_decay: float = setting(
        0.0, "--wd", "--weight-decay", type=float, resume="fixed", peers=True, help="weight decay"
    )
    batch_size: int = setting(
        1, "--batch-size", type=int, resume="fixed", peers=True, help="training batch size of the network"
    )
    cos: bool = setting(
        False,
        resume="fixed",
        peers=True,
        help="cosine learning rate per iteration (else x0.1 every --step-epochs epochs)",
    )
    step_epochs: int = setting(
        1, "--step-epochs", type=int, resume="fixed", peers=True, help="epochs between x0.1 steps of the step schedule"
    )
    difflr: bool = setting(
        False,
        "--difflr",
        action="store_true",
        resume="fixed",
        peers=True,
        help="different initial lr per network: lr * (1 + cos(pi (num - i) / num)) / 2 ('dlr')",
    )
    start_epoch: int | None = setting(None, resume="free", help="1-based epoch to start at")
    print_freq: int = setting(
        100, "--print-freq", type=int, resume="free", help="print a progress line every this many batches (0: none)"
    )
    workers: int | None = setting(None, "--workers", type=int, resume="free", help="DataLoader workers")
    device: str | None = setting(
        None, "--device", resume="free", help="cpu, cuda or cuda:N (default: cuda when present)"
    )
    seed: int = setting(
        0, "--seed", type=int, resume="fixed", group="run control", help="base seed; network i uses seed + i"
    )
    # ---- run control
    resume: bool | str = setting(
        False,
        "--resume",
        nargs="?",
        const=True,
        choices=(RESUME_AUTO,),
        resume="free",
        group="run control",
        help="continue this network from <s>/net<i>/last.pt and rejoin the ring; stops when there is nothing to "
        f"continue. '--resume {RESUME_AUTO}' (for schedulers and launchers): continue when there is something, "
        "else start (default: off)",
    )
    threads: int | None = setting(
        None,
        "--threads",
        type=int,
        resume="free",
        group="run control",
        help="torch CPU threads (default: cores / --num on the CPU, at most 2 on CUDA)",
    )
    amp: bool = setting(
        False,
        "--amp",
        action="store_true",
        resume="fixed",
        group="run control",
        help="mixed precision: bf16 autocast where supported (the CPU, most GPUs), else fp16 with "
        "a grad scaler; changes the numerics",
    )
    channels_last: bool | None = setting(
        None,
        "--channels-last",
        action="boolean",
        resume="free",
        group="run control",
        help="channels_last memory format: the same fp32 arithmetic in faster "
        "kernels (default: on; graft-imagenet: on with CUDA only)",
    )
    compile: bool = setting(
        False,
        "--compile",
        action="store_true",
        resume="free",
        group="run control",
        help="torch.compile the model (compiling takes a minute or more before the first batch)",
    )
    # ---- distillation (cultivation, docs/METHOD.md §7)
    distill: str = setting(
        "none",
        "--distill",
        choices=DISTILL_MODES,
        resume="fixed",
        peers=True,
        group="distillation (cultivation)",
        help="add a distillation term: from --teacher checkpoints, or from the ring "
        "predecessor's weights of the latest exchange ('peers')",
    )
    teacher: list[str] = setting(
        [],
        "--teacher",
        action="append",
        metavar="PATH",
        resume="fixed",
        group="distillation (cultivation)",
        help="teacher checkpoint for --distill teacher; repeat it to average several teachers' logits (default: none)",
    )
    teacher_model: str | None = setting(
        None,
        "--teacher-model",
        metavar="NAME",
        resume="fixed",
        group="distillation (cultivation)",
        help="the teachers' architecture (default: the student's)",
    )
    kd_temperature: float = setting(
        4.0,
        "--kd-temperature",
        type=float,
        metavar="T",
        resume="fixed",
        peers=True,
        group="distillation (cultivation)",
        help="distillation temperature T",
    )
    kd_weight: float = setting(
        1.0,
        "--kd-weight",
        type=float,
        metavar="LAMBDA",
        resume="fixed",
        peers=True,
        group="distillation (cultivation)",
        help="weight lambda of the distillation term",
    )
    kd_soften_teacher: bool = setting(
        True,
        "--kd-soften-teacher",
        action="boolean",
        resume="fixed",
        peers=True,
        group="distillation (cultivation)",
        help="soften the teacher by T too (textbook KL); --no-kd-soften-teacher is "
        "the authors' form: cross-entropy against the teacher at T=1",
    )
    # ---- facts the script derives (no flag)
    dataset: str = setting("", resume="fixed", peers=True, help="dataset name")
    num_classes: int = setting(0, resume="fixed", peers=True, help="number of classes")
    # A ring, or a resumed run, on data of both kinds would label itself by one of them: refused instead.
    generated_data: bool = setting(
        False,
        resume="fixed",
        peers=True,
        help="the data folder holds a generated stand-in, not the real dataset",
    )
    stand_in: str = setting(
        "", resume="free", help="what the generated stand-in holds (its marker file's description); '' for real data"
    )

    # Seeds up to this bound keep seed + i (and the per-epoch seeds derived from it) inside every generator's range.
    MAX_SEED: ClassVar[int] = 2**62

    # ------------------------------------------------------------------ derived views

    @classmethod
    def settings(cls) -> list[dataclasses.Field]:
        """Every field, in declaration order."""
        return list(dataclasses.fields(cls))

    @classmethod
    def flag_of(cls, name: str) -> str:
        """The field's long command-line flags for messages (``--wd/--weight-decay``), or its name when it has none."""
        flags = [flag for flag in cls.__dataclass_fields__[name].metadata.get("flags") or () if flag.startswith("--")]
        return "/".join(flags) if flags else name

    @classmethod
    def fixed_on_resume(cls) -> tuple[str, ...]:
        """Names of the fields ``--resume`` must find unchanged."""
        return tuple(f.name for f in cls.settings() if f.metadata["resume"] == "fixed")

    @classmethod
    def shared_by_peers(cls) -> tuple[str, ...]:
        """Names of the fields every network of a ring must agree on."""
        return tuple(f.name for f in cls.settings() if f.metadata["peers"])

    def peer_settings(self) -> dict[str, Any]:
        """The values a peer's exchange file must match (plain JSON values)."""
        return {name: getattr(self, name) for name in self.shared_by_peers()}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (e.g. values resolved at start-up)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Raise :class:`UsageError` for the first impossible value, before anything is read or written."""
        if not self.s.strip():
            raise UsageError("--s is empty; name the shared folder of the ring, e.g. --s runs/r32")
        check_grafting(
            net=self.i,
            num=self.num,
            a=self.a,
            c=self.c,
            level=self.level,
            rule=self.graft_rule,
            criterion=self.criterion,
            source=self.source,
            invalid_threshold=self.invalid_threshold,
            peer_timeout=self.peer_timeout,
            bn_blend=self.filter_bn_blend,
            words=SCRIPT_WORDING,
        )
        for name in ("lr", "epochs", "batch_size", "step_epochs"):
            _positive(getattr(self, name), self.flag_of(name))
        for name in ("momentum", "weight_decay", "print_freq"):
            _non_negative(getattr(self, name), self.flag_of(name))
        for name in ("lr", "momentum", "weight_decay"):
            _float32(getattr(self, name), self.flag_of(name))
        if self.workers is not None:
            _non_negative(self.workers, self.flag_of("workers"))
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if not 0 <= self.seed <= self.MAX_SEED:
            raise UsageError(f"--seed must lie in 0..{self.MAX_SEED}, got {self.seed}")
        self._check_distillation()

    def _check_distillation(self) -> None:
        """Teacher files are checked when they are loaded, before training starts, so that scripts can be
        parsed before the runs that produce their teachers exist."""
        check_distillation(self.kd_temperature, self.kd_weight)
        if self.distill == "teacher" and not self.teacher:
            raise UsageError("--distill teacher needs --teacher PATH (repeat it for several teachers)")
        if self.distill != "teacher" and (self.teacher or self.teacher_model):
            raise UsageError("--teacher and --teacher-model only apply with --distill teacher")
        if self.distill == "peers" and self.num < 2:
            raise UsageError("--distill peers needs --num 2 or more (the ring predecessor is the teacher)")
        if self.distill == "peers" and self.source not in EXCHANGING_SOURCES:
            raise UsageError(f"--distill peers needs an exchange; --graft-source {self.source} reads no peer weights")

    def check_resume(self, saved: Mapping[str, Any], source: str) -> None:
        """Raise :class:`UsageError` (exit code 2) when a setting fixed on resume differs from the ``saved``
        configuration (read from ``source``); names the flag and both values."""
        for name in self.fixed_on_resume():
            if name not in saved and name in SETTINGS_ADDED_LATER:
                saved = {**saved, name: SETTINGS_ADDED_LATER[name]}
            if name not in saved:
                raise UsageError(
                    f"--resume: {source} does not record {self.flag_of(name)}; it was written by "
                    f"another version or edited by hand: start a new run in another --s"
                )
            now, then = getattr(self, name), saved[name]
            if now != then and name == "generated_data":
                raise UsageError(
                    f"--resume: {source} records a run on {_data_kind(then)} but --data {self.data} holds "
                    f"{_data_kind(now)}; resume with --data pointing at the kind of data the run trained on, "
                    f"or start a new run in another --s"
                )
            if now != then:
                raise UsageError(
                    f"--resume: {self.flag_of(name)} was {then!r} in {source} but is {now!r} now; "
                    f"resume with the same settings or start a new run in another --s"
                )

    # ------------------------------------------------------------------ config.json

    def to_json(self) -> str:
        """The text of ``config.json``."""
        return json.dumps({"format": CONFIG_FORMAT, **dataclasses.asdict(self)}, indent=2, sort_keys=True)


# The scripts' words for the library's messages (grafting.errors.Wording): their flags, --s and --resume.
SCRIPT_WORDING = Wording(
    names={
        **{
            setting: RunConfig.flag_of(name)
            for setting, name in (
                ("net", "i"),
                ("num", "num"),
                ("a", "a"),
                ("c", "c"),
                ("level", "level"),
                ("rule", "graft_rule"),
                ("criterion", "criterion"),
                ("source", "source"),
                ("invalid_threshold", "invalid_threshold"),
                ("peer_timeout", "peer_timeout"),
                ("bn_blend", "filter_bn_blend"),
            )
        },
        "ring": "its config.json",
    },
    flags=True,
    folder="--s",
    resume="with --resume",
    intact="this network's checkpoints are intact: ",
    same_epochs=", with the same --epochs as this network",
    extend=" (to extend a finished ring, resume every network with --resume --epochs N)",
    move_ring=(
        "resume the ring in a shared folder of its own: copy its networks' net<i> folders into a new --s "
        "and resume each network there"
    ),
)


@dataclass
class CifarConfig(RunConfig):
    """``grafting_cifar/train.py``: the authors' flags and defaults (docs/METHOD.md §6, CIFAR)."""

    model: str = _override(
        RunConfig, "model", "resnet32", flags=("--model",), help="architecture (the list is at the top of --help)"
    )
    cifar: int = setting(
        10, "--cifar", type=int, choices=(10, 100), resume="fixed", peers=True, help="CIFAR-10 or CIFAR-100"
    )
    data: str = _override(RunConfig, "data", "data", help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    download: bool = setting(
        False, "--download", action="store_true", resume="free", help="download CIFAR into --data when it is missing"
    )
    epochs: int = _override(RunConfig, "epochs", 200)
    weight_decay: float = _override(RunConfig, "weight_decay", 5e-4)
    batch_size: int = _override(RunConfig, "batch_size", 128)
    test_batch_size: int = setting(100, "--test-batch-size", type=int, resume="free", help="test batch size")
    cos: bool = _override(
        RunConfig,
        "cos",
        False,
        flags=("--cos",),
        argparse={"action": "store_true"},
        help="cosine learning rate per iteration (default: x0.1 every --step-epochs epochs)",
    )
    step_epochs: int = _override(RunConfig, "step_epochs", 60)
    print_freq: int = _override(RunConfig, "print_freq", 100, flags=("--print_frequence", "--print-freq"))
    workers: int | None = _override(
        RunConfig,
        "workers",
        None,
        help="DataLoader workers of the torchvision pipeline (default: 2, at most the threads)",
    )
    pipeline: str = setting(
        "auto",
        "--pipeline",
        choices=("auto", "tensor", "torchvision"),
        resume="free",
        help="data path: the whole dataset as one tensor on the device with batched "
        "augmentation, or torchvision transforms in DataLoader workers (auto: tensor)",
    )

    def __post_init__(self) -> None:
        self.dataset, self.num_classes = f"cifar{self.cifar}", self.cifar

    def check(self) -> None:
        """:meth:`RunConfig.check`, plus the model name and the test batch size."""
        from grafting.archs import cifar_models

        super().check()
        _positive(self.test_batch_size, "--test-batch-size")
        if self.model not in cifar_models.available():
            raise UsageError(
                f"--model: unknown model '{self.model}'; choose one of: {', '.join(cifar_models.available())}"
            )


@dataclass
class ImagenetConfig(RunConfig):
    """``grafting_imagenet/train.py``: the flags of PyTorch's ImageNet example (docs/METHOD.md §6, ImageNet)."""

    model: str = _override(
        RunConfig,
        "model",
        "resnet18",
        flags=("-a", "--arch"),
        argparse={"metavar": "ARCH"},
        help="torchvision classification model (the list is at the top of --help)",
    )
    data: str = _override(RunConfig, "data", "imagenet", help="folder holding train/ and val/ class folders")
    workers: int | None = _override(
        RunConfig,
        "workers",
        None,
        flags=("-j", "--workers"),
        help="data loading workers of the network, split over the processes of a "
        "torchrun (default: 4, or the number of cores when there are fewer)",
    )
    epochs: int = _override(RunConfig, "epochs", 90)
    start_epoch: int | None = _override(
        RunConfig,
        "start_epoch",
        None,
        flags=("--start-epoch",),
        argparse={"type": int, "metavar": "N"},
        help="1-based epoch to start at; with --resume the resumed epoch wins, "
        "without it fresh weights start at N and the lr schedule skips the "
        "epochs before (default: 1)",
    )
    batch_size: int = _override(
        RunConfig,
        "batch_size",
        256,
        flags=("-b", "--batch-size"),
        help="batch size of the network (split over the processes of a torchrun)",
    )
    lr: float = _override(RunConfig, "lr", 0.1, flags=("--lr", "--learning-rate"))
    weight_decay: float = _override(RunConfig, "weight_decay", 1e-4)
    print_freq: int = _override(RunConfig, "print_freq", 10, flags=("-p", "--print-freq"))
    steplr: bool = setting(
        False,
        "--steplr",
        action="store_true",
        resume="fixed",
        peers=True,
        help="lr x0.1 every --step-epochs epochs (default: cosine annealing per iteration)",
    )
    step_epochs: int = _override(RunConfig, "step_epochs", 30)
    image_size: int = setting(
        224,
        "--image-size",
        type=int,
        resume="fixed",
        peers=True,
        help="training crop, 16 to 1024 pixels; validation resizes to size*256/224 and centre-crops this",
    )
    evaluate: bool = setting(
        False,
        "-e",
        "--evaluate",
        action="store_true",
        resume="free",
        help="only validate (top-1, top-5) --checkpoint, else the --pretrained weights, else "
        "<s>/net<i>/best.pt, on the val/ images alone; -a and --image-size come from "
        "the config.json next to the checkpoint; writes nothing",
    )
    checkpoint: str | None = setting(
        None,
        "--checkpoint",
        metavar="PATH",
        resume="free",
        help="checkpoint for --evaluate (a state_dict or a dict with 'model'/'state_dict'/'net'; default: see -e)",
    )
    pretrained: bool = setting(
        False,
        "--pretrained",
        action="store_true",
        resume="fixed",
        help="start from torchvision's weights; they must already be in the torch hub cache (never downloaded here)",
    )
    gpu: int | None = setting(
        None,
        "--gpu",
        type=int,
        metavar="N",
        resume="free",
        help="use cuda:N (same as --device cuda:N; default: see --device)",
    )
    world_size: int = setting(1, resume="fixed", help="processes (GPUs) training this network under torchrun")
    sync_bn: bool = setting(
        False,
        "--sync-bn",
        action="store_true",
        resume="fixed",
        help="under torchrun: BatchNorm statistics over the network's whole batch (SyncBatchNorm), as on one "
        "GPU (the published runs); default: each GPU's share, running statistics from rank 0",
    )

    # -j when not given: PyTorch's ImageNet example's 4, capped by the cores.
    DEFAULT_WORKERS: ClassVar[int] = 4
    # Far above any ImageNet recipe (224 to 600 pixels): a batch of 256 such uint8 crops is already 0.8 GB,
    # and each worker prefetches two; 100000 would ask for terabytes and take the machine down.
    MAX_IMAGE_SIZE: ClassVar[int] = 1024

    def __post_init__(self) -> None:
        self.cos = not self.steplr
        self.dataset = "imagefolder"
        if self.evaluate and self.i > self.num:  # -e reads one network's files: the ring's size does not matter
            self.num = self.i

    def check(self) -> None:
        """:meth:`RunConfig.check`, plus the ImageNet flags."""
        import difflib

        from grafting.train.imagenet_models import ARCHS

        super().check()
        if self.model not in ARCHS:
            close = difflib.get_close_matches(self.model, ARCHS, n=4, cutoff=0.5) or [
                "resnet18",
                "resnet50",
                "mobilenet_v2",
                "vgg16_bn",
            ]
            raise UsageError(
                f"-a/--arch: unknown torchvision model '{self.model}'; did you mean {', '.join(close)}? "
                f"(--help lists all {len(ARCHS)})"
            )
        if not 16 <= self.image_size <= self.MAX_IMAGE_SIZE:
            raise UsageError(f"--image-size must lie in 16..{self.MAX_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.start_epoch is not None and not 1 <= self.start_epoch <= self.epochs:
            raise UsageError(f"--start-epoch must lie in 1..--epochs ({self.epochs}), got {self.start_epoch}")
        if self.gpu is not None and self.device is not None:
            raise UsageError("--gpu N is short for --device cuda:N; give one of them")
        if self.checkpoint is not None and not self.evaluate:
            raise UsageError("--checkpoint only applies with -e/--evaluate (training resumes with --resume)")
