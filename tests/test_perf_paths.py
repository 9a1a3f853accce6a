"""The speed options on the CPU: --amp, channels_last, torch.compile, batched entropies, and
the benchmark script's reading of metrics.jsonl and its report (tests/test_gpu_check.py runs it).

The real ``torch.compile`` (inductor) needs 45-60 s to compile even ResNet-20 on a 2-core machine, so
here it runs with dynamo's ``eager`` backend, which traces the model exactly as the default does and
exercises everything this project adds around a compiled model; ``scripts/bench.py -- --compile``
measures the real thing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import popen_forked
from torch import nn

from grafting.archs import cifar_models as models
from grafting.data.cifar import cifar_loaders
from grafting.data.fake import write_fake_cifar
from grafting.method import entropy as entropy_module
from grafting.method.entropy import entropy_tensor, entropy_tensors, layer_entropies, layer_entropy
from grafting.method.graft import graft_layers
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.ring.grafter import Grafter
from grafting.train.loop import evaluate, train_one_epoch
from grafting.train.report import EpochRecord, read_metrics
from grafting.train.run import amp_dtype_for
from grafting.train.schedule import make_scheduler

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "grafting_cifar" / "train.py"
BENCH_SCRIPT = REPO / "scripts" / "bench.py"
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-10 of 96 training and 40 test images."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar_perf"), 10, train_size=96, test_size=40)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-10 of one training batch (32) and 8 test images: bf16 convolutions are slow on CPUs
    without bf16 instructions, and one step shows all the test looks for."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar_one_batch"), 10, train_size=32, test_size=8)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread, restored afterwards: other test files may run beside this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_script(data: Path, shared: Path, *flags: str) -> str:
    """Run grafting_cifar/train.py as a user would (one network, 1 epoch; a process forked from the tests' warm
    fork server) and return its output."""
    command = [
        sys.executable,
        str(TRAIN_SCRIPT),
        "--data",
        str(data),
        "--s",
        str(shared),
        "--model",
        "resnet20",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--batch-size",
        "32",
        "--test-batch-size",
        "40",
        *flags,
    ]
    done = popen_forked(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stdout, stderr = done.communicate(timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, stdout + stderr
    return stdout + stderr


def conv_weights(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The 4-D conv weights of a state_dict (by the paper's key rule)."""
    return [t for k, t in state.items() if "conv" in k and t.dim() == 4]


