"""Cultivation: grafting plus knowledge distillation (docs/METHOD.md §7).

The student's loss becomes cross-entropy plus a distillation term against a frozen teacher::

    textbook (default):  lambda * T^2 * KL(softmax(z_t / T) || softmax(z / T))            batch mean
    authors' form:       lambda * T^2 * sum_k -softmax(z_t)_k * log_softmax(z / T)_k     batch mean

The authors' script softened only the student (``soften_teacher=False``) and used T = 2 and
lambda = 1; it trained one network, without grafting, from one teacher checkpoint. The teacher is
either trained checkpoints given on the command line (several are averaged in logit space) or, with
``peers``, the ring predecessor's pre-graft weights of the latest exchange. Grafting proceeds as usual
when the ring has several networks; :class:`Distiller` plugs into the training loop as its
``EpochHook``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from grafting.checkpoint import class_count_misfit, load_state_dict_file, state_dict_misfit, weights_problem
from grafting.distributed import is_distributed
from grafting.errors import GraftingError, UsageError, first_line
from grafting.method.graft import unwrap_model

if TYPE_CHECKING:
    from grafting.ring.grafter import GraftReport

__all__ = [
    "DISTILL_MODES",
    "check_distillation",
    "kd_loss",
    "TeacherEnsemble",
    "freeze_",
    "load_teacher",
    "load_teachers",
    "Distiller",
    "ModelBuilder",
    "make_distiller",
]

log = logging.getLogger(__name__)

DISTILL_MODES = ("none", "teacher", "peers")


def check_distillation(temperature: float, weight: float) -> None:
    """Raise :class:`UsageError` unless the temperature is positive and finite and the weight finite and >= 0."""
    if not 0 < temperature < math.inf:
        raise UsageError(f"--kd-temperature must be positive and finite, got {temperature}")
    if not 0 <= weight < math.inf:
        raise UsageError(f"--kd-weight must be >= 0 and finite, got {weight}")


# The entry of a resumable checkpoint's 'extra' that holds the peers' teacher.
_TEACHER_KEY = "distill_teacher"

# build_model(name, num_classes) -> an untrained network of that architecture
ModelBuilder = Callable[[str, int], nn.Module]
# criterion(logits, targets, images) -> (loss, named parts); the loop's Criterion
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) go to float32 for the softmaxes; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0, *, soften_teacher: bool = True
) -> torch.Tensor:
    """The distillation term (without lambda), averaged over the batch.

    ``soften_teacher=True``: ``T^2 * KL(softmax(z_t/T) || softmax(z/T))``, zero with zero gradient
    when the logits agree. ``False`` (the authors' form): ``T^2 * sum_k -softmax(z_t)_k *
    log_softmax(z/T)_k``, a cross-entropy against the unsoftened teacher. No gradient reaches the teacher.
    """
    if temperature <= 0:
        raise GraftingError(f"the distillation temperature must be positive, got {temperature}")
    z = _as_float(student_logits)
    z_t = _as_float(teacher_logits).detach().to(z.dtype)
    log_p = F.log_softmax(z / temperature, dim=1)
    if soften_teacher:
        log_q = F.log_softmax(z_t / temperature, dim=1)
        per_example = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    else:
        per_example = -(F.softmax(z_t, dim=1) * log_p).sum(dim=1)
    return per_example.mean() * temperature**2


def freeze_(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with no parameter requiring gradients; returns it."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class TeacherEnsemble(nn.Module):
    """Several frozen teachers answering as one: the mean of their logits (not of their softmaxes)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise GraftingError("a teacher ensemble needs at least one member")
        self.members = nn.ModuleList(freeze_(m) for m in members)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers stay in eval mode whatever the caller asks."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean logits of the members."""
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def _match_memory_format(teacher: nn.Module, student: nn.Module | None) -> nn.Module:
    """channels_last teacher for a channels_last student, so both read the batch the same way."""
    if student is None:
        return teacher
    conv = next((p for p in student.parameters() if p.dim() == 4), None)
    if conv is not None and not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last):
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def load_teacher(
    path: str,
    build_model: ModelBuilder,
    model_name: str,
    num_classes: int,
    device: torch.device | str = "cpu",
    student: nn.Module | None = None,
) -> nn.Module:
    """A frozen teacher: architecture ``model_name`` with ``num_classes`` outputs, weights from ``path``.

    ``path`` may hold any layout :func:`grafting.checkpoint.extract_state_dict` knows. A checkpoint of
    another architecture or class count raises :class:`UsageError` (before any training) naming the file.
    """
    if not Path(path).is_file():
        raise UsageError(f"--teacher {path}: no such file; train the teacher first or correct the path")
    try:
        teacher = build_model(model_name, num_classes)
    except (GraftingError, ValueError, KeyError) as err:
        raise UsageError(f"--teacher-model: cannot build '{model_name}' ({first_line(err)})") from None
    state = load_state_dict_file(path)
    classes = class_count_misfit(teacher.state_dict(), state)
    if classes:
        raise UsageError(f"--teacher {path} {classes}; give a teacher trained on the same dataset")
    problem = state_dict_misfit(teacher.state_dict(), state)
    if problem:
        raise UsageError(
            f"--teacher {path} does not fit --teacher-model {model_name}: it {problem}; "
            f"pass the architecture it was trained with as --teacher-model"
        )
    # NaN or absurd weights would surface epochs later as a NaN loss blamed on --lr.
    broken = weights_problem(state, reference=teacher.state_dict())
    if broken:
        raise UsageError(
            f"--teacher {path} {broken}; it is not a usable teacher: give a checkpoint of a run that did not diverge"
        )
    teacher.load_state_dict(state)
    return freeze_(_match_memory_format(teacher.to(device), student))


