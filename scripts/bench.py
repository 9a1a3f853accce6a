"""Benchmark of the CIFAR recipe: epoch time, images/s, graft ms, wait s and peak memory for rings of
1, 2, 4 ... networks, the grafting step of ResNet-110, and torch.compile.

    python scripts/bench.py                             # ResNet-32, generated 5000/1000 CIFAR-10 set, 2 epochs
    python scripts/bench.py --device cuda --nets 1 2 4 --variants fp32 amp   # on a GPU: the networks share it
    python scripts/bench.py --what entropy graft        # ResNet-110: entropy vectorised vs per-bin loop, graft ms
    python scripts/bench.py --what compile              # one training step: eager vs torch.compile modes
    python scripts/bench.py -- --threads 1              # everything after -- goes to grafting_cifar/train.py

Sections, chosen with --what:

* ``train`` runs the real ``grafting_cifar/train.py`` (batch 128, test batch 100), first as one process
  and then as N processes side by side on the same device, for each --variants (``fp32``: the script's
  defaults, ``amp``: ``--amp``), and reads each network's ``<s>/net<i>/metrics.jsonl``. The wall time of
  those runs is what a user waits for (start-up, data loading, checkpoints and the exchange included);
  the last epoch's time and images/s are the warm figures (the first epoch also pays for cuDNN's kernel
  search and the allocator's first requests).
* ``entropy`` times the information of every float tensor of a model (default ResNet-110): the per-bin
  loop of the published code against ``layer_entropy`` per tensor and ``layer_entropies`` for all.
* ``graft`` times one grafting step of that model through the library's ``Grafter`` (read the peer's
  file, check it, graft: the ``graft ms`` of the epoch line) and each of the three parts, the publish
  (the copy the training thread waits for, and the write and fsync a background thread does), and
  ``graft_layers`` with the peer's weights as read from the file (CPU) and already on the device.
  These measure milliseconds, so they call the library directly and keep the best of --repeat.
* ``compile`` (not run by default) times one training step (SGD, the recipe's batch, bf16 autocast with
  ``--compile-precision amp``) in this process: eager, ``torch.compile`` and its CUDA-graph mode
  (``reduce-overhead``), with the time of the first steps, which includes compiling.

``--json PATH`` is rewritten after every ring and section, so a run stopped by a time limit keeps what it
measured. ``--report PART.json ...`` runs nothing: it merges the JSON files of several runs with the step
results of ``scripts/gpu_check.sh`` (``--steps``, ``--junit``) into one JSON file and a markdown table.

The machine is often shared: the train section can repeat each ring (--train-repeat) and keep the
fastest, and its table lists the CPU seconds of each process, which contention inflates far less
than wall time.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from grafting.checkpoint import write_text_atomic
from grafting.errors import first_line
from grafting.launch.supervisor import NetworkCommand, RingSupervisor
from grafting.ring.layout import SharedFolder
from grafting.train.report import read_metrics

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "grafting_cifar" / "train.py"
SECTIONS = ("train", "entropy", "graft", "compile")
DEFAULT_SECTIONS = ("train", "entropy", "graft")  # compile takes minutes on a CPU
# The train section's variants: the flags each adds to grafting_cifar/train.py.
VARIANTS = {"fp32": [], "amp": ["--amp"]}
COMPILE_MODES = ("eager", "default", "reduce-overhead")
# The fields of metrics.jsonl (EpochRecord) the benchmark reads; other fields are left alone.
EPOCH_FIELDS = (
    "epoch",
    "epoch_s",
    "train_images_per_s",
    "test_images_per_s",
    "grafted",
    "waited_s",
    "graft_ms",
    "gpu_memory_gib",
)
# The goals of issue 17, on an H100/H200-class GPU (judged only on CUDA).
GOAL_AMP_EPOCH_S = 3.0
GOAL_TWO_NETWORKS_SPEEDUP = 1.6
GOAL_GRAFT_MS = 20.0
GOAL_HOST_SYNCS = 1
SYNC_TEST = "test_the_entropy_of_a_model_synchronises_the_host_once"


class Results(dict):
    """Every number measured so far; rewritten to --json after each ring and section."""

    def __init__(self, path: str | None, **entries: Any) -> None:
        super().__init__(entries)
        self.path = path

    def save(self) -> None:
        """Write the results so far (atomically: a reader never sees half a file)."""
        if self.path:
            write_text_atomic(json.dumps(self, indent=1) + "\n", self.path)


# ----------------------------------------------------------------------------------------------
# train: the real script, 1 and N processes, per variant


@dataclass
class NetRun:
    """One network's process in a ring: what its metrics.jsonl and the kernel said about it."""

    nets: int
    net: int
    run_s: float
    cpu_s: float
    rss_gib: float
    epochs: list[dict[str, Any]] = field(default_factory=list)
    train_img_s: float = 0.0
    test_img_s: float = 0.0
    warm_epoch_s: float | None = None
    warm_train_img_s: float = 0.0
    graft_ms: float | None = None
    wait_s: float | None = None
    gpu_gib: float | None = None


