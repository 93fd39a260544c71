"""`make gpu-check` (`python -m bench.gpu_check`): everything a short GPU loan must show, in one
command of at most 9 minutes, with a one-screen summary at the end.

Steps, each with its own time limit inside one overall deadline (every later step keeps at
least 30 s), each logged to <dir>/logs/<step>.log:
  build      the extension for sm_90 only, with every core (FUSEDCLIP_REQUIRE_CUDA=1)
  pytest     `pytest -k cuda`, fail-fast: every test marked cuda (what `-m cuda` selects) and
             every test whose id names cuda (the CUDA variants of the rest of the suite), the
             GPU's own test files first and test_compile.py last, on pytest-xdist's workers
  bench      python -m bench, the short GPU profile (at most 3 minutes)
  host       python -m bench.host --device cuda
  memcheck   compute-sanitizer --tool memcheck on tests/standalone_cuda_check.py (about 90 s)
  racecheck  compute-sanitizer --tool racecheck on its single-launch (clip) section, without the
             3000-chunk set that crashed the sanitizer on the H100 (about 60 s)
The sanitizers come last: their run time on a new machine is the least certain, and a timed-out
sanitizer still leaves in its log every error it found.
<dir> is $FUSEDCLIP_GPU_CHECK_DIR, default bench/results/gpu-<device>-<commit>/ (a dry run's:
beside `python -m bench`'s results, outside the source tree). Set
FUSEDCLIP_COMMIT to the commit being checked when the checkout's .git does not travel with it.
On a lent machine that returns only a few files, pack the folder afterwards, e.g.
  FUSEDCLIP_COMMIT=abc1234 FUSEDCLIP_GPU_CHECK_DIR=/tmp/gpu-check python3 -m bench.gpu_check;
  tar -C /tmp -czf "$OUT/gpu-check.tgz" gpu-check

`--dry-run` runs the same steps on a CPU-only machine (the CPU backend and the Triton
interpreter, tiny sizes, no sanitizer, the build checked rather than redone), so that the one
GPU run does not fail on a typo; tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 540  # 9 minutes for the whole command
STANDALONE = os.path.join("tests", "standalone_cuda_check.py")
MEMCHECK_SECTIONS = os.environ.get("FUSEDCLIP_MEMCHECK_SECTIONS", "reduce,finalize,scale,clip")
RACECHECK_SECTIONS = os.environ.get("FUSEDCLIP_RACECHECK_SECTIONS", "clip")
# The H200's targets (issue "GPU evidence on the H200"), checked from the bench's results file.
LARGE_BYTES = 1 << 30
LARGE_FLOOR_FRACTION = 0.90
LARGE_SPEEDUP = 1.8
MANY_SMALL_WORKLOAD = "2000x16K"
MANY_SMALL_SPEEDUP = 3.0
PYTEST_FIRST = ("test_cuda.py", "test_triton.py")
PYTEST_LAST = ("test_compile.py",)


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    status: str = "not run"  # ok, failed (rc N), timed out, skipped (...)
    seconds: float = 0.0
    detail: str = ""


def _python() -> str:
    return sys.executable


def _standalone_flags(*flags: str) -> list[str]:
    """Those of `flags` the standalone check still has (its timing section, --no-bench, is
    leaving it for bench/)."""
    with open(os.path.join(REPOSITORY, STANDALONE)) as handle:
        source = handle.read()
    return [flag for flag in flags if f'"{flag}"' in source]


def _standalone_sections() -> set[str]:
    with open(os.path.join(REPOSITORY, STANDALONE)) as handle:
        source = handle.read()
    body = source[source.find("sections = {") :]
    return set(re.findall(r'^\s+"([a-z_]+)":', body[: body.find("}")], flags=re.MULTILINE))


def steps(dry_run: bool, out_dir: str) -> list[Step]:
    python = _python()
    if dry_run:
        build = Step(
            "build",
            [
                python,
                "-c",
                "import fusedclip, torch; print(fusedclip.backends(), torch.__version__)",
            ],
            60,
        )
        sanitizer_note = "skipped (dry run: no sanitizer on a CPU)"
        bench_args = ["--device", "cpu", "--profile", "tiny", "--no-compile", "--deadline", "90"]
        host_args = [
            "--device",
            "cpu",
            "--counts",
            "16,161",
            "--budget",
            "0.1",
            "--min-samples",
            "3",
        ]
    else:
        cores = str(os.cpu_count() or 1)
        # Every core helps only across files. The kernels are split over five .cu files for
        # that: the largest took 62 s of one core for sm_90 on the 2-core CI machine, where the
        # single file before took 147 s (2026-12-07). A build cut short wastes the whole loan,
        # so the build may still take more than its share and the later steps shrink.
        build = Step(
            "build",
            [python, "setup.py", "-q", "build_ext", "--inplace"],
            300,
            env={
                "MAX_JOBS": cores,
                "TORCH_CUDA_ARCH_LIST": "9.0",
                "FUSEDCLIP_REQUIRE_CUDA": "1",
            },
        )
        sanitizer_note = ""
        bench_args = [
            "--device", "cuda", "--profile", "quick", "--budget", "0.5", "--compile-max-tensors", "8",
            "--deadline", "150",
        ]  # fmt: skip
        host_args = ["--device", "cuda", "--budget", "1.0"]
    pytest_timeout = ["--timeout=60"] if _has_module("pytest_timeout") else []
    pytest = Step(
        "pytest",
        [python, "-m", "pytest", "-x", "-q", "-k", "cuda", "-p", "no:cacheprovider"]
        + pytest_timeout
        + _pytest_workers(dry_run)
        + _pytest_files(),
        150 if not dry_run else 120,
    )
    flags = _standalone_flags("--no-bench", "--no-huge")
    sanitizer = ["compute-sanitizer", "--error-exitcode", "1", "--print-limit", "20"]
    # Without the caching allocator every tensor is its own allocation, so an access past a
    # tensor's end is outside any allocation and memcheck sees it.
    exact_allocations = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    memcheck = Step(
        "memcheck",
        sanitizer
        + ["--tool", "memcheck", python, STANDALONE, "--sections", MEMCHECK_SECTIONS]
        + flags,
        100,
        env=exact_allocations,
    )
    racecheck = Step(
        "racecheck",
        sanitizer
        + ["--tool", "racecheck", "--racecheck-report", "hazard", python, STANDALONE]
        + ["--sections", RACECHECK_SECTIONS]
        + _standalone_flags("--no-bench", "--no-huge", "--no-wide"),
        70,
        env=exact_allocations,
    )
    if dry_run:
        for step in (memcheck, racecheck):
            step.status = sanitizer_note
    bench = Step(
        "bench",
        [python, "-m", "bench", "--out", out_dir, "--no-progress"] + bench_args,
        180 if not dry_run else 120,
    )
    host = Step("host", [python, "-m", "bench.host", "--out", out_dir] + host_args, 90)
    return [build, pytest, bench, host, memcheck, racecheck]


def _pytest_files() -> list[str]:
    """The test files, the GPU's own first and compiled graphs (the slowest tests) last: on a GPU
    `-k cuda` selects over a thousand tests, and a step its limit cuts short has still run those
    that only a GPU can (device guard, graph capture, table lifetimes, the launch fallback)."""
    names = sorted(
        name
        for name in os.listdir(os.path.join(REPOSITORY, "tests"))
        if name.startswith("test_") and name.endswith(".py")
    )
    first = [name for name in PYTEST_FIRST if name in names]
    last = [name for name in PYTEST_LAST if name in names]
    middle = [name for name in names if name not in first + last]
    return [os.path.join("tests", name) for name in first + middle + last]


def _pytest_workers(dry_run: bool) -> list[str]:
    """pytest-xdist's workers where it is installed (the GPU machine's image has it): half the
    cores, at most 8, each with its own CUDA context; the dry run takes two, to try the flag."""
    if not _has_module("xdist"):
        return []
    workers = 2 if dry_run else max(1, min(8, (os.cpu_count() or 1) // 2))
    return ["-n", str(workers)] if workers > 1 else []


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_step(step: Step, log_path: str, limit_s: float) -> None:
    """Runs `step` in its own process group (a sanitizer's child dies with it on a timeout)."""
    env = os.environ | step.env | {"PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(step.command)}\n# limit {limit_s:.0f} s, env {step.env}\n")
        log.flush()
        try:
            process = subprocess.Popen(
                step.command,
                cwd=REPOSITORY,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as error:
            step.status, step.detail = "failed (not found)", str(error)
            return
        try:
            returncode = process.wait(timeout=limit_s)
            step.status = "ok" if returncode == 0 else f"failed (rc {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            step.status = f"timed out ({limit_s:.0f} s)"
    step.seconds = time.perf_counter() - started


def _tail(path: str, size: int = 20000) -> str:
    with open(path, errors="replace") as handle:
        text = handle.read()
    return text[-size:]


def describe(step: Step, log_text: str) -> str:
    """One line of what a step's log says: tests passed, sanitizer errors, checks passed."""
    if step.name == "pytest":
        found = [
            line.strip("= ")
            for line in log_text.splitlines()
            if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)
        ]
        return found[-1] if found else ""
    if step.name in ("memcheck", "racecheck"):
        parts = []
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", log_text)
        hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", log_text)
        if errors:
            parts.append(f"{errors[-1]} errors")
        if hazards:
            parts.append(f"{hazards[-1]} hazards")
        if not errors and not hazards:  # stopped before its summary: count what it reported
            reported = len(
                re.findall(r"^========= (?:Invalid|Race|Error|Program hit)", log_text, re.MULTILINE)
            )
            parts.append(f"no sanitizer summary; {reported} reports so far")
        checks = re.findall(r"^(\d+) passed, (\d+) failed", log_text, re.MULTILINE)
        if checks:
            parts.append(f"checks {checks[-1][0]} passed, {checks[-1][1]} failed")
        return ", ".join(parts)
    if step.name == "build":
        lines = [line for line in log_text.splitlines() if line.startswith("fusedclip")]
        return lines[-1] if lines else ""
    return ""


def _newest(out_dir: str, prefix: str, key: str) -> dict | None:
    candidates = []
    for name in os.listdir(out_dir):
        if name.endswith(".json") and name != "summary.json" and name.startswith(prefix):
            with open(os.path.join(out_dir, name)) as handle:
                result = json.load(handle)
            if key in result and (prefix or not name.startswith("host-")):
                candidates.append((os.path.getmtime(os.path.join(out_dir, name)), result))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def targets(out_dir: str) -> list[tuple[str, bool, str]]:
    """(target, met, evidence) from the bench and host results files in `out_dir`."""
    from bench import report

    found = []
    result = _newest(out_dir, "", "rows")
    if result is not None:
        rows = result["rows"]

        def best(workload_filter, op):
            ours = [
                r
                for r in rows
                if workload_filter(r) and r["op"] == op and r["provider"].startswith("fusedclip")
            ]
            return min(ours, key=lambda r: r["median_us"]) if ours else None

        large = sorted({r["workload"] for r in rows if r["bytes"] >= LARGE_BYTES})
        for workload in large:
            row = best(lambda r, w=workload: r["workload"] == w, "unscale_clip")
            base = next(
                (
                    r
                    for r in rows
                    if r["workload"] == workload
                    and r["op"] == "unscale_clip"
                    and r["provider"] == "torch"
                ),
                None,
            )
            if row is None or base is None:
                continue
            r = report.ratio(base, row)
            found.append(
                (
                    f"{workload} unscale+clip >= {LARGE_FLOOR_FRACTION:.0%} of floor, >= {LARGE_SPEEDUP}x torch",
                    row["floor_fraction"] >= LARGE_FLOOR_FRACTION and r.low >= LARGE_SPEEDUP,
                    f"{row['floor_fraction']:.0%} of floor, {r.text()}",
                )
            )
        row = best(lambda r: r["workload"] == MANY_SMALL_WORKLOAD, "unscale_clip")
        base = next(
            (
                r
                for r in rows
                if r["workload"] == MANY_SMALL_WORKLOAD
                and r["op"] == "unscale_clip"
                and r["provider"] == "torch"
            ),
            None,
        )
        if row is not None and base is not None:
            r = report.ratio(base, row)
            found.append(
                (
                    f"{MANY_SMALL_WORKLOAD} unscale+clip >= {MANY_SMALL_SPEEDUP}x torch",
                    r.low >= MANY_SMALL_SPEEDUP,
                    r.text(),
                )
            )
        bad = [
            r
            for r in rows
            if r.get("norm_rel_err") is not None
            and r["provider"].startswith("fusedclip")
            and r["norm_rel_err"] > report.NORM_CHECK_RTOL
        ]
        found.append(
            (
                f"every fusedclip norm within {report.NORM_CHECK_RTOL:g} of float64",
                not bad,
                f"{len(bad)} rows off" if bad else f"{len(rows)} rows",
            )
        )
        for warning in report.warnings(result):
            found.append(("measurement", False, warning[:110]))
    host = _newest(out_dir, "host-", "calls")
    if host is not None:
        calls = [
            (c, name, s)
            for c in host["calls"]
            for name, s in c["summaries"].items()
            if name.startswith("fusedclip")
        ]
        missed = [
            f"{c['op']}@{c['tensors']} {s['median']:.0f}us>{c['target_us']:.0f}"
            for c, name, s in calls
            if s["median"] > c["target_us"]
        ]
        found.append(
            (
                "host time <= 10 us + 100 ns per gradient",
                not missed,
                f"{len(calls) - len(missed)}/{len(calls)} rows; " + ", ".join(missed[:3]),
            )
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps on a CPU, tiny sizes, no sanitizer"
    )
    parser.add_argument(
        "--steps",
        default=None,
        help="comma-separated subset of build,pytest,bench,host,memcheck,racecheck",
    )
    parser.add_argument(
        "--deadline", type=float, default=DEADLINE_S, help="seconds for the whole command"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sys.path.insert(0, REPOSITORY)
    os.chdir(REPOSITORY)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check needs a CUDA GPU; `--dry-run` rehearses it on a CPU", file=sys.stderr)
            return 2
    out_dir = os.environ.get("FUSEDCLIP_GPU_CHECK_DIR") or _default_dir(args.dry_run)
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    plan = steps(args.dry_run, out_dir)
    if args.steps:
        chosen = set(args.steps.split(","))
        unknown = chosen - {s.name for s in plan}
        if unknown:
            parser.error(f"--steps: unknown {sorted(unknown)}")
        for step in plan:
            if step.name not in chosen:
                step.status = "skipped (--steps)"
    sections = _standalone_sections()
    by_name = {step.name: step for step in plan}
    for step, wanted in (
        (by_name["memcheck"], MEMCHECK_SECTIONS),
        (by_name["racecheck"], RACECHECK_SECTIONS),
    ):
        missing = set(wanted.split(",")) - sections
        if missing:  # a renamed section must fail here, not after 90 s of sanitizer start-up
            step.status = f"failed (no section {sorted(missing)} in {STANDALONE})"
    for index, step in enumerate(plan):
        if step.status != "not run":
            continue
        later = sum(min(s.limit_s, 30) for s in plan[index + 1 :] if s.status == "not run")
        left = args.deadline - (time.perf_counter() - started) - later
        if left < 10:
            step.status = "skipped (out of time)"
            continue
        log_path = os.path.join(out_dir, "logs", f"{step.name}.log")
        print(
            f"[{time.perf_counter() - started:5.0f} s] {step.name} (limit {min(step.limit_s, left):.0f} s)",
            flush=True,
        )
        run_step(step, log_path, min(step.limit_s, left))
        if os.path.exists(log_path):
            step.detail = step.detail or describe(step, _tail(log_path))
        if step.name == "build" and not step.status.startswith("ok"):
            for later_step in plan[index + 1 :]:
                if later_step.status == "not run":
                    later_step.status = "skipped (no build)"
            break
    met = targets(out_dir)
    summary = _summary(plan, met, out_dir, time.perf_counter() - started, args.dry_run)
    print(summary)
    with open(os.path.join(out_dir, "summary.txt"), "w") as handle:
        handle.write(summary + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as handle:
        json.dump(
            {
                "dry_run": args.dry_run,
                "steps": [asdict(s) for s in plan],
                "targets": [{"target": t, "met": m, "evidence": e} for t, m, e in met],
            },
            handle,
            indent=1,
        )
    failed = [s for s in plan if not (s.status == "ok" or s.status.startswith("skipped"))]
    return 1 if failed else 0


def _default_dir(dry_run: bool) -> str:
    from bench import report

    env = report.environment("cpu" if dry_run else "cuda")
    name = f"gpu-{report.slug(env['device'])}-{env['commit'].split('+')[0]}"
    if dry_run:  # a rehearsal's files are not results: outside the source tree
        from bench.__main__ import default_out_dir

        return os.path.join(default_out_dir(), name + "-dry-run")
    return os.path.join(report.RESULTS_DIR, name)


def _summary(plan: list[Step], met, out_dir: str, seconds: float, dry_run: bool) -> str:
    lines = [
        f"gpu-check{' (dry run)' if dry_run else ''}: {seconds:.0f} s, results in {out_dir}",
        f"{'step':<10} {'status':<42} {'s':>5}  detail",
    ]
    for step in plan:
        lines.append(f"{step.name:<10} {step.status:<42} {step.seconds:>5.0f}  {step.detail[:70]}")
    if met:
        lines.append("targets:")
        for target, ok, evidence in met:
            lines.append(f"  [{'met' if ok else 'MISS'}] {target}: {evidence}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
