"""What only a GPU can confirm: the on-device data path, entropies and grafting that are the
published code's on the device,
one host synchronisation per model, mixed precision, networks sharing one GPU, and DDP over NCCL.

Every test here is marked ``cuda``: it skips without a GPU, and ``scripts/gpu_check.sh`` runs them
(``pytest -m cuda``) on the GPU machine. With ``GPU_CHECK_REHEARSE=1`` they run on the CPU instead,
comparing the CPU with itself: that finds no numerical difference, but keeps every test runnable,
so a GPU run, which is rare and short, is not spent on a broken test. The two tests that need CUDA
itself (the sync-debug mode, NCCL) skip in a rehearsal.

Why the device's training batches cannot equal the CPU's for the same seed: the data pipeline draws
its permutation, crops and flips from a generator on the device holding the data. The CPU generator
is a Mersenne Twister, the CUDA generator is the counter-based Philox, and ``torch.randperm`` uses
another algorithm on each; the same seed gives other draws. What can be compared is compared: the
test split (no randomness) is the CPU's to the last bit of every pixel, every training batch is
exactly what the CPU computes from the draws the device made, and the same seed and epoch give the
same batches again on the device (a resumed run sees the batches an uninterrupted one would).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CIFAR_SCRIPT, IMAGENET_SCRIPT, REHEARSAL, finish, start_process, start_script
from helpers.frozen_graft import frozen_graft_layers
from helpers.published_code import published_entropy, published_key_graft

from grafting.archs import cifar_models as models
from grafting.data.cifar import CIFAR_MEAN, CIFAR_STD, CROP_PADDING, TensorCifarLoader, cifar_loaders
from grafting.data.fake import write_fake_cifar, write_fake_imagefolder
from grafting.data.loading import device_generator, epoch_seed, normalise
from grafting.method import entropy as entropy_module
from grafting.method.entropy import entropy_tensor, entropy_tensors, layer_entropies, layer_entropy
from grafting.method.graft import graft_layers
from grafting.ring.exchange_file import read as read_exchange_file
from grafting.ring.grafter import Grafter
from grafting.train.loop import train_one_epoch
from grafting.train.report import read_metrics
from grafting.train.schedule import make_scheduler

RUN_TIMEOUT_S = 180.0
# A normalised pixel level is 1 / 255 / std ~ 0.02 apart from the next; CUDA divides by 255 as a
# multiplication by 1/255, at most one rounding away from the CPU's division, ~3e-7 after the std.
PIXEL_ATOL = 1e-6


@pytest.fixture(scope="module")
def device() -> torch.device:
    """The GPU; the CPU in a rehearsal (conftest skips these tests when there is neither)."""
    return torch.device("cpu") if REHEARSAL or not torch.cuda.is_available() else torch.device("cuda")


@pytest.fixture(autouse=True)
def gpu_binning_in_a_rehearsal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rehearsal bins on the CPU with the GPU's kernels (torch's searches), not with the numpy counts
    the CPU path uses, so that it tries the code a GPU runs."""
    if REHEARSAL and not torch.cuda.is_available():
        monkeypatch.setattr(entropy_module, "HOST_COUNTED", ())


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-10 of 100 training images (3 full batches of 32 and one of 4) and 40 test images."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar_cuda"), 10, train_size=100, test_size=40)


# ----------------------------------------------------------------------------------------------
# The tensor pipeline on the device


@pytest.mark.cuda
def test_tensor_pipeline_test_batches_on_the_device_are_the_cpu_batches(device: torch.device, cifar: Path) -> None:
    _, cpu_test, _ = cifar_loaders(
        cifar, 10, batch_size=32, test_batch_size=16, device=torch.device("cpu"), pipeline="tensor", seed=3
    )
    _, device_test, _ = cifar_loaders(
        cifar, 10, batch_size=32, test_batch_size=16, device=device, pipeline="tensor", seed=3, channels_last=True
    )
    for loader in (cpu_test, device_test):
        loader.set_epoch(2)
    pairs = list(zip(cpu_test, device_test, strict=True))
    assert len(pairs) == 3
    for (cpu_images, cpu_labels), (images, labels) in pairs:
        assert images.device.type == device.type and images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(images.cpu(), cpu_images, rtol=0, atol=PIXEL_ATOL)
        assert torch.equal(labels.cpu(), cpu_labels)