def load_teachers(
    paths: Sequence[str],
    build_model: ModelBuilder,
    model_name: str,
    num_classes: int,
    device: torch.device | str = "cpu",
    student: nn.Module | None = None,
) -> nn.Module:
    """One frozen teacher per checkpoint; several answer as their mean logits (as the authors' script
    combined the list of teachers it was given)."""
    if not paths:
        raise UsageError("--distill teacher needs at least one --teacher PATH")
    teachers = [load_teacher(p, build_model, model_name, num_classes, device, student) for p in paths]
    return teachers[0] if len(teachers) == 1 else TeacherEnsemble(teachers)


class Distiller:
    """The training loop's hook for distillation (``grafting.loop.EpochHook``).

    Args:
        teacher: the frozen teacher network, on the student's device.
        temperature, weight: T and lambda of the loss.
        soften_teacher: textbook KL (True) or the authors' unsoftened teacher (False).
        follow_peers: replace the teacher's weights by the ring predecessor's pre-graft weights at
            every exchange (``--distill peers``); until the first exchange there is no teacher and the
            distillation term is 0.

    The loss parts are ``ce`` (or whatever the base criterion reports) and ``kd`` (lambda included),
    so the epoch line and TensorBoard show both terms, which add up to the loss.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        weight: float = 1.0,
        soften_teacher: bool = True,
        follow_peers: bool = False,
    ) -> None:
        check_distillation(temperature, weight)
        self.teacher = freeze_(teacher)
        self.temperature, self.weight, self.soften_teacher = temperature, weight, soften_teacher
        self.follow_peers = follow_peers
        self.ready = not follow_peers  # a peers teacher exists only after the first exchange

    def criterion(self, base: Criterion) -> Criterion:
        """``base`` plus the distillation term, reported apart as ``kd``."""

        def loss_fn(
            logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss, parts = base(logits, targets, images)
            if self.ready and self.weight > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
                kd = self.weight * kd_loss(logits, teacher_logits, self.temperature, soften_teacher=self.soften_teacher)
            else:
                kd = torch.zeros((), device=logits.device)
            return loss + kd, {**parts, "kd": kd}

        return loss_fn

    @torch.no_grad()
    def after_exchange(self, report: GraftReport) -> None:
        """With ``follow_peers``, the peer's pre-graft weights of this exchange become the teacher."""
        if not self.follow_peers:
            return
        if report.peer_state is not None:
            self.teacher.load_state_dict(report.peer_state)
            self.ready = True
        self.sync_ranks()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the peers' teacher weights (nothing for a fixed teacher)."""
        if not (self.follow_peers and self.ready):
            return {}
        return {_TEACHER_KEY: {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the peers' teacher saved by :meth:`state_dict` (other entries are ignored)."""
        if self.follow_peers and state.get(_TEACHER_KEY):
            self.teacher.load_state_dict(state[_TEACHER_KEY])
            self.ready = True

    @torch.no_grad()
    def sync_ranks(self) -> None:
        """Under torch.distributed, give every rank rank 0's teacher (only rank 0 reads files)."""
        if not (self.follow_peers and is_distributed()):
            return
        device = next(self.teacher.parameters()).device
        ready = torch.tensor([int(self.ready)], device=device)
        torch.distributed.broadcast(ready, src=0)
        if not ready.item():
            return
        for tensor in self.teacher.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
        self.ready = True


def make_distiller(
    mode: str,
    student: nn.Module,
    *,
    teachers: Sequence[str] = (),
    teacher_model: str,
    num_classes: int,
    build_model: ModelBuilder | None = None,
    temperature: float = 4.0,
    weight: float = 1.0,
    soften_teacher: bool = True,
) -> Distiller | None:
    """The hook for ``--distill mode`` (None for ``none``), with its teacher loaded and checked.

    ``teacher``: the checkpoints ``teachers`` of architecture ``teacher_model`` (built by
    ``build_model``), averaged in logit space when there are several. ``peers``: a frozen copy of the
    student that receives the predecessor's weights at every exchange.
    """
    if mode not in DISTILL_MODES:
        raise UsageError(f"--distill: unknown mode '{mode}'; choose one of: {', '.join(DISTILL_MODES)}")
    if mode == "none":
        return None
    plain = unwrap_model(student)
    if mode == "peers":
        teacher = copy.deepcopy(plain)
        log.info("distillation from the ring predecessor's weights (T %g, lambda %g)", temperature, weight)
    else:
        if build_model is None:
            raise GraftingError("--distill teacher needs a model builder to construct --teacher-model")
        device = next(plain.parameters()).device
        teacher = load_teachers(list(teachers), build_model, teacher_model, num_classes, device, plain)
        log.info(
            "distillation from %d %s teacher(s) (T %g, lambda %g, %s)",
            len(teachers),
            teacher_model,
            temperature,
            weight,
            "KL, softened teacher" if soften_teacher else "authors' form, teacher at T=1",
        )
    return Distiller(
        teacher, temperature=temperature, weight=weight, soften_teacher=soften_teacher, follow_peers=mode == "peers"
    )
