"""`python -m bench` (what `make bench` runs): fusedclip against torch, torch.compile of torch's
path, apex when installed, and the copy-bandwidth floor.

Every row is checked against the float64 norm before it is timed, so a fast wrong kernel cannot
look good. Providers take turns round by round; each row is sampled until every median is known
to --target or the row's --budget is spent. The table gives each median with its interquartile
range and each ratio with its 95% interval; a ratio whose interval holds 1 is a tie, not a
speed-up. Noisy rows and a copy bandwidth that changed during the run are flagged.

Results are written after every row (Ctrl-C keeps what was measured) to
--out/<device>-<commit>.json, with a PNG plot beside it. The default --out is outside the source
tree; pass `--out bench/results` to write files meant to be committed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from bench import measure, models, providers, report, stats, workloads

# Row budgets (seconds of sampling per row) and sample counts per profile and device: `make bench`
# on a quiet 2-core CPU stays under 6 minutes, the GPU's short profile under 3.
BUDGETS = {
    ("cpu", "full"): measure.Budget(seconds=2.5, min_samples=5, max_samples=60),
    ("cpu", "quick"): measure.Budget(seconds=1.5, min_samples=5, max_samples=30),
    ("cpu", "tiny"): measure.Budget(seconds=0.2, min_samples=3, max_samples=5),
    ("cuda", "full"): measure.Budget(seconds=2.0, min_samples=15, max_samples=400),
    ("cuda", "quick"): measure.Budget(seconds=1.0, min_samples=15, max_samples=200),
    ("cuda", "tiny"): measure.Budget(seconds=0.2, min_samples=3, max_samples=10),
}
# torch.compile of a gradient set with more tensors than this is left out by default: inductor
# takes about 0.3 s per tensor on a 2-core CPU, minutes for thousands of tensors; on a GPU each
# compile of a model-sized set costs tens of seconds of a run that must fit a short GPU loan.
COMPILE_MAX_TENSORS = {"cpu": 64, "cuda": 16}
GRAPH_MIN_TENSORS = 500  # on a GPU, sets this large are launch-bound: time CUDA-graph replays
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30, "tiny": 8 << 20}


def default_out_dir() -> str:
    """Outside the source tree: $FUSEDCLIP_BENCH_OUT, else the user's cache folder."""
    if os.environ.get("FUSEDCLIP_BENCH_OUT"):
        return os.environ["FUSEDCLIP_BENCH_OUT"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fusedclip", "bench")


def _relative_error(value, expected: float | None) -> float | None:
    if value is None or expected is None:
        return None
    value = float(value)
    if expected == 0:
        return abs(value)
    return abs(value - expected) / abs(expected)


def _clip_value_error(case: providers.Case) -> float:
    """clip_value returns nothing: compare the clamped gradients' norm with the float64 one."""
    clamped = [s.double().clamp(-case.clip_value, case.clip_value) for s in case.saved]
    expected = providers.reference_norm(clamped)
    return abs(providers.reference_norm(case.grads) - expected) / expected


def _rows_of_op(workload, op, errors, timing, copy_gbps, extra):
    summaries = {name: stats.summarize(values) for name, values in timing.samples.items()}
    floor_us = providers.FLOOR_PASSES[op] * workload.bytes / (copy_gbps * 1e3)
    rows = []
    for name, summary in summaries.items():
        versus = {
            other: stats.ratio(timing.samples[other], timing.samples[name]).as_dict()
            for other in summaries
            if other != name
        }
        rows.append(
            {
                "workload": workload.name,
                "op": op,
                "provider": name,
                "bytes": workload.bytes,
                "tensors": len(workload.shapes),
                "median_us": summary.median,
                "q1_us": summary.q1,
                "q3_us": summary.q3,
                "ci_us": [summary.low, summary.high],
                "relative_iqr": summary.relative_iqr,
                "noisy": summary.noisy,
                "gbps": providers.FLOOR_PASSES[op] * workload.bytes / (summary.median * 1e3),
                "floor_us": floor_us,
                "floor_fraction": floor_us / summary.median,
                "vs": versus,
                "speedup_vs_torch": versus.get(providers.TORCH_BASELINE, {}).get("median"),
                "norm_rel_err": errors.get(name),
                "graph_replay": timing.graph_replay.get(name, False),
                "stopped_by": timing.stopped_by,
                "samples": timing.samples[name],
            }
            | extra.get(name, {})
        )
    return rows


def run_workload(device, workload, ops, provider_table, budget, progress, compile_peer: bool):
    """Yields the rows of each op of one workload: every provider that implements the op."""
    needs_optimizer = any(op in ops for op in providers.OPTIMIZER_OPS) and all(
        dtype == torch.float32 for _, dtype in workload.shapes
    )
    if device == "cuda" and needs_optimizer:
        free_bytes, _ = torch.cuda.mem_get_info()
        needs_optimizer = free_bytes > 6 * workload.bytes
    case = providers.make_case(workload.make(device), with_optimizer=needs_optimizer)
    table = dict(provider_table)
    if compile_peer:
        torch._dynamo.reset()  # a fresh cache per gradient set: no recompile limit, no old guards
        table[providers.TORCH_COMPILE] = providers.torch_compile_provider()
    graph = device == "cuda" and len(workload.shapes) >= GRAPH_MIN_TENSORS
    for op in ops:
        if op in providers.OPTIMIZER_OPS and case.optimizer is None:
            progress.update(1)
            continue
        progress.set_description(f"{workload.name} {op}")
        runs = {name: ops_of[op] for name, ops_of in table.items() if op in ops_of}
        errors, failed, extra = {}, set(), {}
        for name, run in runs.items():
            try:
                case.restore()
                started = time.perf_counter()
                value = run(case)
                measure.synchronize(device)
                if name == providers.TORCH_COMPILE:
                    extra[name] = {"compile_s": time.perf_counter() - started}
                errors[name] = (
                    _clip_value_error(case)
                    if op == "clip_value"
                    else _relative_error(value, providers.expected_norm(case, op))
                )
            except (RuntimeError, NotImplementedError) as error:
                progress.write(
                    f"  skipped {name} {op} on {workload.name}: {str(error).splitlines()[0]}"
                )
                failed.add(name)
        runs = {name: run for name, run in runs.items() if name not in failed}
        # The optimizer's step and the scaler's bookkeeping are not graph-safe here.
        graphed = set(runs) if graph and op not in providers.OPTIMIZER_OPS else set()
        timing = measure.time_interleaved(
            device,
            {name: (lambda run=run, case=case: run(case)) for name, run in runs.items()},
            case.restore,
            budget,
            graph=graphed,
            on_round=lambda count: progress.set_postfix_str(f"{count} rounds", refresh=False),
        )
        progress.update(1)
        yield _rows_of_op(workload, op, errors, timing, progress.copy_gbps, extra)
    case = None  # the gradients and their copy go before the next set is made
    if device == "cuda":
        torch.cuda.empty_cache()


class _Progress:
    """tqdm when it is installed, else one line per row; carries the run's copy bandwidth."""

    def __init__(self, total: int, copy_gbps: float, enabled: bool):
        self.copy_gbps = copy_gbps
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", disable=not enabled, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self._enabled = enabled

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        elif self._enabled:
            print(f"timing {text}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=refresh)

    def update(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--profile", choices=workloads.PROFILES, default="full")
    parser.add_argument("--quick", action="store_true", help="the same as --profile quick")
    parser.add_argument(
        "--ops",
        default=",".join(providers.MAIN_OPS),
        help="comma-separated subset of " + ",".join(providers.OPS),
    )
    parser.add_argument("--workloads", default=None, help="comma-separated workload names")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODULE:FACTORY",
        help="also benchmark the gradient set of FACTORY() (built on the meta device); repeatable",
    )
    parser.add_argument(
        "--hf-config",
        action="append",
        default=[],
        metavar="NAME_OR_JSON",
        help="also benchmark a transformers model: an architecture's default config (gpt2, llama, "
        "bert, ...) or a config.json; built on the meta device, nothing downloaded; repeatable",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(models.DTYPES),
        default=None,
        help="gradient dtype for --model/--hf-config (default: each parameter's own)",
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds of sampling per row")
    parser.add_argument("--min-samples", type=int, default=None)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="stop a row once every median's 95%% interval is within this fraction (default 0.02)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="stop timing after this many seconds and report the rows measured so far "
        "(a run that must fit a short GPU loan)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument(
        "--compile-max-tensors",
        type=int,
        default=None,
        help="compile torch's path only for gradient sets of at most this many tensors "
        f"(default {COMPILE_MAX_TENSORS})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the run (default: torch's; on a machine shared with "
        "other work, 1 avoids threads that wait for a busy core)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the JSON and the plot (default $FUSEDCLIP_BENCH_OUT or "
        "~/.cache/fusedclip/bench; bench/results is where committed results live)",
    )
    return parser


def _chosen_workloads(args, device: str) -> list[workloads.Workload]:
    dtype = models.DTYPES.get(args.dtype) if args.dtype else None
    own = [models.from_factory(spec, dtype) for spec in args.model]
    own += [models.from_hf_config(spec, dtype) for spec in args.hf_config]
    chosen = [] if own and not args.workloads else workloads.for_device(device, args.profile)
    if args.workloads:
        names = set(args.workloads.split(","))
        unknown = names - {w.name for w in chosen}
        if unknown:
            raise SystemExit(
                f"--workloads: unknown {sorted(unknown)}; {args.profile} has "
                + ",".join(w.name for w in chosen)
            )
        chosen = [w for w in chosen if w.name in names]
    return chosen + own


def _budget(args, device: str) -> measure.Budget:
    default = BUDGETS[(device, args.profile)]
    return measure.Budget(
        seconds=default.seconds if args.budget is None else args.budget,
        min_samples=args.min_samples or default.min_samples,
        max_samples=args.max_samples or default.max_samples,
        target=default.target if args.target is None else args.target,
    )


def _finish(result: dict, out_dir: str, plot: bool) -> tuple[str, str | None]:
    path = report.write_json(result, out_dir)
    picture = report.plot(result, path.removesuffix(".json") + ".png") if plot else None
    return path, picture


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.profile = "quick"
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    ops = [op for op in args.ops.split(",") if op]
    unknown_ops = set(ops) - set(providers.OPS)
    if unknown_ops:
        raise SystemExit(
            f"--ops: unknown {sorted(unknown_ops)}; choose from {','.join(providers.OPS)}"
        )
    try:
        chosen = _chosen_workloads(args, device)
    except (ValueError, ImportError) as error:
        raise SystemExit(f"python -m bench: {error}") from error
    budget = _budget(args, device)
    compile_limit = (
        -1 if args.no_compile else (args.compile_max_tensors or COMPILE_MAX_TENSORS[device])
    )
    provider_table = providers.providers(device)
    copy_bytes = COPY_BYTES["tiny" if args.profile == "tiny" else device]
    copy_gbps = measure.copy_bandwidth(device, copy_bytes)
    result = report.environment(device) | {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "profile": args.profile,
        "copy_gbps": copy_gbps,
        "copy_bytes": copy_bytes,
        "budget": vars(budget),
        "confidence": stats.CONFIDENCE,
        "floor_passes": providers.FLOOR_PASSES,
        "providers": list(provider_table)
        + ([providers.TORCH_COMPILE] if compile_limit >= 0 else []),
        "compile_max_tensors": compile_limit,
        "complete": False,
        "rows": [],
    }
    out_dir = args.out or default_out_dir()
    print(
        f"{result['device']}: torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, "
        f"copy bandwidth {copy_gbps:.1f} GB/s (read + write); results to {out_dir}"
    )
    progress = _Progress(len(chosen) * len(ops), copy_gbps, enabled=not args.no_progress)
    status = 0
    started = time.perf_counter()

    def past_deadline() -> bool:
        if args.deadline is None or time.perf_counter() - started <= args.deadline:
            return False
        result["stopped_at_deadline"] = args.deadline
        return True

    try:
        for workload in chosen:
            if past_deadline():
                break
            compile_peer = 0 <= len(workload.shapes) <= compile_limit
            for rows in run_workload(
                device, workload, ops, provider_table, budget, progress, compile_peer
            ):
                result["rows"] += rows
                report.write_json(result, out_dir)  # after every row: Ctrl-C keeps it
                if past_deadline():
                    break
        # The end of the run's copy bandwidth, against its start: did the machine change speed?
        end_gbps = measure.copy_bandwidth(device, copy_bytes)
        result["copy_gbps_end"] = end_gbps
        result["bandwidth_drift"] = stats.bandwidth_drift(copy_gbps, end_gbps)
        result["complete"] = "stopped_at_deadline" not in result
    except KeyboardInterrupt:
        result["interrupted"] = True
        status = 130
    finally:
        progress.close()
    report.print_table(result["rows"])
    for warning in report.warnings(result):
        print(f"WARNING: {warning}")
    path, picture = _finish(result, out_dir, plot=not args.no_plot)
    print(f"wrote {path}" + (f" and {picture}" if picture else ""))
    if status:
        print("interrupted: the rows above are what was measured", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