def crops_of_the_draws(images: torch.Tensor, top: list[int], left: list[int], flip: list[bool]) -> torch.Tensor:
    """The CPU reference of the random crop and flip: one slice of the zero-padded image per sample."""
    padded = F.pad(images, (CROP_PADDING,) * 4)
    size = images.shape[-1]
    crops = [padded[i, :, t : t + size, x : x + size] for i, (t, x) in enumerate(zip(top, left))]
    return torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip)])


@pytest.mark.cuda
def test_tensor_pipeline_training_batches_are_the_cpu_computation_of_the_device_draws(
    device: torch.device, cifar: Path
) -> None:
    seed, epoch, batch_size = 3, 2, 32
    cpu_train, _, _ = cifar_loaders(
        cifar, 10, batch_size=batch_size, device=torch.device("cpu"), pipeline="tensor", seed=seed
    )
    device_train, _, _ = cifar_loaders(
        cifar, 10, batch_size=batch_size, device=device, pipeline="tensor", seed=seed, channels_last=True
    )
    device_train.set_epoch(epoch)
    batches = list(device_train)
    assert len(batches) == len(device_train) == 4
    again = list(device_train)  # the same seed and epoch: the same batches, on the device too
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches, again))

    # Replay the loader's draws from a generator like its own (the order, then per batch: top, left,
    # flip) and compute the batches on the CPU from the CPU copy of the split.
    generator = device_generator(device, epoch_seed(seed, epoch))
    count = len(cpu_train.images)
    order = torch.randperm(count, generator=generator, device=device)
    for start, (images, labels) in zip(range(0, count, batch_size), batches, strict=True):
        indices = order[start : start + batch_size]
        n = len(indices)
        top = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator, device=device)
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        rows = indices.cpu()
        crops = crops_of_the_draws(cpu_train.images[rows], top.tolist(), left.tolist(), flip.tolist())
        expected = normalise(crops, CIFAR_MEAN, CIFAR_STD)
        assert images.device.type == device.type
        torch.testing.assert_close(images.cpu(), expected, rtol=0, atol=PIXEL_ATOL)
        assert torch.equal(labels.cpu(), cpu_train.labels[rows])
    assert sorted(order.tolist()) == list(range(count))  # every image once per epoch


# ----------------------------------------------------------------------------------------------
# Entropies and grafting: the CPU's bins and coefficients


# A range whose bin width (hi - lo) / 10 differs in float32 from (hi - lo) * fl32(1/10), the product a
# GPU computes for a division by a number: its values exactly on the edges land one bin lower then.
EDGE_LO, EDGE_HI = -0.6340786814689636, 0.7148456573486328


def on_edge_tensor(size: int, seed: int) -> torch.Tensor:
    """float32 values in [EDGE_LO, EDGE_HI] with every inner edge lo + k * width present k + 1 times."""
    lo, hi = torch.tensor(EDGE_LO), torch.tensor(EDGE_HI)
    edges = lo + torch.arange(1, 10, dtype=torch.float32) * ((hi - lo) / 10)
    on_edges = torch.cat([edges[k - 1].repeat(k + 1) for k in range(1, 10)])
    generator = torch.Generator().manual_seed(seed)
    rest = lo + (hi - lo) * torch.rand(size - len(on_edges) - 2, generator=generator)
    return torch.cat([lo.view(1), hi.view(1), on_edges, rest])


def entropy_with_width(values: torch.Tensor, width: torch.Tensor, bins: int = 10) -> float:
    """docs/METHOD.md §2 literally, one comparison per bin, with the bin width given."""
    lo = values.min()
    counts = [int(((values >= lo + k * width) & (values < lo + (k + 1) * width)).sum()) for k in range(bins)]
    return -sum(c / values.numel() * math.log(c / values.numel()) for c in counts if c)