@dataclass
class Ring:
    """One ring of ``nets`` networks started side by side with the flags of ``variant``."""

    variant: str
    nets: int
    wall_s: float = 0.0
    networks: list[NetRun] = field(default_factory=list)
    error: str | None = None

    @property
    def together_img_s(self) -> float:
        """Training images per second of all networks together in their warm (last) epoch."""
        return sum(run.warm_train_img_s for run in self.networks)


def epoch_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed fields of each metrics.jsonl record (``None`` where a record lacks one)."""
    return [{name: record.get(name) for name in EPOCH_FIELDS} for record in records]


def harmonic_mean(values: list[float]) -> float:
    """The rate over equal amounts of work done at each of ``values`` (images/s of equal epochs)."""
    if not values or min(values) <= 0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarise(
    nets: int, net: int, run_s: float, usage: os.struct_rusage | None, records: list[dict[str, Any]]
) -> NetRun:
    """Fold one process's metrics.jsonl records and resource usage into a table row."""
    epochs = epoch_rows(records)
    run = NetRun(
        nets=nets,
        net=net,
        run_s=run_s,
        cpu_s=usage.ru_utime + usage.ru_stime if usage else 0.0,
        rss_gib=usage.ru_maxrss * 1024 / 2**30 if usage else 0.0,
        epochs=epochs,
    )  # ru_maxrss is in KiB on Linux
    if not epochs:
        return run
    run.train_img_s = harmonic_mean([e["train_images_per_s"] or 0.0 for e in epochs])
    run.test_img_s = harmonic_mean([e["test_images_per_s"] or 0.0 for e in epochs])
    run.warm_epoch_s = epochs[-1]["epoch_s"]
    run.warm_train_img_s = epochs[-1]["train_images_per_s"] or 0.0
    grafts = [e["graft_ms"] for e in epochs if e["graft_ms"] is not None]  # None: the epoch did not graft
    if grafts:
        run.graft_ms = sum(grafts) / len(grafts)
    if nets > 1:
        run.wait_s = sum(e["waited_s"] or 0.0 for e in epochs)
    memory = [e["gpu_memory_gib"] for e in epochs if e["gpu_memory_gib"] is not None]
    run.gpu_gib = max(memory) if memory else None
    return run


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_ring(nets: int, variant: str, args: argparse.Namespace, data: Path, work: Path) -> Ring:
    """Start ``nets`` training processes side by side with the launcher's ring supervisor; wait for all (at
    most --ring-timeout seconds).

    A network that fails stops the ring (its peers would wait for it forever); the ring then carries
    the error and the end of that network's log.
    """
    folder = work / f"ring-{variant}-{nets}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shared = SharedFolder(folder / "shared")
    flags = [
        "--data",
        str(data),
        "--s",
        str(shared.root),
        "--num",
        str(nets),
        "--model",
        args.model,
        "--cifar",
        "10",
        "--epochs",
        str(args.epochs),
        "--device",
        args.device,
        "--print-freq",
        "0",
        *VARIANTS[variant],
        *args.train_args,
    ]
    commands = [
        NetworkCommand(
            ring=folder,
            net=net,
            argv=(sys.executable, str(TRAIN_SCRIPT), *flags, "--i", str(net)),
            log=folder / f"net{net}.log",
            where=args.device,
        )
        for net in range(1, nets + 1)
    ]
    supervisor = RingSupervisor(commands, say=lambda line: None, grace_s=5, started_by="scripts/bench.py")
    supervisor.start()
    result = supervisor.wait(timeout=args.ring_timeout or None, poll_s=0.05)
    ring = Ring(variant=variant, nets=nets, wall_s=max((o.seconds for o in result.outcomes), default=0.0))
    failed = [o for o in result.outcomes if o.kind != "finished"]
    if failed:
        timed_out = args.ring_timeout and ring.wall_s >= args.ring_timeout
        first = next((o for o in failed if o.kind == "failed"), failed[0])
        log_path = folder / f"net{first.net}.log"
        ring.error = (
            f"the ring of {nets} did not finish within --ring-timeout {args.ring_timeout:g} s"
            if timed_out
            else f"network {first.net} of {nets} exited with {first.code}; end of {log_path}:\n{_tail(log_path)}"
        )
        return ring
    for outcome in result.outcomes:
        handle = supervisor.handles[outcome.net]
        usage = getattr(handle, "usage", None)  # the default start (a child process) keeps its rusage
        records = read_metrics(shared.network(outcome.net).metrics)
        ring.networks.append(summarise(nets, outcome.net, outcome.seconds, usage, records))
    return ring


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The CIFAR-10 folder to train on and a description of it (generated unless --data is given)."""
    if args.data is not None:
        return Path(args.data), f"CIFAR-10 from {args.data}"
    from grafting.data.fake import write_fake_cifar

    folder = work / f"cifar10_{args.train_size}_{args.test_size}"
    if not (folder / "cifar-10-batches-py" / "test_batch").is_file():  # written last: the set is complete
        write_fake_cifar(folder, 10, train_size=args.train_size, test_size=args.test_size)
    return folder, f"generated CIFAR-10 stand-in, {args.train_size} train / {args.test_size} test images"


def ring_record(ring: Ring, single: Ring | None) -> dict[str, Any]:
    """A ring as JSON, with its throughput and the ratio to one network of the same variant."""
    record = asdict(ring)
    record["together_img_s"] = ring.together_img_s
    ratio = ring.together_img_s / single.together_img_s if single and single.together_img_s else None
    record["vs_one_network"] = ratio if ring.nets > 1 else None
    return record


def bench_train(args: argparse.Namespace, work: Path, results: Results) -> bool:
    """The train section: a table of every ring size in --nets for every --variants; False if a ring failed."""
    data, described = prepare_data(args, work)
    flags = f" + {' '.join(args.train_args)}" if args.train_args else ""
    print(
        f"\n== train: {args.model} on {device_name(args.device)}, {described}, {args.epochs} epochs, "
        f"grafting_cifar/train.py processes (defaults: batch 128, test batch 100{flags}) ==",
        flush=True,
    )
    section = results["train"] = {
        "model": args.model,
        "data": described,
        "epochs": args.epochs,
        "train_args": args.train_args,
        "rings": [],
    }
    images = args.epochs * (args.train_size if args.data is None else _train_size(data))
    memory_kind = "GPU" if args.device.startswith("cuda") else "RSS"
    header = (
        f"{'variant':>7} {'nets':>4} {'net':>3} {'run s':>6} {'warm epoch s':>12} {'train img/s':>11} "
        f"{'test img/s':>10} {'graft ms':>8} {'wait s':>6} {'peak mem':>13} {'cpu s':>6}"
    )
    ok = True
    print(header, flush=True)
    for variant in args.variants:
        single: Ring | None = None
        for nets in args.nets:
            tries = [run_ring(nets, variant, args, data, work) for _ in range(args.train_repeat)]
            ring = min(tries, key=lambda r: (r.error is not None, r.wall_s))  # the least disturbed try
            single = ring if nets == 1 else single
            section["rings"].append(ring_record(ring, single))
            results.save()
            for r in ring.networks:
                memory = r.gpu_gib if memory_kind == "GPU" else r.rss_gib
                print(
                    f"{variant:>7} {r.nets:>4} {r.net:>3} {r.run_s:>6.1f} {_cell(r.warm_epoch_s, '.2f'):>12} "
                    f"{r.warm_train_img_s:>11.0f} {r.test_img_s:>10.0f} {_cell(r.graft_ms, '.1f'):>8} "
                    f"{_cell(r.wait_s, '.1f'):>6} {_cell(memory, '.2f') + ' GiB ' + memory_kind:>13} "
                    f"{r.cpu_s:>6.1f}"
                )
            if ring.error:
                ok = False
                print(f"{variant} x {nets}: FAILED: {ring.error}")
                continue
            ratio = section["rings"][-1]["vs_one_network"]
            print(
                f"{variant} x {nets}: {ring.wall_s:.1f} s wall for {nets} x {images} training images; warm epoch: "
                f"{ring.together_img_s:.0f} img/s together" + (f" ({ratio:.2f}x one network)" if ratio else ""),
                flush=True,
            )
    return ok


def _train_size(data: Path) -> int:
    from grafting.data.cifar import load_cifar

    return len(load_cifar(data, 10)[0])


# ----------------------------------------------------------------------------------------------
# entropy and graft: the library, timed in this process


def per_bin_loop_entropy(w: torch.Tensor, bins: int = 10) -> float:
    """The entropy as the published code computed it: one pass per bin, the minimum taken again for
    both bounds of every bin, float32 tensor arithmetic, a host synchronisation per bin. The yardstick,
    not a tool."""
    flat = w.detach().reshape(-1).float() if not torch.is_floating_point(w) else w.detach().reshape(-1)
    width = (flat.max() - flat.min()) / bins
    total = torch.zeros((), device=flat.device)
    for k in range(bins):
        inside = (flat >= flat.min() + k * width) & (flat < flat.min() + (k + 1) * width)
        share = torch.sum(inside, dtype=torch.float) / flat.numel()
        if share != 0:  # a host synchronisation per bin, as published
            total -= share * torch.log(share)
    return float(total)


def best_ms(
    fn: Callable[[], object], repeat: int, device: torch.device, before: Callable[[], object] | None = None
) -> float:
    """Fastest of ``repeat`` timed calls of ``fn`` in milliseconds (``before`` runs untimed each time)."""
    fn()  # warm-up: allocator, lazy initialisation, kernel caches
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_entropy(args: argparse.Namespace) -> dict[str, Any]:
    """The entropy section: per-bin loop vs vectorised over every float tensor of --graft-model."""
    from grafting.archs import cifar_models as models
    from grafting.method.entropy import layer_entropies, layer_entropy

    device = torch.device(args.device)
    tensors = [
        t
        for t in models.create(args.graft_model, num_classes=10).to(device).state_dict().values()
        if torch.is_floating_point(t)
    ]
    values = sum(t.numel() for t in tensors)
    print(
        f"\n== entropy: every float tensor of {args.graft_model} ({len(tensors)} tensors, {values / 1e6:.2f} M values) "
        f"on {device_name(args.device)}, {torch.get_num_threads()} threads, best of {args.repeat} =="
    )
    loop_ms = best_ms(lambda: [per_bin_loop_entropy(t) for t in tensors], args.repeat, device)
    single_ms = best_ms(lambda: [layer_entropy(t) for t in tensors], args.repeat, device)
    batched_ms = best_ms(lambda: layer_entropies(tensors), args.repeat, device)
    difference = max(abs(a - per_bin_loop_entropy(t)) for a, t in zip(layer_entropies(tensors), tensors))
    print(f"{'per-bin loop (the published form)':<44} {loop_ms:>8.1f} ms")
    print(f"{'layer_entropy, one call per tensor':<44} {single_ms:>8.1f} ms  {loop_ms / single_ms:>5.1f}x")
    print(f"{'layer_entropies, all tensors in one call':<44} {batched_ms:>8.1f} ms  {loop_ms / batched_ms:>5.1f}x")
    print(f"largest difference from the loop: {difference:.1e}")
    return {
        "model": args.graft_model,
        "tensors": len(tensors),
        "values": values,
        "loop_ms": loop_ms,
        "layer_entropy_ms": single_ms,
        "layer_entropies_ms": batched_ms,
        "max_difference": difference,
    }


def bench_graft(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The graft section: the Grafter's step (read the peer's file, check it, graft) with its parts, the
    publish (the copy on the training thread and the write in the background), and graft_layers with
    the peer's weights from the file (CPU) and on the device."""
    from grafting.archs import cifar_models as models
    from grafting.method.graft import graft_layers
    from grafting.ring.grafter import Grafter

    device = torch.device(args.device)
    torch.manual_seed(1)
    model = models.create(args.graft_model, num_classes=10).to(device)
    torch.manual_seed(2)
    peer = models.create(args.graft_model, num_classes=10).to(device)
    pristine = copy.deepcopy(model.state_dict())
    restore = lambda: model.load_state_dict(pristine)  # noqa: E731 - every repeat grafts the same pair
    meta = {"model": args.graft_model, "num_classes": 10}
    root = work / "graft"
    shutil.rmtree(root, ignore_errors=True)
    epochs = args.repeat + 1  # +1 for the warm-up
    print(
        f"\n== graft: {args.graft_model} on {device_name(args.device)}, layer level, name rule, "
        f"{torch.get_num_threads()} threads, best of {args.repeat} =="
    )
    copy_ms, write_ms, reports = [], [], []
    with (
        Grafter(root, 1, 2, keep_all=True, meta=meta) as grafter,
        Grafter(root, 2, 2, keep_all=True, meta=meta) as other,
    ):
        assert other.exchange is not None and grafter.exchange is not None
        scratch = copy.deepcopy(peer)  # network 2's own grafts go into a copy: the peer stays as it is
        for epoch in range(1, epochs + 1):  # each network publishes an epoch, then grafts it (the Grafter's order)
            _sync(device)
            start = time.perf_counter()
            other.publish(peer, epoch, background=True)  # what the training thread waits for
            copy_ms.append((time.perf_counter() - start) * 1000)
            write_ms.append(other.exchange.wait_published() * 1000)  # the write and fsync, during the test pass
            restore()
            grafter.publish(model, epoch)
            reports.append(grafter.graft(model, epoch))
            other.graft(scratch, epoch)
        from_file, _ = grafter.exchange.load(2, 1)  # the peer's weights as the step reads them: on the CPU
    timed = reports[1:]
    step_ms = min(r.graft_ms for r in timed)
    read_ms, check_ms = min(r.read_ms for r in timed), min(r.check_ms for r in timed)
    layers_ms = min(r.graft_ms - r.read_ms - r.check_ms for r in timed)
    from_file_ms = best_ms(lambda: graft_layers(model, from_file), args.repeat, device, before=restore)
    on_device = peer.state_dict()
    on_device_ms = best_ms(lambda: graft_layers(model, on_device), args.repeat, device, before=restore)
    rows = [
        ("Grafter.graft: read + check + graft", step_ms, "(the epoch line's graft ms)"),
        ("  read the peer's file", read_ms, ""),
        ("  check it (ring, keys, shapes, values)", check_ms, ""),
        ("  graft (entropies, coefficients, blend)", layers_ms, ""),
        ("publish: copy the weights (training thread)", min(copy_ms[1:]), ""),
        ("publish: write + fsync (background thread)", min(write_ms[1:]), "(overlaps the test pass)"),
        ("graft_layers, peer as read (CPU)", from_file_ms, ""),
        ("graft_layers, peer weights on the device", on_device_ms, ""),
    ]
    for label, ms, note in rows:
        print(f"{label:<44} {ms:>8.1f} ms   {note}".rstrip())
    shutil.rmtree(root, ignore_errors=True)
    return {
        "model": args.graft_model,
        "grafter_ms": step_ms,
        "read_ms": read_ms,
        "check_ms": check_ms,
        "graft_ms": layers_ms,
        "publish_ms": min(copy_ms[1:]),
        "write_ms": min(write_ms[1:]),
        "graft_layers_from_file_ms": from_file_ms,
        "graft_layers_ms": on_device_ms,
        "coefficients": len(reports[-1].layers),
    }


