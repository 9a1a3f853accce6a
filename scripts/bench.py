"""Benchmark of the CIFAR recipe: images/s, graft ms, wait s and peak memory for 1 and 2 networks.

    python scripts/bench.py                             # ResNet-32, generated 5000/1000 CIFAR-10 set, 2 epochs
    python scripts/bench.py --device cuda --nets 1 2 4  # on a GPU: the networks share it
    python scripts/bench.py --what entropy graft        # ResNet-110: entropy vectorised vs per-bin loop, graft ms
    python scripts/bench.py -- --amp --threads 1        # everything after -- goes to grafting_cifar/train.py

Three sections, chosen with --what:

* ``train`` runs the real ``grafting_cifar/train.py`` (batch 128, test batch 100), first as one process
  and then as N processes side by side on the same device, and reads each network's epoch lines. The
  wall time of those runs is what a user waits for (start-up, data loading, checkpoints and the
  exchange included), so the script is timed as a whole rather than a loop inside this process.
* ``entropy`` times the information of every float tensor of a model (default ResNet-110): the per-bin
  loop of the published code against ``layer_entropy`` per tensor and ``layer_entropies`` for all.
* ``graft`` times one grafting step of that model through the library's ``Grafter`` (read the peer's
  file, check it, graft: the ``graft ms`` of the epoch line) and ``graft_layers`` on weights in memory.
  These two measure milliseconds, so they call the library directly and keep the best of --repeat.

The machine is often shared: the train section can repeat each ring (--train-repeat) and keep the
fastest, and its table lists the CPU seconds of each process, which contention inflates far less
than wall time.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "grafting_cifar" / "train.py"
SECTIONS = ("train", "entropy", "graft")
# The epoch line of grafting/loop.py: "... | wait 0.3 s | graft 48.1 ms | 342 img/s (test 1380) | mem 1.20 GiB"
EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+) \|.*\| (?:wait ([\d.]+) s \| graft ([\d.]+) ms|no graft[^|]*).*?\| (\d+) img/s \(test (\d+)\)"
    r"(?: \| mem ([\d.]+) GiB)?")


# ----------------------------------------------------------------------------------------------
# train: the real script, 1 and N processes


@dataclass
class NetRun:
    """One network's process in a ring: what its epoch lines and the kernel said about it."""

    nets: int
    net: int
    run_s: float
    cpu_s: float
    rss_gib: float
    train_img_s: float = 0.0
    test_img_s: float = 0.0
    graft_ms: float | None = None
    wait_s: float | None = None
    gpu_gib: float | None = None
    epochs: list[dict[str, float]] = field(default_factory=list)


def parse_epoch_lines(text: str) -> list[dict[str, float]]:
    """The numbers of every epoch line in a training log, in order."""
    rows = []
    for match in EPOCH_LINE.finditer(text):
        epoch, _, wait, graft, train, test, mem = match.groups()
        rows.append({"epoch": int(epoch), "wait_s": float(wait or 0), "graft_ms": float(graft or 0),
                     "train_img_s": float(train), "test_img_s": float(test),
                     "gpu_gib": float(mem) if mem is not None else math.nan})
    return rows


def harmonic_mean(values: list[float]) -> float:
    """The rate over equal amounts of work done at each of ``values`` (images/s of equal epochs)."""
    if not values or min(values) <= 0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarise(nets: int, net: int, run_s: float, usage: os.struct_rusage, log_text: str) -> NetRun:
    """Fold one process's epoch lines and resource usage into a table row."""
    epochs = parse_epoch_lines(log_text)
    run = NetRun(nets=nets, net=net, run_s=run_s, cpu_s=usage.ru_utime + usage.ru_stime,
                 rss_gib=usage.ru_maxrss * 1024 / 2**30, epochs=epochs)  # ru_maxrss is in KiB on Linux
    if not epochs:
        return run
    run.train_img_s = harmonic_mean([e["train_img_s"] for e in epochs])
    run.test_img_s = harmonic_mean([e["test_img_s"] for e in epochs])
    if nets > 1:
        grafting = epochs[:-1]  # the last epoch neither publishes nor grafts
        if grafting:
            run.graft_ms = sum(e["graft_ms"] for e in grafting) / len(grafting)
        run.wait_s = sum(e["wait_s"] for e in epochs)
    memory = [e["gpu_gib"] for e in epochs if not math.isnan(e["gpu_gib"])]
    run.gpu_gib = max(memory) if memory else None
    return run


