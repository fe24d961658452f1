"""Data loading in fit: a dataset that takes LOAD_MS per sample to read (as files from disk do), trained with
``num_workers=0`` (fit's old DataLoader) and with ``num_workers=2``, pinned memory and persistent workers, side by
side in one run; steps/s from fit's own per-epoch throughput (the first epoch, with the workers' start, left out).

    python -m bench.bench_data                      # the RIM on CUDA when there is a GPU, else on the CPU
    python -m bench.bench_data --device cpu --epochs 4 --load-ms 5 --out bench/results/data.json
    RIM_FAST_BENCH_SMOKE=1 python -m bench.bench_data   # tiny, to check that it runs

Pinned memory serves host-to-GPU copies only: on the CPU the workers run without it, and the report says so.
The first line printed names the machine (bench.common.machine_line). Also reported: the loader alone (no
training) and the training step alone (one batch held in memory), the two bounds of the steps/s. The training
process computes on ``--threads`` threads (default 1: on a small machine the other cores are the workers'; two
compute threads on our 2-core CI machine made the timings swing 3x between epochs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.common import SMOKE, machine_line, synchronize
from rim_fast import RIM, Hourglass
from rim_fast.loggers import Logger

#: the RIM of the benchmark: small enough that at 5 ms a sample, reading the data is the bottleneck on one process
SIZE, BATCH, T = 32, 8, 4
MODEL = dict(nf=8, ch_mult=(2, 2), hidden_units=8)


class SlowDataset(torch.utils.data.Dataset):
    """(y, x) pairs of [1, SIZE, SIZE]; each read sleeps ``load_ms`` (the time a file read and decode takes)."""

    def __init__(self, n: int, load_ms: float, size: int = SIZE):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, size, size, generator=g)
        self.y = 0.8 * self.x + 0.05 * torch.randn(n, 1, size, size, generator=g)
        self.load_s = load_ms / 1000

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(self.load_s)
        return self.y[i], self.x[i]


class Throughput(Logger):
    def __init__(self):
        self.steps_per_second = []

    def on_epoch_end(self, state):
        self.steps_per_second.append(state.steps_per_second)


def _rim(device: str, size: int) -> RIM:
    torch.manual_seed(0)
    return RIM((size, size), Hourglass(1, dimensions=2, **MODEL), score_fn=lambda x, y: y - 0.8 * x, T=T,
               device=device)


def _fit_rate(dataset, device: str, size: int, epochs: int, **loader) -> float:
    """Median steps/s of fit over the epochs after the first."""
    meter = Throughput()
    _rim(device, size).fit(dataset, epochs=epochs, batch_size=BATCH, shuffle=True, seed=0, learning_rate=1e-4,
                           loggers=[meter], verbose=-1, loss_curve=False, **loader)
    return statistics.median(meter.steps_per_second[1:] or meter.steps_per_second)


def _loader_rate(dataset, batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True)
    start = time.perf_counter()
    for i, _ in enumerate(loader):
        if i + 1 == batches:
            break
    return batches / (time.perf_counter() - start)


def _step_rate(device: str, size: int, steps: int) -> float:
    rim = _rim(device, size)
    optimizer = torch.optim.Adam(rim.model.parameters(), lr=1e-4)
    y, x = torch.rand(BATCH, 1, size, size, device=device), torch.rand(BATCH, 1, size, size, device=device)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            synchronize(device)
            start = time.perf_counter()
        optimizer.zero_grad()
        rim.loss_fn(y, x).backward()
        optimizer.step()
    synchronize(device)
    return steps / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12, help="batches per epoch")
    parser.add_argument("--load-ms", type=float, default=5.0, help="milliseconds to read one sample")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size, epochs, batches = (16, 2, 3) if SMOKE else (SIZE, args.epochs, args.batches)
    cuda = torch.device(args.device).type == "cuda"
    print(machine_line(), flush=True)
    print(f"dataset: {batches * BATCH} samples of [1, {size}, {size}], {args.load_ms:g} ms to read each; RIM "
          f"Hourglass{MODEL} T={T} on {args.device}, batch {BATCH}, {epochs} epochs (the first left out)")
    if not cuda:
        print("pin_memory: not used (the RIM runs on the CPU; pinned memory only serves copies to a GPU)")
    dataset = SlowDataset(batches * BATCH, args.load_ms, size)
    loader = dict(num_workers=args.workers, persistent_workers=True, pin_memory=cuda)
    rows = {
        "num_workers=0": _fit_rate(dataset, args.device, size, epochs),
        f"num_workers={args.workers}" + (", pin_memory" if cuda else ""): _fit_rate(dataset, args.device, size,
                                                                                  epochs, **loader),
    }
    bounds = {"loader alone (num_workers=0)": _loader_rate(dataset, batches),
              "training step alone (data in memory)": _step_rate(args.device, size, batches)}
    base = rows["num_workers=0"]
    print(f"{'fit with':<34} {'steps/s':>9} {'speedup':>8}")
    for name, rate in rows.items():
        print(f"{name:<34} {rate:9.2f} {rate / base:7.2f}x")
    for name, rate in bounds.items():
        print(f"{name:<34} {rate:9.2f}")
    result = {"machine": machine_line(), "device": args.device, "load_ms": args.load_ms, "batch": BATCH,
              "size": size, "steps_per_second": rows, "bounds": bounds}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