# ----------------------------------------------------------------------------------------------
# compile: one training step, eager and compiled


def time_train_steps(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One --model training step (SGD, --compile-batch synthetic images on the device) in ``mode``: the
    seconds of the first --compile-warmup steps (compiling included) and the steady images/s after them."""
    import torch.nn.functional as F

    from grafting.archs import cifar_models as models
    from grafting.train.run import amp_dtype_for

    device = torch.device(args.device)
    amp_dtype = amp_dtype_for(device, args.compile_precision == "amp")
    torch.manual_seed(0)
    images = torch.randn(args.compile_batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.compile_batch,), device=device)
    model = models.create(args.model, num_classes=10).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    forward = model
    if mode != "eager":
        torch._dynamo.reset()  # each mode compiles from scratch
        forward = torch.compile(model, backend=args.compile_backend, mode=None if mode == "default" else mode)

    def step() -> torch.Tensor:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    start = time.perf_counter()
    for _ in range(args.compile_warmup):
        step()
    _sync(device)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step() for _ in range(args.compile_steps)]
    _sync(device)
    steady_s = time.perf_counter() - start
    if not bool(torch.stack(losses).isfinite().all()):
        raise RuntimeError(f"the loss became NaN or infinite in {mode} mode")
    return {
        "first_steps_s": first_s,
        "step_ms": steady_s / args.compile_steps * 1000,
        "img_s": args.compile_batch * args.compile_steps / steady_s,
    }


def bench_compile(args: argparse.Namespace, results: Results) -> bool:
    """The compile section: --compile-modes one after the other; False if a mode failed."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training script sets it
    precision = "bf16 autocast" if args.compile_precision == "amp" else "fp32"
    print(
        f"\n== compile: one {args.model} training step, batch {args.compile_batch}, {precision}, on "
        f"{device_name(args.device)}, backend {args.compile_backend}, {args.compile_warmup} warm-up + "
        f"{args.compile_steps} timed steps ==",
        flush=True,
    )
    section = results["compile"] = {
        "model": args.model,
        "batch": args.compile_batch,
        "precision": precision,
        "backend": args.compile_backend,
        "modes": [],
    }
    ok = True
    for mode in args.compile_modes:
        row: dict[str, Any] = {"mode": mode}
        try:
            row.update(time_train_steps(mode, args))
        except Exception as err:  # a mode that breaks is a finding, not the end of the benchmark
            ok = False
            row["error"] = f"{type(err).__name__}: {first_line(err)}"
        eager = section["modes"][0] if section["modes"] and section["modes"][0]["mode"] == "eager" else None
        if eager and "img_s" in row and "img_s" in eager:
            row["vs_eager"] = row["img_s"] / eager["img_s"]
            row["pays_off_after_epochs"] = pays_off_after(eager, row)
        section["modes"].append(row)
        results.save()
        if "error" in row:
            print(f"{mode:<16} FAILED: {row['error']}", flush=True)
        else:
            print(
                f"{mode:<16} first {args.compile_warmup} steps {row['first_steps_s']:>6.1f} s, then "
                f"{row['step_ms']:>7.2f} ms/step, {row['img_s']:>8.0f} img/s"
                + (f" ({row['vs_eager']:.2f}x eager)" if "vs_eager" in row else ""),
                flush=True,
            )
    return ok


# One CIFAR epoch of the recipe, in training steps (50 000 images, batch 128), for the pay-off estimate.
CIFAR_STEPS_PER_EPOCH = math.ceil(50000 / 128)


def pays_off_after(eager: dict[str, Any], mode: dict[str, Any]) -> float | None:
    """CIFAR epochs after which the mode's faster steps have paid for its compiling (None: never)."""
    saved_per_epoch = (eager["step_ms"] - mode["step_ms"]) * CIFAR_STEPS_PER_EPOCH / 1000
    extra = mode["first_steps_s"] - eager["first_steps_s"]
    if saved_per_epoch <= 0:
        return None
    return max(0.0, extra) / saved_per_epoch


# ----------------------------------------------------------------------------------------------
# report: the parts of a GPU check in one JSON file and one markdown table


def read_steps(path: Path) -> list[dict[str, Any]]:
    """scripts/gpu_check.sh's step lines: name, status (ok, failed (exit N), timed out, skipped), seconds, limit."""
    steps = []
    with open(path, newline="") as handle:
        for name, status, seconds, limit in csv.reader(handle, delimiter="\t"):
            steps.append({"name": name, "status": status, "seconds": float(seconds), "limit_s": float(limit)})
    return steps


def read_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest --junitxml file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    cases = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        counts[outcome] += 1
        lines = message.strip().splitlines()
        cases.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "message": lines[0] if lines else "",
                "seconds": float(case.get("time", 0) or 0),
            }
        )
    return {**counts, "cases": cases}


