"""Tests for grafting.distill: the distillation loss by hand, its gradient, teachers (one checkpoint,
several averaged in logit space, the peers), the hook's loss parts and resumable state, and the flags."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grafting.archs import cifar_models as models
from grafting.errors import CheckpointError, UsageError
from grafting.method.distill import (
    Distiller,
    TeacherEnsemble,
    freeze_,
    kd_loss,
    load_teacher,
    load_teachers,
    make_distiller,
)
from grafting.ring.grafter import GraftReport
from grafting.train.loop import cross_entropy
from grafting_cifar.train import parse_args

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def textbook_by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over rows of sum_k q_k (ln q_k - ln p_k), q the teacher and p the student at T."""
    total = 0.0
    for z, z_t in zip(student, teacher):
        p, q = softmax(z, t), softmax(z_t, t)
        total += sum(qk * (math.log(qk) - math.log(pk)) for pk, qk in zip(p, q))
    return t * t * total / len(student)


def authors_by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over rows of sum_k -q_k ln p_k, q the teacher at T = 1, p the student at T."""
    total = 0.0
    for z, z_t in zip(student, teacher):
        p, q = softmax(z, t), softmax(z_t, 1.0)
        total += sum(-qk * math.log(pk) for pk, qk in zip(p, q))
    return t * t * total / len(student)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 50.0])
def test_textbook_loss_by_hand(t: float) -> None:
    got = kd_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64), t)
    assert got.item() == pytest.approx(textbook_by_hand(STUDENT, TEACHER, t), rel=1e-10)


def test_textbook_loss_at_large_temperature_tends_to_half_the_logit_variance() -> None:
    # For T -> inf, T^2 KL -> 1/(2K) sum_k (d_k - mean d)^2 with d = z_t - z: an independent check.
    student, teacher = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    d = teacher - student
    limit = ((d - d.mean(dim=1, keepdim=True)) ** 2).sum(dim=1).mean() / (2 * d.shape[1])
    assert kd_loss(student, teacher, 1e4).item() == pytest.approx(limit.item(), rel=1e-3)


@pytest.mark.parametrize("t", [1.0, 2.0, 8.0])
def test_authors_form_by_hand(t: float) -> None:
    got = kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), t, soften_teacher=False)
    assert got.item() == pytest.approx(authors_by_hand(STUDENT, TEACHER, t), rel=1e-5)


def test_float16_logits_are_computed_in_float32() -> None:
    half = kd_loss(torch.tensor(STUDENT).half(), torch.tensor(TEACHER).half(), 4.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(textbook_by_hand(STUDENT, TEACHER, 4.0), rel=1e-3)


@pytest.mark.parametrize("t", [1.0, 4.0, 20.0])
def test_gradient_is_zero_when_the_logits_match(t: float) -> None:
    logits = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    loss = kd_loss(logits, torch.tensor(STUDENT, dtype=torch.float64), t)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(logits.grad.abs() < 1e-12)
    # ... and not zero when they differ, so the assertion above can fail.
    other = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    kd_loss(other, torch.tensor(TEACHER, dtype=torch.float64), t).backward()
    assert other.grad.abs().max() > 1e-3


def test_no_gradient_reaches_the_teacher() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------- teachers


def tiny(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, classes))


def test_several_teachers_are_averaged_in_logit_space() -> None:
    members = [tiny(1), tiny(2), tiny(3)]
    x = torch.randn(5, 4)
    with torch.no_grad():
        outputs = [m(x) for m in members]
    ensemble = TeacherEnsemble(members)
    got = ensemble(x)
    torch.testing.assert_close(got, (outputs[0] + outputs[1] + outputs[2]) / 3)
    # Not the mean of the softmaxes: the two differ for these members.
    mean_prob = torch.stack([o.softmax(1) for o in outputs]).mean(0)
    assert not torch.allclose(got.softmax(1), mean_prob, atol=1e-4)
    ensemble.train()
    assert not any(m.training for m in ensemble.modules())
    assert not any(p.requires_grad for p in ensemble.parameters())


def save_resnet20(path, classes: int = 10, seed: int = 0, layout: str = "model") -> dict:
    torch.manual_seed(seed)
    state = models.create("resnet20", num_classes=classes).state_dict()
    payload = {"net": state, "acc": 90.0} if layout == "net" else state if layout == "bare" else {"model": state}
    torch.save(payload, path)
    return state


def build(name: str, classes: int) -> nn.Module:
    return models.create(name, num_classes=classes)


def test_load_teacher_from_any_layout_frozen_in_eval_mode(tmp_path) -> None:
    for layout in ("model", "net", "bare"):
        state = save_resnet20(tmp_path / f"{layout}.pt", layout=layout)
        teacher = load_teacher(str(tmp_path / f"{layout}.pt"), build, "resnet20", 10)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert torch.equal(teacher.state_dict()["conv1.weight"], state["conv1.weight"])


def test_load_teachers_averages_several_checkpoints(tmp_path) -> None:
    paths = []
    for seed in (1, 2):
        save_resnet20(tmp_path / f"t{seed}.pt", seed=seed)
        paths.append(str(tmp_path / f"t{seed}.pt"))
    ensemble = load_teachers(paths, build, "resnet20", 10)
    singles = [load_teacher(p, build, "resnet20", 10) for p in paths]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), (singles[0](x) + singles[1](x)) / 2)
    assert isinstance(load_teachers(paths[:1], build, "resnet20", 10), nn.Module)


def test_a_teacher_of_another_architecture_is_a_clear_error(tmp_path) -> None:
    save_resnet20(tmp_path / "t.pt")
    with pytest.raises(UsageError, match=r"does not fit --teacher-model resnet32: it has no entry 'layer1\.3\.") as err:
        load_teacher(str(tmp_path / "t.pt"), build, "resnet32", 10)
    assert "\n" not in str(err.value)


def test_a_teacher_with_another_class_count_is_a_clear_error(tmp_path) -> None:
    save_resnet20(tmp_path / "t100.pt", classes=100)
    with pytest.raises(UsageError, match="has 100 classes but this run trains 10"):
        load_teacher(str(tmp_path / "t100.pt"), build, "resnet20", 10)


def test_missing_or_broken_teacher_files(tmp_path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_teacher(str(tmp_path / "absent.pt"), build, "resnet20", 10)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_teacher(str(tmp_path / "junk.pt"), build, "resnet20", 10)
    save_resnet20(tmp_path / "t.pt")
    with pytest.raises(UsageError, match="--teacher-model: cannot build 'resnet7'"):
        load_teacher(str(tmp_path / "t.pt"), build, "resnet7", 10)


# ---------------------------------------------------------------- the hook


def test_distiller_adds_the_weighted_term_and_reports_both_parts() -> None:
    teacher, student = tiny(1), tiny(2)
    hook = Distiller(teacher, temperature=2.0, weight=0.5)
    loss_fn = hook.criterion(cross_entropy)
    images, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    logits = student(images)
    loss, parts = loss_fn(logits, targets, images)
    assert set(parts) == {"ce", "kd"}
    with torch.no_grad():
        expected_kd = 0.5 * kd_loss(logits, teacher(images), 2.0)
    torch.testing.assert_close(parts["kd"], expected_kd)
    torch.testing.assert_close(loss, parts["ce"] + parts["kd"])
    loss.backward()
    assert student[1].weight.grad is not None and teacher[1].weight.grad is None


def test_peers_teacher_follows_each_exchange_and_survives_a_resume() -> None:
    student = tiny(0)
    hook = make_distiller("peers", student, teacher_model="tiny", num_classes=3)
    images, targets = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    loss_fn = hook.criterion(cross_entropy)
    _, parts = loss_fn(student(images), targets, images)
    assert parts["kd"].item() == 0.0  # no exchange yet: no teacher
    assert hook.state_dict() == {}

    peer_state = tiny(5).state_dict()
    hook.after_exchange(GraftReport(epoch=1, peer=2, peer_state=peer_state))
    assert torch.equal(hook.teacher[1].weight, peer_state["1.weight"])
    _, parts = loss_fn(student(images), targets, images)
    assert parts["kd"].item() > 0
    hook.after_exchange(GraftReport(epoch=2))  # the last epoch grafts nothing: the teacher stays
    assert torch.equal(hook.teacher[1].weight, peer_state["1.weight"])

    saved = hook.state_dict()
    resumed = make_distiller("peers", tiny(9), teacher_model="tiny", num_classes=3)
    resumed.load_state_dict({"other": 1, **saved})
    assert resumed.ready and torch.equal(resumed.teacher[1].weight, peer_state["1.weight"])
    assert not any(p.requires_grad for p in resumed.teacher.parameters())


def test_make_distiller_modes(tmp_path) -> None:
    student = models.create("resnet20", num_classes=10)
    assert make_distiller("none", student, teacher_model="resnet20", num_classes=10) is None
    save_resnet20(tmp_path / "t.pt")
    hook = make_distiller(
        "teacher",
        student,
        teachers=[str(tmp_path / "t.pt")] * 2,
        teacher_model="resnet20",
        num_classes=10,
        build_model=build,
        temperature=2,
        soften_teacher=False,
    )
    assert isinstance(hook.teacher, TeacherEnsemble) and hook.ready and not hook.soften_teacher
    assert hook.state_dict() == {}  # a fixed teacher is reloaded from its file, not saved
    with pytest.raises(UsageError, match="unknown mode"):
        make_distiller("both", student, teacher_model="resnet20", num_classes=10)
    with pytest.raises(UsageError, match="--kd-temperature"):
        Distiller(freeze_(tiny(0)), temperature=0)


# ---------------------------------------------------------------- flags


def parse(*argv: str):
    """The CIFAR script's configuration of ``argv`` (the grafting flags are shared by both scripts)."""
    return parse_args(list(argv))