def tiny_epoch(model: nn.Module, loader, amp_dtype: torch.dtype | None = None):
    """One epoch of the recipe's SGD (cosine schedule) through the library's train_one_epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = make_scheduler(optimizer, cosine=True, epochs=1, iters_per_epoch=len(loader), step_epochs=60)
    loader.set_epoch(1)
    return train_one_epoch(model, loader, optimizer, scheduler, epoch=1, amp_dtype=amp_dtype, print_freq=0)


# ----------------------------------------------------------------------------------------------
# --amp on the CPU


def test_amp_on_the_cpu_is_bf16_without_a_scaler() -> None:
    assert amp_dtype_for(torch.device("cpu"), True) == torch.bfloat16
    assert amp_dtype_for(torch.device("cpu"), False) is None


def test_amp_runs_the_convolutions_in_bf16_and_keeps_fp32_weights(one_batch: Path) -> None:
    train, test, _ = cifar_loaders(one_batch, 10, batch_size=32, test_batch_size=8, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10)
    seen: list[torch.dtype] = []
    model.conv1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = model.conv1.weight.detach().clone()
    stats = tiny_epoch(model, train, amp_dtype=torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}
    assert math.isfinite(stats.loss) and stats.images_per_s > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(model.conv1.weight, before)  # it learned
    result = evaluate(model, test, amp_dtype=torch.bfloat16)
    assert math.isfinite(result.loss) and 0.0 <= result.top1 <= 100.0


@pytest.mark.e2e
def test_train_script_with_amp_on_the_cpu(one_batch: Path, tmp_path: Path) -> None:
    output = train_script(one_batch, tmp_path / "amp", "--amp")
    assert "amp bfloat16" in output
    line = re.search(r"epoch 1/1 \| train loss ([\d.]+) .*\| (\d+) img/s \(test (\d+)\)", output)
    assert line is not None, output
    assert math.isfinite(float(line.group(1))) and int(line.group(2)) > 0
    # the default memory format on the CPU is channels_last: the checkpoint's conv weights say so
    state = torch.load(tmp_path / "amp" / "net1" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(state))


# ----------------------------------------------------------------------------------------------
# channels_last on the CPU


@pytest.mark.e2e
def test_no_channels_last_keeps_the_plain_layout(cifar: Path, tmp_path: Path) -> None:
    train_script(cifar, tmp_path / "nchw", "--no-channels-last")
    state = torch.load(tmp_path / "nchw" / "net1" / "last.pt", map_location="cpu", weights_only=True)["model"]
    weights = [w for w in conv_weights(state) if w.shape[2] > 1]
    assert weights and all(
        w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last) for w in weights
    )


def test_channels_last_loader_and_model_compute_what_the_plain_layout_computes(cifar: Path) -> None:
    plain_train, plain_test, _ = cifar_loaders(
        cifar, 10, batch_size=32, test_batch_size=40, device=torch.device("cpu"), seed=5
    )
    last_train, last_test, _ = cifar_loaders(
        cifar, 10, batch_size=32, test_batch_size=40, device=torch.device("cpu"), seed=5, channels_last=True
    )
    for loader in (plain_train, last_train):
        loader.set_epoch(1)
    for (x1, y1), (x2, y2) in zip(plain_train, last_train):
        assert x2.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    torch.manual_seed(0)
    plain = models.create("resnet20", num_classes=10)
    fast = models.create("resnet20", num_classes=10)
    fast.load_state_dict(plain.state_dict())
    fast = fast.to(memory_format=torch.channels_last)

    # One well-conditioned pass (BatchNorm on its running statistics): equal up to fp32 rounding.
    images, labels = next(iter(plain_train))
    plain.eval(), fast.eval()
    logits = [plain(images), fast(images.contiguous(memory_format=torch.channels_last))]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    for logit in logits:
        F.cross_entropy(logit, labels).backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), fast.named_parameters()):
        assert (p2.grad - p1.grad).norm() <= 1e-4 * p1.grad.norm() + 1e-7, name
        p1.grad, p2.grad = None, None

    # A training epoch: the backward through batch statistics amplifies rounding (float32 itself is
    # ~0.3% off a float64 reference in the first layers' gradients here, either layout), so looser.
    a, b = tiny_epoch(plain, plain_train), tiny_epoch(fast, last_train)
    assert a.loss == pytest.approx(b.loss, rel=1e-3)
    state = fast.state_dict()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-2, atol=2e-3, msg=key)
    assert evaluate(plain, plain_test).top1 == pytest.approx(evaluate(fast, last_test).top1, abs=5.0)


# ----------------------------------------------------------------------------------------------
# a compiled model in the loop and the exchange


def test_compiled_model_trains_publishes_and_grafts(one_batch: Path, tmp_path: Path) -> None:
    train, _, _ = cifar_loaders(one_batch, 10, batch_size=32, test_batch_size=8, device=torch.device("cpu"))
    torch.manual_seed(0)
    compiled = torch.compile(models.create("resnet20", num_classes=10), backend="eager")
    torch.manual_seed(1)
    peer = models.create("resnet20", num_classes=10)
    assert math.isfinite(tiny_epoch(compiled, train).loss)
    meta = {"model": "resnet20", "num_classes": 10}
    with Grafter(tmp_path, 1, 2, meta=meta) as mine, Grafter(tmp_path, 2, 2, meta=meta) as other:
        path = mine.publish(compiled, 1)
        other.publish(peer, 1)
        own_before = {k: v.clone() for k, v in compiled._orig_mod.state_dict().items()}
        report = mine.graft(compiled, 1)
    published, _ = read_exchange_file(path)
    assert list(published) == list(own_before)  # plain keys, no "_orig_mod." prefix
    assert report.peer == 2 and len(report.layers) > 0 and report.graft_ms > 0
    expected = models.create("resnet20", num_classes=10)
    expected.load_state_dict(own_before)
    graft_layers(expected, peer.state_dict())
    state = compiled._orig_mod.state_dict()
    for key, value in expected.state_dict().items():
        assert torch.equal(state[key], value), key


# ----------------------------------------------------------------------------------------------
# batched entropies (what grafting uses)


def mixed_tensors() -> list[torch.Tensor]:
    """Tensors that exercise every branch of the entropy: shared sizes, dtypes, constants, edges, empty."""
    generator = torch.Generator().manual_seed(7)
    same_shape = [torch.randn(16, 8, 3, 3, generator=generator) * (i + 1) for i in range(5)]
    on_edges = torch.arange(-50, 51, dtype=torch.float32) / 10  # many values exactly on bin edges
    return [
        *same_shape,
        torch.randn(300, generator=generator).to(torch.float16),
        torch.randn(300, generator=generator).to(torch.bfloat16),
        torch.randn(300, generator=generator).to(torch.float64),
        torch.full((16,), 3.0),  # constant: entropy 0
        torch.full((16,), -1.5),
        torch.tensor([0, 1, 1, 2, 10]),  # integers are histogrammed as floats
        torch.empty(0),
        on_edges,
        same_shape[0].clone(),
    ]


@pytest.mark.parametrize("searched", [False, True], ids=["cpu-numpy-counts", "stacked-searches-as-on-gpu"])
def test_entropy_tensors_equal_the_single_tensor_entropies_exactly(
    searched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if searched:  # the per-row search for every size, as on a GPU
        monkeypatch.setattr(entropy_module, "HOST_COUNTED", ())
    tensors = mixed_tensors() + list(models.create("resnet20", num_classes=10).state_dict().values())
    batched = entropy_tensors(tensors)
    assert batched.dtype == torch.float64 and batched.shape == (len(tensors),)
    assert batched.tolist() == [float(entropy_tensor(t)) for t in tensors]
    assert layer_entropies(tensors) == [layer_entropy(t) for t in tensors]
    assert entropy_tensors([]).shape == (0,)


def test_entropy_tensors_split_large_groups_without_changing_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = mixed_tensors()
    whole = entropy_tensors(tensors)
    monkeypatch.setattr(entropy_module, "_BATCH_ELEMENTS", 2000)  # 16x8x3x3 = 1152 values: one per batch
    assert torch.equal(entropy_tensors(tensors), whole)


def test_graft_layers_scores_are_the_per_layer_entropies() -> None:
    torch.manual_seed(3)
    model, peer = models.create("resnet20", num_classes=10), models.create("resnet20", num_classes=10)
    own_state = {k: v.clone() for k, v in model.state_dict().items()}
    peer_state = peer.state_dict()
    records = graft_layers(model, peer_state)
    assert len(records) == 19  # every conv of ResNet-20 by the name rule
    for record in records:
        assert record.h_self == layer_entropy(own_state[record.key])
        assert record.h_peer == layer_entropy(peer_state[record.key])


# ----------------------------------------------------------------------------------------------
# the benchmark script


def load_bench():
    """scripts/bench.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def epoch_records() -> list[EpochRecord]:
    """Two epochs of network 1 of 2: the first grafts, the last does not."""
    first = EpochRecord(
        epoch=1,
        epochs=2,
        train_loss=2.1,
        train_acc=20.0,
        test_loss=2.0,
        test_acc=25.0,
        test_acc5=70.0,
        best_acc=25.0,
        lr=0.1,
        grafted=True,
        peer=2,
        waited_s=1.5,
        graft_ms=48.2,
        train_images_per_s=300,
        test_images_per_s=1290,
        epoch_s=4.0,
        gpu_memory_gib=1.25,
    )
    final = EpochRecord(
        epoch=2,
        epochs=2,
        train_loss=1.9,
        train_acc=30.0,
        test_loss=1.8,
        test_acc=35.0,
        test_acc5=80.0,
        best_acc=35.0,
        lr=0.1,
        train_images_per_s=600,
        test_images_per_s=1310,
        epoch_s=2.5,
        gpu_memory_gib=1.5,
    )
    return [first, final]