def test_the_edge_tensors_tell_a_true_division_from_a_reciprocal_multiplication() -> None:
    """On these tensors the two widths give other bins, so the device tests below see whether a GPU bins
    as the published code does there (a multiplication by 1/10) rather than as the CPU does."""
    for size, seed in ((300, 0), (300, 1), (517, 2)):
        values = on_edge_tensor(size, seed)
        span = values.max() - values.min()
        true_width, reciprocal_width = span / 10, span * torch.tensor(1 / 10, dtype=torch.float32)
        assert reciprocal_width != true_width
        # abs=1e-6: this float64 sum against the project's float32 one; another bin moves it by > 1e-3
        assert layer_entropy(values) == pytest.approx(entropy_with_width(values, true_width), abs=1e-6)
        assert abs(layer_entropy(values) - entropy_with_width(values, reciprocal_width)) > 1e-3


def model_tensors() -> list[torch.Tensor]:
    """Every float tensor of two ResNet-110s, with edge cases: equal sizes, dtypes, constants, edges, empty."""
    tensors = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        tensors += [
            t for t in models.create("resnet110", num_classes=10).state_dict().values() if torch.is_floating_point(t)
        ]
    generator = torch.Generator().manual_seed(7)
    return tensors + [
        on_edge_tensor(300, 0),
        on_edge_tensor(300, 1),
        on_edge_tensor(517, 2),  # two stacked, one alone
        torch.randn(300, generator=generator).to(torch.float16),
        torch.randn(300, generator=generator).to(torch.bfloat16),
        torch.randn(300, generator=generator).to(torch.float64),
        torch.full((16,), 3.0),
        torch.tensor([0, 1, 1, 2, 10]),
        torch.empty(0),
        torch.arange(-50, 51, dtype=torch.float32) / 10,
    ]


@pytest.mark.cuda
def test_entropies_on_the_device_are_the_published_loop_on_the_device(device: torch.device) -> None:
    """Bit for bit the published loop run on the same device (docs/METHOD.md §2). On a GPU that is not always
    the CPU's value: the published ``(hi - lo) / 10`` is a multiplication by 1/10 there (see the edge tensors)."""
    tensors = [t for t in model_tensors() if t.numel()]
    on_device = entropy_tensors([t.to(device) for t in tensors])  # every size stacked
    assert on_device.device.type == device.type and on_device.dtype == torch.float64
    expected = [published_entropy(t.to(device)) for t in tensors]
    differing = [k for k, (got, want) in enumerate(zip(on_device.tolist(), expected)) if got != want]
    assert not differing, f"{len(differing)} of {len(tensors)} entropies differ from the published loop"
    edges = [t for t in tensors if t.numel() in (300, 517) and t.dtype == torch.float32][:3]
    for t in edges:  # the single-tensor path and the public wrapper
        assert float(entropy_tensor(t.to(device))) == published_entropy(t.to(device))
    assert layer_entropies([t.to(device) for t in edges]) == [published_entropy(t.to(device)) for t in edges]
    on_cpu = entropy_tensors(tensors).tolist()
    print(
        f"entropies that differ between the CPU and {device}, as in the published code: "
        f"{sum(a != b for a, b in zip(on_cpu, on_device.tolist()))} of {len(tensors)}"
    )


@pytest.mark.cuda
def test_graft_layers_on_the_device_is_the_published_step_on_the_device(device: torch.device) -> None:
    torch.manual_seed(11)
    own, peer = models.create("resnet110", num_classes=10), models.create("resnet110", num_classes=10)
    mine = models.create("resnet110", num_classes=10)
    mine.load_state_dict(own.state_dict())
    mine = mine.to(device)
    reference = models.create("resnet110", num_classes=10)
    reference.load_state_dict(own.state_dict())
    reference = reference.to(device)
    records = graft_layers(mine, peer.state_dict())  # the peer as read from a file: on the CPU
    published_key_graft(reference, {k: v.to(device) for k, v in peer.state_dict().items()})
    assert len(records) == 109 and len({r.alpha for r in records}) > 1
    expected = reference.state_dict()
    differing = [k for k, v in mine.state_dict().items() if not torch.equal(v, expected[k])]
    assert not differing, f"{len(differing)} entries differ from the published step, first {differing[:3]}"
    on_cpu = graft_layers(own, peer.state_dict())
    print(
        f"coefficients that differ between the CPU and {device}, as in the published code: "
        f"{sum(a.alpha != b.alpha for a, b in zip(on_cpu, records))} of {len(records)}"
    )