def run_ring(nets: int, args: argparse.Namespace, data: Path, work: Path) -> list[NetRun]:
    """Start ``nets`` training processes side by side; wait for all; one row per network."""
    ring = work / f"ring{nets}"
    shutil.rmtree(ring, ignore_errors=True)
    ring.mkdir(parents=True)
    procs: list[tuple[int, subprocess.Popen, Path]] = []
    start = time.perf_counter()
    for net in range(1, nets + 1):
        log_path = ring / f"net{net}.log"
        command = [sys.executable, str(TRAIN_SCRIPT), "--data", str(data), "--s", str(ring / "shared"),
                   "--num", str(nets), "--i", str(net), "--model", args.model, "--cifar", "10",
                   "--epochs", str(args.epochs), "--device", args.device, "--print-freq", "0", *args.train_args]
        with open(log_path, "w") as log:
            procs.append((net, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log_path))
    finished: dict[int, NetRun] = {}
    try:
        while len(finished) < nets:
            for net, proc, log_path in procs:
                if net in finished:
                    continue
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # rusage of exactly this child
                if pid == 0:
                    continue
                proc.returncode = os.waitstatus_to_exitcode(status)
                text = log_path.read_text()
                if proc.returncode != 0:
                    tail = "\n".join(text.splitlines()[-15:])
                    raise SystemExit(f"bench: network {net} of {nets} exited with {proc.returncode}; "
                                     f"end of {log_path}:\n{tail}")
                finished[net] = summarise(nets, net, time.perf_counter() - start, usage, text)
            time.sleep(0.05)
    finally:
        for _, proc, _ in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    return [finished[net] for net in range(1, nets + 1)]


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The CIFAR-10 folder to train on and a description of it (generated unless --data is given)."""
    if args.data is not None:
        return Path(args.data), f"CIFAR-10 from {args.data}"
    from grafting.data.fake import write_fake_cifar

    folder = work / f"cifar10_{args.train_size}_{args.test_size}"
    if not (folder / "cifar-10-batches-py" / "test_batch").is_file():
        write_fake_cifar(folder, 10, train_size=args.train_size, test_size=args.test_size)
    return folder, f"generated CIFAR-10 stand-in, {args.train_size} train / {args.test_size} test images"


def bench_train(args: argparse.Namespace, work: Path) -> dict:
    """The train section: table of every ring size in --nets."""
    data, described = prepare_data(args, work)
    flags = f" + {' '.join(args.train_args)}" if args.train_args else ""
    print(f"\n== train: {args.model} on {device_name(args.device)}, {described}, {args.epochs} epochs, "
          f"grafting_cifar/train.py processes (defaults: batch 128, test batch 100{flags}) ==")
    rings: dict[int, list[NetRun]] = {}
    for nets in args.nets:
        tries = [run_ring(nets, args, data, work) for _ in range(args.train_repeat)]
        rings[nets] = min(tries, key=lambda runs: max(r.run_s for r in runs))  # the least disturbed try
    memory_kind = "GPU" if args.device.startswith("cuda") else "RSS"
    header = f"{'nets':>4} {'net':>3} {'run s':>7} {'train img/s':>11} {'test img/s':>10} {'graft ms':>8} " \
             f"{'wait s':>6} {'peak mem':>13} {'cpu s':>6}"
    print(header)
    for runs in rings.values():
        for r in runs:
            memory = r.gpu_gib if memory_kind == "GPU" else r.rss_gib
            print(f"{r.nets:>4} {r.net:>3} {r.run_s:>7.1f} {r.train_img_s:>11.0f} {r.test_img_s:>10.0f} "
                  f"{_maybe(r.graft_ms, '.1f'):>8} {_maybe(r.wait_s, '.1f'):>6} "
                  f"{_maybe(memory, '.2f') + ' GiB ' + memory_kind:>13} {r.cpu_s:>6.1f}")
    images = args.epochs * (args.train_size if args.data is None else _train_size(data))
    single = images / max(r.run_s for r in rings[1]) if 1 in rings else None
    for nets, runs in rings.items():
        wall = max(r.run_s for r in runs)
        together = nets * images / wall
        ratio = f" ({together / single:.2f}x one network)" if single and nets > 1 else ""
        print(f"{nets} network{'s' if nets > 1 else ''}: {wall:.1f} s wall for {nets} x {images} training images, "
              f"{together:.0f} img/s over the whole run{ratio}")
    return {str(nets): [asdict(r) for r in runs] for nets, runs in rings.items()}


def _train_size(data: Path) -> int:
    from grafting.data.cifar import load_cifar

    return len(load_cifar(data, 10)[0])


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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


def best_ms(fn, repeat: int, device: torch.device, before=None) -> float:
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


def bench_entropy(args: argparse.Namespace) -> dict:
    """The entropy section: per-bin loop vs vectorised over every float tensor of --graft-model."""
    from grafting.archs import cifar_models as models
    from grafting.method.entropy import layer_entropies, layer_entropy

    device = torch.device(args.device)
    tensors = [t for t in models.create(args.graft_model, num_classes=10).to(device).state_dict().values()
               if torch.is_floating_point(t)]
    values = sum(t.numel() for t in tensors)
    print(f"\n== entropy: every float tensor of {args.graft_model} ({len(tensors)} tensors, {values / 1e6:.2f} M values) "
          f"on {device_name(args.device)}, {torch.get_num_threads()} threads, best of {args.repeat} ==")
    loop_ms = best_ms(lambda: [per_bin_loop_entropy(t) for t in tensors], args.repeat, device)
    single_ms = best_ms(lambda: [layer_entropy(t) for t in tensors], args.repeat, device)
    batched_ms = best_ms(lambda: layer_entropies(tensors), args.repeat, device)
    difference = max(abs(a - per_bin_loop_entropy(t)) for a, t in zip(layer_entropies(tensors), tensors))
    print(f"{'per-bin loop (the published form)':<44} {loop_ms:>8.1f} ms")
    print(f"{'layer_entropy, one call per tensor':<44} {single_ms:>8.1f} ms  {loop_ms / single_ms:>5.1f}x")
    print(f"{'layer_entropies, all tensors in one call':<44} {batched_ms:>8.1f} ms  {loop_ms / batched_ms:>5.1f}x")
    print(f"largest difference from the loop: {difference:.1e}")
    return {"tensors": len(tensors), "values": values, "loop_ms": loop_ms, "layer_entropy_ms": single_ms,
            "layer_entropies_ms": batched_ms, "max_difference": difference}


def bench_graft(args: argparse.Namespace, work: Path) -> dict:
    """The graft section: the Grafter's step (file in, graft) and graft_layers alone, on --graft-model."""
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
    print(f"\n== graft: {args.graft_model} on {device_name(args.device)}, layer level, name rule, "
          f"{torch.get_num_threads()} threads, best of {args.repeat} ==")
    with Grafter(root, 1, 2, keep_all=True, meta=meta) as grafter, Grafter(root, 2, 2, keep_all=True, meta=meta) as other:
        for epoch in range(1, epochs + 1):
            other.publish(peer, epoch)
        reports = []
        for epoch in range(1, epochs + 1):
            restore()
            reports.append(grafter.graft(model, epoch))
    step_ms = min(r.graft_ms for r in reports[1:])
    peer_state = peer.state_dict()
    memory_ms = best_ms(lambda: graft_layers(model, peer_state), args.repeat, device, before=restore)
    print(f"{'Grafter.graft: read the peer file + graft':<44} {step_ms:>8.1f} ms   (the epoch line's graft ms)")
    print(f"{'graft_layers, peer weights in memory':<44} {memory_ms:>8.1f} ms")
    shutil.rmtree(root, ignore_errors=True)
    return {"grafter_ms": step_ms, "graft_layers_ms": memory_ms, "coefficients": len(reports[-1].layers)}