def test_bench_graft_section_times_read_check_graft_and_publish_apart(tmp_path: Path) -> None:
    bench = load_bench()
    args = argparse.Namespace(device="cpu", graft_model="resnet20", repeat=2)
    result = bench.bench_graft(args, tmp_path)
    parts = ("read_ms", "check_ms", "graft_ms", "publish_ms", "write_ms", "graft_layers_from_file_ms")
    assert all(result[part] > 0 for part in parts), result
    # Each part is the fastest of its repeats, so together they are at most the fastest whole step's parts.
    assert result["read_ms"] + result["check_ms"] + result["graft_ms"] <= result["grafter_ms"] * 1.0001
    assert result["coefficients"] == 19 and not (tmp_path / "graft").exists()


def test_bench_reads_each_network_from_its_metrics_file(tmp_path: Path) -> None:
    bench = load_bench()
    path = tmp_path / "net1" / "metrics.jsonl"
    path.parent.mkdir()
    lines = [json.loads(record.to_json()) for record in epoch_records()]
    lines[1]["eta_s"] = 12.0  # a field added to EpochRecord later is left alone
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    run = bench.summarise(2, 1, 9.0, usage, read_metrics(path))
    assert [e["epoch"] for e in run.epochs] == [1, 2] and "eta_s" not in run.epochs[1]
    assert run.train_img_s == pytest.approx(400.0)  # the harmonic mean: equal work at 300 and 600 img/s
    assert (run.warm_epoch_s, run.warm_train_img_s) == (2.5, 600)  # the last epoch
    assert run.graft_ms == 48.2 and run.wait_s == 1.5 and run.gpu_gib == 1.5
    baseline = bench.summarise(1, 1, 9.0, usage, [{**lines[1], "waited_s": 0.0}])
    assert baseline.graft_ms is None and baseline.wait_s is None
    assert bench.summarise(1, 1, 9.0, usage, []).warm_epoch_s is None
    assert bench.per_bin_loop_entropy(torch.arange(10.0)) == pytest.approx(layer_entropy(torch.arange(10.0)))


