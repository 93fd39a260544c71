"""`python -m bench` (what `make bench` runs): fusedclip against torch and the copy-bandwidth floor.

Every row is checked against the float64 reference before it is timed, so a fast wrong kernel
cannot look good. Results go to the terminal, to bench/results/<device>-<commit>.json and to a
PNG plot beside it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys

import torch

from bench import measure, providers, report, workloads


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<50}")
    sys.stderr.flush()


def _relative_error(value, expected: float | None) -> float | None:
    if value is None or expected is None:
        return None
    value = float(value)
    if expected == 0:
        return abs(value)
    return abs(value - expected) / abs(expected)


def _clip_value_error(case: providers.Case) -> float:
    """clip_value returns nothing: compare the clamped gradients' norm with the reference's."""
    actual = sum(float(g.double().square().sum()) for g in case.grads)
    expected = sum(
        float(s.double().clamp(-case.clip_value, case.clip_value).square().sum())
        for s in case.saved
    )
    return abs(math.sqrt(actual) - math.sqrt(expected)) / math.sqrt(expected)


def run_workload(device, workload, ops, provider_table, repeats, copy_gbps):
    """Rows of one workload: every op, every provider that implements it."""
    needs_optimizer = "clip_step" in ops and all(
        dtype == torch.float32 for _, dtype in workload.shapes
    )
    if device == "cuda" and needs_optimizer:
        free_bytes, _ = torch.cuda.mem_get_info()
        needs_optimizer = free_bytes > 6 * workload.bytes
    case = providers.make_case(workload.make(device), with_optimizer=needs_optimizer)
    graph = device == "cuda" and len(workload.shapes) >= 500  # launch-bound: replay a graph
    rows = []
    for op in ops:
        if op == "clip_step" and case.optimizer is None:
            continue
        runs = {name: table[op] for name, table in provider_table.items() if op in table}
        errors, failed = {}, set()
        for name, run in runs.items():
            try:
                case.restore()
                value = run(case)
                measure.synchronize(device)
                errors[name] = (
                    _clip_value_error(case)
                    if op == "clip_value"
                    else _relative_error(value, providers.expected_norm(case, op))
                )
            except (RuntimeError, NotImplementedError) as error:
                print(
                    f"\n  skipped {name} {op} on {workload.name}: {str(error).splitlines()[0]}",
                    file=sys.stderr,
                )
                failed.add(name)
        runs = {name: run for name, run in runs.items() if name not in failed}
        if device == "cuda":
            samples = {}
            for name, run in runs.items():
                use_graph = (
                    graph and op != "clip_step"
                )  # the optimizer's step is not graph-safe here
                try:
                    samples[name] = measure.time_region(
                        device, lambda run=run: run(case), case.restore, repeats, graph=use_graph
                    )
                except RuntimeError as error:  # e.g. a path that cannot be captured
                    print(
                        f"\n  graph capture failed for {name} {op}: {str(error).splitlines()[0]}",
                        file=sys.stderr,
                    )
                    samples[name] = measure.time_region(
                        device, lambda run=run: run(case), case.restore, repeats
                    )
        else:
            samples = measure.time_interleaved(
                device,
                {n: (lambda run=r: run(case)) for n, r in runs.items()},
                case.restore,
                repeats,
            )
        medians = {name: statistics.median(values) for name, values in samples.items()}
        floor_us = providers.FLOOR_PASSES[op] * workload.bytes / (copy_gbps * 1e3)
        baseline = medians.get(providers.TORCH_BASELINE)
        for name, median_us in medians.items():
            rows.append(
                {
                    "workload": workload.name,
                    "op": op,
                    "provider": name,
                    "bytes": workload.bytes,
                    "tensors": len(workload.shapes),
                    "median_us": median_us,
                    "gbps": providers.FLOOR_PASSES[op] * workload.bytes / (median_us * 1e3),
                    "floor_us": floor_us,
                    "floor_fraction": floor_us / median_us,
                    "speedup_vs_torch": baseline / median_us if baseline else None,
                    "norm_rel_err": errors.get(name),
                    "graph_replay": bool(graph and device == "cuda" and op != "clip_step"),
                    "samples": samples[name],
                }
            )
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="fewer workloads and repeats")
    parser.add_argument(
        "--ops",
        default=",".join(providers.OPS),
        help="comma-separated subset of " + ",".join(providers.OPS),
    )
    parser.add_argument("--workloads", default=None, help="comma-separated workload names")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--out", default=report.RESULTS_DIR, help="folder for the JSON and the plot"
    )
    args = parser.parse_args(argv)

    device = args.device
    ops = [op for op in args.ops.split(",") if op]
    chosen = workloads.for_device(device, quick=args.quick)
    if args.workloads:
        names = set(args.workloads.split(","))
        chosen = [w for w in chosen if w.name in names]
    repeats = args.repeats or (
        (30 if not args.quick else 10) if device == "cuda" else (7 if not args.quick else 3)
    )
    provider_table = providers.providers(device)

    copy_gbps = measure.copy_bandwidth(device, (1 << 30) if device == "cuda" else (256 << 20))
    result = report.environment(device) | {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps,
        "repeats": repeats,
        "floor_passes": providers.FLOOR_PASSES,
        "providers": list(provider_table),
        "rows": [],
    }
    print(
        f"{result['device']}: torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, "
        f"copy bandwidth {copy_gbps:.1f} GB/s (read + write)"
    )
    for index, workload in enumerate(chosen):
        _progress(index, len(chosen), f"{workload.name} ({workload.bytes / 1e6:.0f} MB)")
        result["rows"] += run_workload(device, workload, ops, provider_table, repeats, copy_gbps)
    _progress(len(chosen), len(chosen), "done")
    sys.stderr.write("\n")
    report.print_table(result["rows"])
    path = report.write_json(result, args.out)
    picture = report.plot(result, path.removesuffix(".json") + ".png")
    print(f"wrote {path}" + (f" and {picture}" if picture else ""))


if __name__ == "__main__":
    main()
