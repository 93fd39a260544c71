"""`python -m bench.host`: what one call costs the host for many tiny gradients, fusedclip against
torch: the cost an eager step on a small model pays per gradient, before and while its kernels
run. The target (issue "Host cost of one call"): at most 10 µs + 100 ns per gradient.

Each gradient has 256 float32 elements, so the kernels' own work is negligible. Ops:
clip_grad_norm_ (clip), clip_grad_value_ (clip_value), fused_clip_ with inv_scale against torch's
unscale + clip_grad_norm_ (unscale_clip), and amp.unscale_clip_ against `scaler.unscale_` +
clip_grad_norm_ (amp_unscale_clip). On a GPU the timed region is the call alone, on the wall clock
(launches are asynchronous; the device is synchronized before each sample, outside it): host
time. On a CPU it also holds the (tiny) kernels. Providers alternate sample by sample, each row
sampled until its medians are pinned down or its budget is spent. Every provider's result is
checked against the float64 norm first. Results go to --out/host-<device>-<commit>.json.

On a CPU the kernels' work is not negligible from about 1000 gradients on (each call reads and
writes 1 KB per gradient), so the run also splits clip_grad_norm_'s time (`breakdown`): the whole
call, the clip_ op alone on the gradients planned beforehand, and the same op on one tensor
holding the same elements; call − op is the host's own part (planning, gathering .grad, Python).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

import fusedclip
import fusedclip.ops
import fusedclip.plan
from bench import measure, providers, report, stats

TENSOR_COUNTS = [16, 161, 1000, 4000, 10000]  # 161: ResNet-50's parameters
ELEMENTS = 256
OPS = ("clip", "clip_value", "unscale_clip", "amp_unscale_clip")
TARGET_BASE_US = 10.0
TARGET_PER_GRADIENT_US = 0.1


def target_us(count: int) -> float:
    return TARGET_BASE_US + TARGET_PER_GRADIENT_US * count


def _check_value(name: str, value, expected: float | None) -> None:
    if expected is not None and abs(float(value) - expected) > 1e-4 * expected:
        raise AssertionError(f"{name}: {float(value)} against the reference {expected}")


def _check(case: providers.Case, op: str, name: str, run) -> None:
    case.restore()
    _check_value(f"{name} {op}", run(case), providers.expected_norm(case, op))


def run(device: str, budget: measure.Budget, counts: list[int], ops: tuple[str, ...]) -> list[dict]:
    table = {
        name: ops_of
        for name, ops_of in providers.providers(device).items()
        if name == providers.TORCH_BASELINE or name.startswith("fusedclip")
    }
    rows = []
    for count in counts:
        case = providers.make_case(
            _gradients(count, device), with_optimizer="amp_unscale_clip" in ops
        )
        for op in ops:
            runs = {}
            for name, ops_of in table.items():
                if op in ops_of:
                    _check(case, op, name, ops_of[op])
                    runs[name] = lambda run=ops_of[op], case=case: run(case)
            timing = measure.time_interleaved(device, runs, case.restore, budget, host_clock=True)
            summaries = {name: stats.summarize(values) for name, values in timing.samples.items()}
            base = timing.samples[providers.TORCH_BASELINE]
            rows.append(
                {
                    "tensors": count,
                    "op": op,
                    "target_us": target_us(count),
                    "median_us": {name: s.median for name, s in summaries.items()},
                    "summaries": {name: s.as_dict() for name, s in summaries.items()},
                    "vs_torch": {
                        name: stats.ratio(base, values).as_dict()
                        for name, values in timing.samples.items()
                        if name != providers.TORCH_BASELINE
                    },
                    "stopped_by": timing.stopped_by,
                    "samples": timing.samples,
                }
            )
            print_rows(rows[-1:], header=len(rows) == 1)
    return rows


BREAKDOWN_PARTS = ("call", "op", "bytes")


def breakdown(count: int, budget: measure.Budget) -> dict:
    """Where clip_grad_norm_'s time goes on the CPU backend, the parts timed interleaved after
    the same restore: `call` the whole call; `op` the clip_ op alone on the gradients planned
    beforehand (its kernels and per-tensor work); `bytes` the op on one tensor holding the same
    elements (the memory traffic alone). `host`, call − op paired by round, is what the call
    adds to the op: planning, gathering .grad, Python."""
    case = providers.make_case(_gradients(count, "cpu"), with_optimizer=False)
    planned, _ = fusedclip.plan.prepare(
        case.holders, "parameters", "cpu", None, writes=True, of_parameters=True
    )
    gradients = planned.groups[0].dense
    flat_saved = torch.cat([t.reshape(-1) for t in case.saved])
    flat = flat_saved.clone()

    def clip_op(tensors) -> torch.Tensor:
        return fusedclip.ops.clip_(tensors, 2.0, case.max_norm, None, None, torch.float32, False)[0]

    def restore() -> None:
        case.restore()
        flat.copy_(flat_saved)

    runs = {
        "call": lambda: fusedclip.clip_grad_norm_(case.holders, case.max_norm, backend="cpu"),
        "op": lambda: clip_op(gradients),
        "bytes": lambda: clip_op([flat]),
    }
    for name, run_part in runs.items():
        restore()
        _check_value(f"breakdown {name}", run_part(), case.norm)
    timing = measure.time_interleaved("cpu", runs, restore, budget, host_clock=True)
    samples = dict(timing.samples)
    samples["host"] = [c - o for c, o in zip(samples["call"], samples["op"], strict=True)]
    summaries = {name: stats.summarize(values) for name, values in samples.items()}
    return {
        "tensors": count,
        "op": "clip",
        "target_us": target_us(count),
        "median_us": {name: s.median for name, s in summaries.items()},
        "summaries": {name: s.as_dict() for name, s in summaries.items()},
        "stopped_by": timing.stopped_by,
        "samples": samples,
    }


def _gradients(count: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randn(ELEMENTS, generator=generator).to(device) for _ in range(count)]


def print_breakdown(part: dict, file=sys.stdout) -> None:
    m = part["median_us"]
    print(
        f"{part['tensors']:>7} clip_grad_norm_ on the cpu backend: call {m['call']:.1f} us = "
        f"op {m['op']:.1f} (the same bytes in one tensor {m['bytes']:.1f}) + host "
        f"{m['host']:.1f} ({1e3 * m['host'] / part['tensors']:.0f} ns per gradient)",
        file=file,
    )
    file.flush()


def print_rows(rows: list[dict], header: bool = True, file=sys.stdout) -> None:
    if header:
        line = (
            f"{'tensors':>7} {'op':<17} {'provider':<15} {'us/call':>9} {'IQR':>5} "
            f"{'ns/grad':>8} {'target us':>10} {'vs torch [95%]':>22}"
        )
        print(line, file=file)
        print("-" * len(line), file=file)
    for row in rows:
        for name, s in row["summaries"].items():
            spread = 50 * (s["q3"] - s["q1"]) / s["median"]
            versus = row["vs_torch"].get(name)
            versus_text = (
                stats.Ratio(versus["median"], versus["low"], versus["high"]).text()
                if versus
                else "-"
            )
            meets = ("ok" if s["median"] <= row["target_us"] else "MISS") if name != "torch" else ""
            print(
                f"{row['tensors']:>7} {row['op']:<17} {name:<15} {s['median']:>9.1f} "
                f"{spread:>4.0f}% {1e3 * s['median'] / row['tensors']:>8.0f} "
                f"{row['target_us']:>6.0f} {meets:<4}{versus_text:>22}",
                file=file,
            )
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--counts", default=",".join(map(str, TENSOR_COUNTS)))
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of sampling per row")
    parser.add_argument("--min-samples", type=int, default=9)
    parser.add_argument(
        "--repeats", type=int, default=200, help="at most this many samples per row"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="default: as python -m bench")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = tuple(op for op in args.ops.split(",") if op)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; choose from {','.join(OPS)}")
    budget = measure.Budget(args.budget, args.min_samples, max(args.repeats, args.min_samples))
    counts = [int(c) for c in args.counts.split(",")]
    rows = run(device, budget, counts, ops)
    parts = []
    cpu_backend = fusedclip.dispatch.unavailable_reason("cpu", device) is None
    if device == "cpu" and "clip" in ops and cpu_backend:
        for count in counts:
            parts.append(breakdown(count, budget))
            print_breakdown(parts[-1])
    result = report.environment(device) | {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget": vars(budget),
        "elements_per_tensor": ELEMENTS,
        "target": f"{TARGET_BASE_US:g} us + {1e3 * TARGET_PER_GRADIENT_US:g} ns per gradient",
        "calls": rows,
        "breakdown": parts,
    }
    from bench.__main__ import default_out_dir

    path = report.write_json(result, args.out or default_out_dir(), prefix="host-")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