def gpu_results(bench) -> dict:
    """A GPU check's merged results as scripts/gpu_check.sh's report step sees them (numbers made up)."""

    def ring(variant: str, nets: int, img_s: float, epoch_s: float) -> dict:
        runs = [
            {"net": i, "warm_epoch_s": epoch_s, "warm_train_img_s": img_s, "gpu_gib": 0.7, "rss_gib": 2.0}
            for i in range(1, nets + 1)
        ]
        return {"variant": variant, "nets": nets, "networks": runs, "error": None, "together_img_s": img_s * nets}

    rings = [
        ring("amp", 1, 20000, 2.6),
        ring("amp", 2, 17000, 3.0),
        ring("fp32", 1, 12000, 4.2),
        {"variant": "fp32", "nets": 2, "networks": [], "error": "network 2 of 2 exited with 1", "together_img_s": 0},
    ]
    for r in rings:
        r["vs_one_network"] = (
            r["together_img_s"] / (20000 if r["variant"] == "amp" else 12000) if r["nets"] > 1 else None
        )
    return {
        "device": "cuda",
        "device_name": "cuda (NVIDIA H200)",
        "torch": "2.14.1",
        "cuda": "13.0",
        "steps": [{"name": "cuda_tests", "status": "ok", "seconds": 41.0, "limit_s": 110.0}],
        "tests": {
            "passed": 7,
            "failed": 0,
            "skipped": 1,
            "cases": [{"name": bench.SYNC_TEST, "outcome": "passed", "message": "", "seconds": 1.0}],
        },
        "train": {"model": "resnet32", "data": "generated", "epochs": 2, "rings": rings},
        "entropy": {"model": "resnet110", "tensors": 547, "loop_ms": 90.0, "layer_entropies_ms": 2.0},
        "graft": {
            "model": "resnet110",
            "grafter_ms": 26.0,
            "read_ms": 17.5,
            "check_ms": 2.5,
            "graft_ms": 6.0,
            "publish_ms": 1.5,
            "write_ms": 9.0,
            "graft_layers_from_file_ms": 7.0,
            "graft_layers_ms": 3.0,
        },
        "compile": {
            "model": "resnet32",
            "batch": 128,
            "precision": "bf16 autocast",
            "modes": [
                {"mode": "eager", "first_steps_s": 2.0, "step_ms": 5.0, "img_s": 25600},
                {
                    "mode": "default",
                    "first_steps_s": 42.0,
                    "step_ms": 4.0,
                    "img_s": 32000,
                    "vs_eager": 1.25,
                    "pays_off_after_epochs": bench.pays_off_after(
                        {"first_steps_s": 2.0, "step_ms": 5.0}, {"first_steps_s": 42.0, "step_ms": 4.0}
                    ),
                },
                {"mode": "reduce-overhead", "error": "RuntimeError: no"},
            ],
        },
    }