def _ring(results: dict[str, Any], variant: str, nets: int) -> dict[str, Any] | None:
    rings = results.get("train", {}).get("rings", [])
    return next((r for r in rings if r["variant"] == variant and r["nets"] == nets and not r["error"]), None)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's goals with what was measured; ``met`` is None when not measured or not on a GPU."""
    on_gpu = str(results.get("device", "")).startswith("cuda")
    rows = []

    def add(goal: str, value: float | str | None, text: str, met: bool) -> None:
        rows.append(
            {
                "goal": goal,
                "measured": value,
                "text": text if value is not None else "not measured",
                "met": met if value is not None and on_gpu else None,
            }
        )

    trained = results.get("train", {}).get("model", "ResNet-32")
    one = _ring(results, "amp", 1)
    epoch_s = one["networks"][0]["warm_epoch_s"] if one and one["networks"] else None
    add(
        f"{trained} epoch with --amp, one network: at most {GOAL_AMP_EPOCH_S:g} s",
        epoch_s,
        f"{epoch_s or 0:.2f} s",
        epoch_s is not None and epoch_s <= GOAL_AMP_EPOCH_S,
    )
    two = _ring(results, "amp", 2)
    ratio = two["vs_one_network"] if two else None
    add(
        f"two networks sharing the GPU (--amp): at least {GOAL_TWO_NETWORKS_SPEEDUP:g}x one network's throughput",
        ratio,
        f"{ratio or 0:.2f}x",
        ratio is not None and ratio >= GOAL_TWO_NETWORKS_SPEEDUP,
    )
    graft = results.get("graft")
    graft_ms = graft["grafter_ms"] if graft else None
    text = f"{graft_ms or 0:.1f} ms (read {graft['read_ms']:.1f} ms, check {graft['check_ms']:.1f} ms)" if graft else ""
    add(
        f"Grafter.graft of {graft['model'] if graft else 'ResNet-110'}, file read included: under {GOAL_GRAFT_MS:g} ms",
        graft_ms,
        text,
        graft_ms is not None and graft_ms < GOAL_GRAFT_MS,
    )
    case = next((c for c in (results.get("tests") or {}).get("cases", []) if c["name"] == SYNC_TEST), None)
    outcome = None if case is None or case["outcome"] == "skipped" else case["outcome"]
    add(
        f"host synchronisations in the entropy of a model: at most {GOAL_HOST_SYNCS}",
        outcome,
        f"`{SYNC_TEST}` {outcome}",
        outcome == "passed",
    )
    return rows


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{unit}"