def host_syncs(fn: Callable[[], object]) -> int:
    """How many times ``fn`` made the host wait for the GPU (torch.cuda's sync-debug mode, in 'warn')."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.cuda
def test_the_entropy_of_a_model_synchronises_the_host_once(device: torch.device) -> None:
    torch.manual_seed(1)
    model = models.create("resnet110", num_classes=10).to(device)
    tensors = [t for t in model.state_dict().values() if torch.is_floating_point(t)]
    peer = {k: v.clone().mul_(0.9) if torch.is_floating_point(v) else v.clone() for k, v in model.state_dict().items()}
    layer_entropies(tensors), graft_layers(model, peer)  # warm-up: lazy initialisation, kernel caches
    if device.type != "cuda":  # a rehearsal has run everything but the counting
        pytest.skip("torch.cuda's sync-debug mode needs a GPU")
    assert host_syncs(lambda: torch.ones((), device=device).item()) == 1  # the instrument sees one
    assert host_syncs(lambda: entropy_tensors(tensors)) == 0
    assert host_syncs(lambda: layer_entropies(tensors)) == 1  # the documented one: the values to the host
    assert host_syncs(lambda: graft_layers(model, peer)) == 1  # the peer on the device, as a broadcast leaves it


@pytest.mark.cuda
def test_the_grafting_step_through_an_exchange_file_is_the_frozen_code_on_the_device(
    device: torch.device, tmp_path: Path
) -> None:
    """The whole step as training runs it: the peer's weights packed on the device and copied to pinned
    memory asynchronously, written by a thread, read into pinned memory, checked, moved over with one
    copy and grafted with one host synchronisation; the result is the frozen reference's (helpers.frozen_graft)."""
    torch.manual_seed(5)
    model = models.create("resnet110", num_classes=10).to(device)
    peer = models.create("resnet110", num_classes=10).to(device)
    expected = models.create("resnet110", num_classes=10).to(device)
    expected.load_state_dict(model.state_dict())
    meta = {"model": "resnet110", "num_classes": 10}
    with Grafter(tmp_path, 1, 2, meta=meta) as one, Grafter(tmp_path, 2, 2, meta=meta) as two:
        two.publish(peer, 1, background=True)
        one.publish(model, 1)  # the Grafter grafts an epoch only after publishing it
        report = one.graft(model, 1)
        assert one.exchange is not None
        from_file, _ = one.exchange.read_unchecked(2, 1, pin_memory=device.type == "cuda")
    assert report.grafted and len(report.layers) == 109
    frozen_graft_layers(expected, peer.state_dict())
    differing = [k for k, v in expected.state_dict().items() if not torch.equal(model.state_dict()[k], v)]
    assert not differing, f"{len(differing)} entries differ from the frozen code, first {differing[:3]}"
    if device.type != "cuda":  # a rehearsal has run everything but the counting
        pytest.skip("torch.cuda's sync-debug mode needs a GPU")
    graft_layers(model, from_file)  # warm-up
    assert host_syncs(lambda: graft_layers(model, from_file)) == 1  # the peer as read: pinned, one copy over


# ----------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-scaler"])
def test_amp_trains_a_few_steps_without_nan(dtype: torch.dtype, device: torch.device, cifar: Path) -> None:
    full, _, _ = cifar_loaders(cifar, 10, batch_size=16, device=device, pipeline="tensor", seed=1)
    images = 8 if REHEARSAL else len(full.images)  # low precision is slow on a CPU: 2 steps per epoch there
    train = TensorCifarLoader(
        full.images[:images], full.labels[:images], 4 if REHEARSAL else 16, train=True, seed=1, channels_last=True
    )
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10).to(device).to(memory_format=torch.channels_last)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen: list[torch.dtype] = []
    model.conv1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = make_scheduler(optimizer, cosine=True, epochs=2, iters_per_epoch=len(train), step_epochs=60)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    for epoch in (1, 2):
        train.set_epoch(epoch)
        stats = train_one_epoch(
            model, train, optimizer, scheduler, epoch=epoch, amp_dtype=dtype, scaler=scaler, print_freq=0
        )
        assert math.isfinite(stats.loss) and stats.images_per_s > 0
    assert set(seen) == {dtype}  # autocast ran the convolutions in the low precision
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in model.parameters())
    changed = sum(not torch.equal(before[name], p) for name, p in model.named_parameters())
    assert changed == len(before)  # steps were taken, not all skipped by the scaler
    if scaler.is_enabled():
        assert 0 < scaler.get_scale() < math.inf