def test_distill_flags() -> None:
    args = parse(
        "--distill",
        "teacher",
        "--teacher",
        "a.pt",
        "--teacher",
        "b.pt",
        "--kd-temperature",
        "2",
        "--no-kd-soften-teacher",
        "--teacher-model",
        "resnet56",
    )
    assert args.teacher == ["a.pt", "b.pt"] and args.kd_temperature == 2 and not args.kd_soften_teacher
    defaults = parse()
    assert (defaults.distill, defaults.kd_temperature, defaults.kd_weight, defaults.kd_soften_teacher) == (
        "none",
        4.0,
        1.0,
        True,
    )
    assert parse("--num", "2", "--distill", "peers").distill == "peers"
    for argv, message in [
        (("--distill", "teacher"), "needs --teacher PATH"),
        (("--teacher", "a.pt"), "only apply with --distill teacher"),
        (("--distill", "peers"), "needs --num 2"),
        (("--num", "1", "--graft-source", "noise", "--distill", "peers"), "needs --num 2"),
        (("--num", "2", "--graft-source", "noise", "--distill", "peers"), "reads no peer weights"),
        (("--kd-temperature", "0"), "--kd-temperature must be positive"),
        (("--kd-weight", "-1"), "--kd-weight must be >= 0"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse(*argv)