def markdown(results: dict[str, Any]) -> str:
    """The GPU check's tables, ready to paste into docs/performance.md."""
    on_gpu = str(results.get("device", "")).startswith("cuda")
    lines = [
        f"**GPU check** on {results.get('device_name', '?')}, torch {results.get('torch', '?')}"
        f"{', CUDA ' + results['cuda'] if results.get('cuda') else ''}, {results.get('date', '')}"
        + ("" if on_gpu else ". REHEARSAL on the CPU with tiny sizes: these are not GPU figures."),
        "",
    ]
    tests = results.get("tests")
    lines += ["| step | result | seconds |", "|---|---|---|"]
    for step in results.get("steps", []):
        result = step["status"]
        if step["name"] == "cuda_tests" and tests:
            result += f": {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        lines.append(f"| {step['name']} | {result} | {step['seconds']:.0f} (limit {step['limit_s']:.0f}) |")
    train = results.get("train")
    if train and train["rings"]:
        sizes = sorted({r["nets"] for r in train["rings"]})
        lines += [
            "",
            f"| {train['model']}, {train['data']}, {train['epochs']} epochs, warm (last) epoch | "
            + " | ".join(f"{n} network{'s' if n > 1 else ''}" for n in sizes)
            + " |",
            "|---" * (len(sizes) + 1) + "|",
        ]
        for variant in dict.fromkeys(r["variant"] for r in train["rings"]):
            label = "`--amp`" if variant == "amp" else variant
            rings = {r["nets"]: r for r in train["rings"] if r["variant"] == variant}
            epoch, together, memory = [], [], []
            for n in sizes:
                ring = rings.get(n)
                if ring is None or ring["error"] or not ring["networks"]:
                    failed = "failed" if ring else "-"
                    epoch.append(failed), together.append(failed), memory.append(failed)
                    continue
                runs = ring["networks"]
                slowest = max(r["warm_epoch_s"] or 0 for r in runs)
                epoch.append(
                    f"{slowest:.2f} s ({min(r['warm_train_img_s'] for r in runs):,.0f} img/s"
                    + (" each)" if n > 1 else ")")
                )
                ratio = ring["vs_one_network"]
                together.append(f"{ring['together_img_s']:,.0f} img/s" + (f" ({ratio:.2f}x)" if ratio else ""))
                peaks = [r["gpu_gib"] for r in runs if r["gpu_gib"] is not None]
                memory.append(f"{max(peaks):.2f} GiB" if peaks else f"{max(r['rss_gib'] for r in runs):.2f} GiB RSS")
            lines.append(f"| {label}: epoch (train img/s) | " + " | ".join(epoch) + " |")
            lines.append(f"| {label}: all networks together | " + " | ".join(together) + " |")
            lines.append(f"| {label}: peak memory per network | " + " | ".join(memory) + " |")
    entropy, graft = results.get("entropy"), results.get("graft")
    if entropy or graft:
        model = (graft or entropy)["model"]
        lines += ["", f"| {model} on {results.get('device_name', '?')} | ms |", "|---|---|"]
        if entropy:
            lines += [
                f"| entropy of every tensor ({entropy['tensors']}), per-bin loop of the published code | "
                f"{entropy['loop_ms']:.1f} |",
                f"| `layer_entropies`, all at once | {entropy['layer_entropies_ms']:.1f} |",
            ]
        if graft:
            lines += [
                f"| grafting step (`Grafter.graft`: read the peer's file, check, graft) | {graft['grafter_ms']:.1f} |",
                f"| read the peer's file (one read, no unpickling) | {graft['read_ms']:.1f} |",
                f"| check it (ring, architecture, keys, shapes, finiteness, magnitudes) | {graft['check_ms']:.1f} |",
                f"| graft (entropies, coefficients, blend) | {graft['graft_ms']:.1f} |",
                f"| publish: the copy the training thread waits for | {graft['publish_ms']:.1f} |",
                f"| publish: write and fsync in the background (during the test pass) | {graft['write_ms']:.1f} |",
                f"| `graft_layers`, the peer as read (CPU, copied to the device) | "
                f"{graft['graft_layers_from_file_ms']:.1f} |",
                f"| `graft_layers`, the peer already on the device | {graft['graft_layers_ms']:.1f} |",
            ]
    compiled = results.get("compile")
    if compiled and compiled["modes"]:
        lines += [
            "",
            f"| {compiled['model']} training step, batch {compiled['batch']}, {compiled['precision']} | "
            "first steps (compiling) | ms/step | img/s | vs eager | pays off after |",
            "|---|---|---|---|---|---|",
        ]
        for row in compiled["modes"]:
            name = "eager" if row["mode"] == "eager" else f"`torch.compile`, {row['mode']}"
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error']} | | | | |")
                continue
            pays = row.get("pays_off_after_epochs")
            after = (
                "-"
                if row["mode"] == "eager"
                else ("never" if pays is None else "< 0.1 epoch" if pays < 0.1 else f"{pays:.1f} epochs")
            )
            lines.append(
                f"| {name} | {row['first_steps_s']:.1f} s | {row['step_ms']:.2f} | {row['img_s']:,.0f} | "
                f"{_cell(row.get('vs_eager'), '.2f', 'x')} | {after} |"
            )
    rows = results.get("goals", [])
    if rows:
        lines += ["", "| goal | measured | met |", "|---|---|---|"]
        for row in rows:
            met = {True: "yes", False: "**no**", None: "not judged" if not on_gpu else "-"}[row["met"]]
            lines.append(f"| {row['goal']} | {row['text']} | {met} |")
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> int:
    """Merge --report JSON parts (and --steps, --junit) into --json and --markdown; print the markdown."""
    merged: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), **machine(args.device)}
    for part in args.report:
        path = Path(part)
        if path.is_file():  # a step that failed early may have written nothing
            merged.update(json.loads(path.read_text()))
    if args.steps and Path(args.steps).is_file():
        merged["steps"] = read_steps(Path(args.steps))
    merged["tests"] = read_junit(Path(args.junit)) if args.junit and Path(args.junit).is_file() else None
    merged["goals"] = goals(merged)
    merged["ok"] = all(step["status"] == "ok" for step in merged.get("steps", []))
    text = markdown(merged)
    if args.json:
        write_text_atomic(json.dumps(merged, indent=1) + "\n", args.json)
    if args.markdown:
        write_text_atomic(text, args.markdown)
    print(text, end="")
    return 0