# ----------------------------------------------------------------------------------------------
# Processes: two networks on one GPU; a two-rank NCCL network next to a single-process peer


@pytest.mark.cuda
@pytest.mark.e2e
def test_two_networks_on_one_device_train_and_graft(device: torch.device, cifar: Path, tmp_path: Path) -> None:
    shared = tmp_path / "ring"
    common = [
        "--data",
        str(cifar),
        "--s",
        str(shared),
        "--num",
        "2",
        "--model",
        "resnet20",
        "--epochs",
        "2",
        "--device",
        device.type,
        "--batch-size",
        "32",
        "--test-batch-size",
        "40",
        "--print-freq",
        "0",
        "--threads",
        "1",
        "--keep-all",
    ]
    procs = [
        start_script(CIFAR_SCRIPT, [*common, "--i", str(i)], tmp_path, f"net{i}", merge_output=True) for i in (1, 2)
    ]
    assert finish(procs, RUN_TIMEOUT_S) == [0, 0], "\n".join(p.report() for p in procs)
    for net, peer in ((1, 2), (2, 1)):
        config = json.loads((shared / f"net{net}" / "config.json").read_text())
        assert (config["device"], config["pipeline"], config["channels_last"]) == (device.type, "tensor", True)
        first, last = read_metrics(shared / f"net{net}" / "metrics.jsonl")
        assert first["grafted"] and first["peer"] == peer and first["graft_ms"] > 0
        assert not last["grafted"] and last["graft_ms"] is None
        assert len(set(first["alphas"].values())) > 1
        assert (first["gpu_memory_gib"] is not None) == (device.type == "cuda")
        # The entropies the run computed on its device are the published loop's, on that device, of the
        # files it exchanged.
        own = read_exchange_file(shared / f"net{net}_epoch1.tensors")[0]
        theirs = read_exchange_file(shared / f"net{peer}_epoch1.tensors")[0]
        for key, value in first["entropies"].items():
            assert value == published_entropy(own[key].to(device)), key
            assert first["peer_entropies"][key] == published_entropy(theirs[key].to(device)), key


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 16 training and 8 validation JPEG files per class, about 40 px."""
    return write_fake_imagefolder(
        tmp_path_factory.mktemp("imagefolder_cuda"), num_classes=3, train_per_class=16, val_per_class=8, image_size=40
    )


@pytest.mark.cuda
@pytest.mark.e2e
def test_nccl_network_grafts_next_to_a_single_process_peer(
    device: torch.device, image_folder: Path, tmp_path: Path
) -> None:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("a 2-rank NCCL network needs 2 GPUs (CI runs the same ring with gloo on the CPU)")
    shared = tmp_path / "ring"
    common = [
        str(IMAGENET_SCRIPT),
        "--data",
        str(image_folder),
        "--s",
        str(shared),
        "--num",
        "2",
        "--steplr",
        "--keep-all",
        "--epochs",
        "2",
        "--threads",
        "1",
        "-j",
        "0",
        "-b",
        "16",
        "--image-size",
        "32",
        "-p",
        "0",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"]
    ddp = start_process([*torchrun, *common, "--i", "1"], tmp_path, "net1", merge_output=True)
    single = start_process(
        [sys.executable, *common, "--i", "2", "--device", "cuda:1"], tmp_path, "net2", merge_output=True
    )
    assert finish([ddp, single], RUN_TIMEOUT_S) == [0, 0], ddp.report() + single.report()
    assert "[net 1/2 rank 0]" in ddp.log and "[net 1/2 rank 1]" not in ddp.log, ddp.log
    config = json.loads((shared / "net1" / "config.json").read_text())
    assert (config["world_size"], config["batch_size"], config["device"]) == (2, 16, "cuda:0")
    for net in (1, 2):
        first, last = read_metrics(shared / f"net{net}" / "metrics.jsonl")
        assert first["grafted"] and first["graft_ms"] > 0 and len(first["alphas"]) > 0
        assert last["epoch"] == 2 and math.isfinite(last["test_loss"])


@pytest.fixture(autouse=True)
def free_gpu_memory() -> Iterator[None]:
    """Leave the GPU's memory to the next test and to the benchmark that follows in gpu_check.sh."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