# ----------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The device with its hardware name, for the section headers."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({os.cpu_count()} cores)" if device == "cpu" else device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of the benchmark; everything after ``--`` is passed to grafting_cifar/train.py."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument("--model", default="resnet32", help="model of the train section")
    parser.add_argument("--nets", type=int, nargs="+", default=[1, 2], help="ring sizes to run side by side")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=5000, help="generated training images")
    parser.add_argument("--test-size", type=int, default=1000, help="generated test images")
    parser.add_argument("--data", default=None, help="a CIFAR-10 folder to use instead of generated data")
    parser.add_argument("--train-repeat", type=int, default=1,
                        help="run each ring this many times and report the fastest (shared machines)")
    parser.add_argument("--graft-model", default="resnet110", help="model of the entropy and graft sections")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats of the entropy and graft sections")
    parser.add_argument("--work", default=None,
                        help="folder for data, runs and logs (default: a temporary one, removed at the end)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    args.train_args = train_args
    if min(args.nets) < 1 or args.epochs < 1 or args.train_repeat < 1 or args.repeat < 1:
        parser.error("--nets, --epochs, --train-repeat and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen sections and print their tables."""
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="graft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": args.device, "torch": torch.__version__}
    start = time.perf_counter()
    try:
        if "train" in args.what:
            results["train"] = bench_train(args, work)
        if "entropy" in args.what or "graft" in args.what:
            from grafting.train.runtime import configure_threads

            configure_threads(None, 1, torch.device(args.device))  # one network's share: every core
        if "entropy" in args.what:
            results["entropy"] = bench_entropy(args)
        if "graft" in args.what:
            results["graft"] = bench_graft(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["bench_s"] = time.perf_counter() - start
    print(f"\nbench finished in {results['bench_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
