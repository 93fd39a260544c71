"""Timing: providers interleaved round by round, sampled adaptively until every median is pinned
down or the row's time budget is spent; and the device's copy bandwidth, measured with a kept
library (torch.utils.benchmark on a CPU, triton.testing.do_bench on a GPU).

The ops under test change the gradients in place (a clip that really clips halves them), so each
sample must start from restored gradients, and the restore must stay outside the timed region.
torch.utils.benchmark and triton.testing.do_bench time back-to-back calls with no hook between
them, so the samples are taken by our own loop: wall clock around one call on a CPU, a pair of
CUDA events around one call (or one CUDA-graph replay) on a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench import stats


@dataclass(frozen=True)
class Budget:
    """How long to sample one row: at least `min_samples` rounds, at most `max_samples`; stop
    early once every provider's median is known to `target` (relative half-width of its interval)
    and at the latest when `seconds` of wall time were spent on the row."""

    seconds: float
    min_samples: int
    max_samples: int
    target: float = 0.02


@dataclass
class Timing:
    samples: dict[str, list[float]]  # µs, one per round, in round order for every provider
    stopped_by: str  # "converged", "budget" or "max_samples"
    graph_replay: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a large copy on `device`, counting bytes read plus bytes written (median)."""
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    if device == "cuda":
        try:
            from triton.testing import do_bench

            milliseconds = do_bench(lambda: target.copy_(source), return_mode="median")
        except ImportError:
            milliseconds = _event_median_ms(lambda: target.copy_(source))
        seconds = milliseconds * 1e-3
    else:
        from torch.utils import benchmark

        timer = benchmark.Timer(
            stmt="target.copy_(source)", globals={"target": target, "source": source}
        )
        seconds = timer.adaptive_autorange(
            threshold=0.05, min_run_time=0.2, max_run_time=2.0
        ).median
    return 2 * nbytes / seconds / 1e9


def _event_median_ms(run: Callable[[], object], repeats: int = 20) -> float:
    run()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def _capture(run: Callable[[], object], restore: Callable[[], None]) -> Callable[[], None]:
    """A CUDA graph of `run` (warmed up on a side stream first, as torch.cuda.graph asks)."""
    restore()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def _converged(samples: dict[str, list[float]], target: float) -> bool:
    return all(stats.summarize(values).relative_half_width <= target for values in samples.values())


def time_interleaved(
    device: str,
    runs: dict[str, Callable[[], object]],
    restore: Callable[[], None],
    budget: Budget,
    graph: set[str] | frozenset[str] = frozenset(),
    on_round: Callable[[int], None] | None = None,
    host_clock: bool = False,
) -> Timing:
    """µs of each run, each sample after `restore` (outside the timed region), providers taking
    turns within every round so that a change of machine speed hits them all alike. Providers
    named in `graph` are captured in a CUDA graph and replayed (those that cannot be captured run
    eagerly, and the Timing says so). `host_clock` times the call's wall clock on a GPU too: the
    host's cost of the call (the device is synchronized before each sample, outside it)."""
    started = time.perf_counter()
    calls: dict[str, Callable[[], object]] = {}
    replayed: dict[str, bool] = {}
    for name, run in runs.items():
        for _ in range(2):  # warm-up: compilation, metadata caches, the allocator
            restore()
            run()
        synchronize(device)
        calls[name], replayed[name] = run, False
        if device == "cuda" and name in graph:
            try:
                calls[name], replayed[name] = _capture(run, restore), True
            except RuntimeError:  # a path that cannot be captured is timed eagerly
                torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with _collector_off():
        stopped_by = _sample(device, calls, restore, budget, on_round, host_clock, samples)
    return Timing(samples, stopped_by, replayed, time.perf_counter() - started)


@contextlib.contextmanager
def _collector_off():
    """As timeit does: the garbage collector off while sampling. A collection that lands in one
    provider's call would charge it for objects every provider made (thousands of gradients)."""
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _sample(device, calls, restore, budget, on_round, host_clock, samples) -> str:
    """Appends one sample per provider per round to `samples`; returns why it stopped."""
    round_start = time.perf_counter()
    for index in range(budget.max_samples):
        if device == "cuda" and not host_clock:
            events = {}
            for name, call in calls.items():
                restore()
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                call()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize()
            for name, (start, end) in events.items():
                samples[name].append(start.elapsed_time(end) * 1e3)
        else:
            for name, call in calls.items():
                restore()
                synchronize(device)
                start_s = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start_s) * 1e6)
        if on_round is not None:
            on_round(index + 1)
        if index + 1 >= budget.min_samples:
            if _converged(samples, budget.target):
                return "converged"
            if time.perf_counter() - round_start > budget.seconds:
                return "budget"
    return "max_samples"