# ----------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The device with its hardware name, for the section headers."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({os.cpu_count()} cores)" if device == "cpu" else device


def machine(device: str) -> dict[str, Any]:
    """What the figures were measured on."""
    facts = {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts.update(cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    return facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of the benchmark; everything after ``--`` is passed to grafting_cifar/train.py."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS), help="sections to run")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:N] (default: cuda when present)",
    )
    parser.add_argument("--model", default="resnet32", help="model of the train and compile sections")
    parser.add_argument("--nets", type=int, nargs="+", default=[1, 2], help="ring sizes to run side by side")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["fp32"],
        help="train section: fp32 (the script's defaults) and/or amp (--amp)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=5000, help="generated training images")
    parser.add_argument("--test-size", type=int, default=1000, help="generated test images")
    parser.add_argument("--data", default=None, help="a CIFAR-10 folder to use instead of generated data")
    parser.add_argument(
        "--train-repeat",
        type=int,
        default=1,
        help="run each ring this many times and report the fastest (shared machines)",
    )
    parser.add_argument(
        "--ring-timeout",
        type=float,
        default=0,
        metavar="SECONDS",
        help="stop a ring that has not finished after this long (0: no limit)",
    )
    parser.add_argument("--graft-model", default="resnet110", help="model of the entropy and graft sections")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats of the entropy and graft sections")
    parser.add_argument(
        "--compile-modes",
        nargs="+",
        choices=COMPILE_MODES,
        default=list(COMPILE_MODES),
        help="compile section: eager and torch.compile modes (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (eager: trace only, for a quick check of the section)",
    )
    parser.add_argument("--compile-precision", choices=list(VARIANTS), default="amp", help="compile section precision")
    parser.add_argument("--compile-batch", type=int, default=128, help="compile section batch size")
    parser.add_argument("--compile-warmup", type=int, default=3, help="compile section: untimed first steps")
    parser.add_argument("--compile-steps", type=int, default=50, help="compile section: timed steps")
    parser.add_argument(
        "--work", default=None, help="folder for data, runs and logs (default: a temporary one, removed at the end)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="PART.json",
        help="run nothing: merge these JSON files of earlier runs into --json and --markdown",
    )
    parser.add_argument("--steps", default=None, metavar="TSV", help="with --report: gpu_check.sh's step results")
    parser.add_argument("--junit", default=None, metavar="XML", help="with --report: pytest's --junitxml file")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="with --report: write the tables here")
    args = parser.parse_args(argv)
    args.train_args = train_args
    if (
        min(args.nets) < 1
        or min(args.epochs, args.train_repeat, args.repeat, args.compile_batch, args.compile_steps) < 1
        or args.compile_warmup < 0
    ):
        parser.error(
            "--nets, --epochs, --train-repeat, --repeat, --compile-batch and --compile-steps must be at "
            "least 1, --compile-warmup at least 0"
        )
    if args.report is None and (args.steps or args.junit or args.markdown):
        parser.error("--steps, --junit and --markdown go with --report")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections and print their tables (or merge a report); 1 if a part failed."""
    args = parse_args(argv)
    if args.report is not None:
        return report(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="graft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = Results(args.json, **machine(args.device))
    results.save()
    start = time.perf_counter()
    ok = True
    try:
        if "train" in args.what:
            ok &= bench_train(args, work, results)
        if {"entropy", "graft", "compile"} & set(args.what):
            from grafting.train.runtime import configure_threads

            configure_threads(None, 1, torch.device(args.device))  # one network's share: every core
        if "entropy" in args.what:
            results["entropy"] = bench_entropy(args)
            results.save()
        if "graft" in args.what:
            results["graft"] = bench_graft(args, work)
            results.save()
        if "compile" in args.what:
            ok &= bench_compile(args, results)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["bench_s"] = time.perf_counter() - start
    results.save()
    print(f"\nbench finished in {results['bench_s']:.0f} s" + ("" if ok else "; some parts FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