def test_bench_report_judges_the_goals_on_a_gpu() -> None:
    bench = load_bench()
    results = gpu_results(bench)
    epoch, two, graft, syncs = bench.goals(results)
    assert (epoch["measured"], epoch["met"]) == (2.6, True)
    assert (two["measured"], two["met"]) == (1.7, True)
    assert (graft["measured"], graft["met"]) == (26.0, False) and "read 17.5 ms, check 2.5 ms" in graft["text"]
    assert (syncs["measured"], syncs["met"]) == ("passed", True)
    # pays off: 40 s more for the first steps, 1 ms less for each of 391 steps per epoch
    assert results["compile"]["modes"][1]["pays_off_after_epochs"] == pytest.approx(40 / 0.391)
    assert bench.pays_off_after({"first_steps_s": 2.0, "step_ms": 5.0}, {"first_steps_s": 9.0, "step_ms": 6.0}) is None

    results["goals"] = bench.goals(results)
    table = bench.markdown(results)
    assert "REHEARSAL" not in table and "NVIDIA H200" in table
    assert "| cuda_tests | ok: 7 passed, 0 failed, 1 skipped | 41 (limit 110) |" in table
    assert "| resnet32 epoch with --amp, one network: at most 3 s | 2.60 s | yes |" in table
    assert "| `--amp`: epoch (train img/s) | 2.60 s (20,000 img/s) | 3.00 s (17,000 img/s each) |" in table
    assert "| `--amp`: all networks together | 20,000 img/s | 34,000 img/s (1.70x) |" in table
    assert "| fp32: epoch (train img/s) | 4.20 s (12,000 img/s) | failed |" in table
    assert "| read the peer's file (one read, no unpickling) | 17.5 |" in table
    assert "| publish: write and fsync in the background (during the test pass) | 9.0 |" in table
    assert "| `torch.compile`, default | 42.0 s | 4.00 | 32,000 | 1.25x | 102.3 epochs |" in table
    assert "| `torch.compile`, reduce-overhead | failed: RuntimeError: no |" in table
    assert (
        "| Grafter.graft of resnet110, file read included: under 20 ms | 26.0 ms (read 17.5 ms, check 2.5 ms) | "
        "**no** |" in table
    )


def test_bench_report_judges_nothing_on_the_cpu_and_names_what_was_not_measured() -> None:
    bench = load_bench()
    results = {"device": "cpu", "device_name": "cpu (2 cores)", "tests": None}
    rows = bench.goals(results)
    assert [row["met"] for row in rows] == [None] * 4 and {row["text"] for row in rows} == {"not measured"}
    results["goals"] = rows
    assert "REHEARSAL on the CPU" in bench.markdown(results)
    cpu = {**gpu_results(bench), "device": "cpu"}
    assert all(row["met"] is None and row["measured"] is not None for row in bench.goals(cpu))


def test_bench_report_reads_the_step_file_and_pytests_junit_xml(tmp_path: Path) -> None:
    bench = load_bench()
    steps = tmp_path / "steps.tsv"
    steps.write_text("env\tok\t12.5\t900\ncuda_tests\ttimed out\t110.2\t110\nbench_compile\tskipped\t0\t0\n")
    assert bench.read_steps(steps) == [
        {"name": "env", "status": "ok", "seconds": 12.5, "limit_s": 900.0},
        {"name": "cuda_tests", "status": "timed out", "seconds": 110.2, "limit_s": 110.0},
        {"name": "bench_compile", "status": "skipped", "seconds": 0.0, "limit_s": 0.0},
    ]
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_cuda" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_cuda" name="test_b" time="0.1"><failure message="assert 2 == 1&#10;more">'
        "trace</failure></testcase>"
        '<testcase classname="tests.test_cuda" name="test_c" time="0"><skipped message="needs 2 GPUs"/></testcase>'
        "</testsuite></testsuites>"
    )
    tests = bench.read_junit(junit)
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert tests["cases"][1] == {"name": "test_b", "outcome": "failed", "message": "assert 2 == 1", "seconds": 0.1}
    assert tests["cases"][2]["message"] == "needs 2 GPUs"
