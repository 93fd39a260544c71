"""Timing: CUDA events (median of many, optional CUDA-graph replay) on a GPU, interleaved wall
clock on a CPU; and the copy bandwidth of the same device, measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a large device copy, counting bytes read plus bytes written (median of 10)."""
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    samples = time_region(device, lambda: target.copy_(source), lambda: None, repeats=10)
    return 2 * nbytes / (statistics.median(samples) * 1e3)


def time_region(
    device: str,
    run: Callable[[], object],
    restore: Callable[[], None],
    repeats: int,
    graph: bool = False,
) -> list[float]:
    """Microseconds of `run`, each sample after `restore` (outside the timed region)."""
    restore()
    run()  # warm-up: compilation, caches of metadata tables, allocator
    synchronize(device)
    if device != "cuda":
        samples = []
        for _ in range(repeats):
            restore()
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1e6)
        return samples
    replay = run
    if graph:
        restore()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            run()
        replay = cuda_graph.replay
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in events:
        restore()
        start.record()
        replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in events]


def time_interleaved(
    device: str,
    runs: dict[str, Callable[[], object]],
    restore: Callable[[], None],
    repeats: int,
) -> dict[str, list[float]]:
    """On a CPU, alternate the providers sample by sample so that drift hits them all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        restore()
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            restore()
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e6)
    return samples
