"""Results: the terminal table, the JSON file, the plot, and the README's results tables.

`python -m bench.report --readme [FILE ...]` prints the markdown tables of the given results files
(default: the newest file of each device in bench/results/), every number with its spread.
Files written before the harness kept spreads still hold their raw samples; their spreads are
computed from those, and their ratios' intervals from the two medians' intervals (the samples of
those runs were not interleaved round by round, so they cannot be paired).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import subprocess
import sys

import torch

from bench import stats

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_BASELINE = "torch"  # providers.TORCH_BASELINE, without importing fusedclip here
# A fusedclip row whose norm is further than this from the float64 norm is wrong, whatever its
# speed (torch's own norm of bfloat16 gradients is rounded to bfloat16, so it is not held to it).
NORM_CHECK_RTOL = 1e-5


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it; "unknown" without git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPOSITORY,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=REPOSITORY,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment(device: str) -> dict:
    """Device, versions and commit for a results file. FUSEDCLIP_COMMIT, when set, names the
    commit: a copied checkout (such as a lent GPU machine's) may carry a stale .git."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("FUSEDCLIP_COMMIT") or _git_commit()
    return {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": commit,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def write_json(result: dict, out_dir: str = RESULTS_DIR, prefix: str = "") -> str:
    """Writes <out_dir>/<prefix><device>-<commit>.json (whole or not at all: a temporary file
    renamed over it, so an interrupt never leaves half a file); returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    name = f"{prefix}{slug(result['device'])}-{result['commit'].split('+')[0]}.json"
    path = os.path.join(out_dir, name)
    temporary = path + ".partial"
    with open(temporary, "w") as handle:
        json.dump(result, handle, indent=1)
    os.replace(temporary, path)
    return path


def summary(row: dict) -> stats.Summary:
    """A row's median, quartiles and interval: as recorded, or from its raw samples."""
    if "q1_us" in row:
        low, high = row["ci_us"]
        return stats.Summary(
            row["median_us"], row["q1_us"], row["q3_us"], low, high, len(row["samples"])
        )
    return stats.summarize(row["samples"])


def ratio(baseline_row: dict, row: dict) -> stats.Ratio:
    """baseline time / row time with its interval: paired per round when the run recorded it,
    else the conservative interval from the two medians' intervals."""
    recorded = row.get("vs", {}).get(baseline_row["provider"])
    if recorded is not None:
        return stats.Ratio(recorded["median"], recorded["low"], recorded["high"])
    base, mine = summary(baseline_row), summary(row)
    return stats.Ratio(base.median / mine.median, base.low / mine.high, base.high / mine.low)


def _spread(row: dict) -> str:
    """±x%: half the interquartile range over the median."""
    half_iqr = 50 * summary(row).relative_iqr
    return f"±{half_iqr:.1f}%" if half_iqr < 9.95 else f"±{half_iqr:.0f}%"


def print_table(rows: list[dict], file=sys.stdout) -> None:
    header = (
        f"{'workload':<20} {'op':<13} {'provider':<17} {'MB':>7} {'median us':>10} {'±½IQR':>6} "
        f"{'GB/s':>7} {'floor':>6} {'vs torch [95% interval]':>24} {'rel err':>8}"
    )
    print(header, file=file)
    print("-" * len(header), file=file)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["op"]), []).append(row)
    for group in groups.values():
        baseline = next((r for r in group if r["provider"] == TORCH_BASELINE), None)
        for row in group:
            versus = (
                ratio(baseline, row).text() if baseline is not None and row is not baseline else "-"
            )
            error = f"{row['norm_rel_err']:.1e}" if row.get("norm_rel_err") is not None else "-"
            flag = " noisy" if summary(row).noisy else ""
            print(
                f"{row['workload']:<20} {row['op']:<13} {row['provider']:<17} {row['bytes'] / 1e6:>7.1f} "
                f"{row['median_us']:>10.1f} {_spread(row):>6} {row['gbps']:>7.1f} "
                f"{row['floor_fraction']:>6.0%} {versus:>24} {error:>8}{flag}",
                file=file,
            )
    print(
        "IQR: half the interquartile range over the median. '~' marks a ratio whose interval "
        "holds 1: no difference is claimed.",
        file=file,
    )


def warnings(result: dict) -> list[str]:
    """What a reader must know before trusting the table."""
    found = []
    noisy = [r for r in result["rows"] if summary(r).noisy]
    if noisy:
        names = ", ".join(f"{r['workload']}/{r['op']}/{r['provider']}" for r in noisy[:8])
        found.append(
            f"{len(noisy)} of {len(result['rows'])} rows have an interquartile range above "
            f"{stats.NOISY_RELATIVE_IQR:.0%} of their median ({names}{', ...' if len(noisy) > 8 else ''}): "
            "the machine was busy; compare intervals, not medians"
        )
    wrong = [
        r
        for r in result["rows"]
        if r["provider"].startswith("fusedclip")
        and r.get("norm_rel_err") is not None
        and r["norm_rel_err"] > NORM_CHECK_RTOL
    ]
    if wrong:
        names = ", ".join(f"{r['workload']}/{r['op']}/{r['provider']}" for r in wrong[:8])
        found.append(
            f"{len(wrong)} fusedclip rows computed a norm more than {NORM_CHECK_RTOL:g} from the "
            f"float64 norm ({names}): their times do not count"
        )
    drift = result.get("bandwidth_drift")
    if drift is not None and drift > stats.BANDWIDTH_DRIFT_LIMIT:
        found.append(
            f"the copy bandwidth changed by {drift:.0%} during the run ({result['copy_gbps']:.1f} -> "
            f"{result['copy_gbps_end']:.1f} GB/s): the machine's speed changed under the measurement"
        )
    if result.get("interrupted"):
        found.append("the run was interrupted: only the rows above were measured")
    if result.get("stopped_at_deadline") is not None:
        found.append(
            f"the run reached its --deadline of {result['stopped_at_deadline']:.0f} s: "
            "only the rows above were measured"
        )
    return found


def _colours(result: dict) -> dict[str, str]:
    """One colour per provider, the same in every panel (a peer's speed-up bar has its colour)."""
    names = list(dict.fromkeys(r["provider"] for r in result["rows"]))
    palette = [
        "tab:blue",
        "tab:orange",
        "tab:red",
        "tab:purple",
        "tab:green",
        "tab:olive",
        "tab:cyan",
    ]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _plot_workload(axes, result: dict, workload: str, colours: dict[str, str]) -> None:
    """Two panels for one workload: speed-up of each fusedclip provider against each peer, per
    op, with its interval (log scale: 2x and 0.5x are as far from 1); and each provider's % of
    the copy floor, per op, with its IQR."""
    import numpy as np

    rows = [r for r in result["rows"] if r["workload"] == workload]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    ours = list(dict.fromkeys(r["provider"] for r in rows if r["provider"].startswith("fusedclip")))
    peers = list(
        dict.fromkeys(r["provider"] for r in rows if not r["provider"].startswith("fusedclip"))
    )
    pairs = [(mine, peer) for mine in ours for peer in peers]
    speed, floor = axes
    width = 0.8 / max(len(pairs), 1)
    hatches = ["", "//", "..", "xx"]
    extent: list[float] = []
    for index, (mine, peer) in enumerate(pairs):
        xs, values, errors = [], [], [[], []]
        for position, op in enumerate(ops):
            by_provider = {r["provider"]: r for r in rows if r["op"] == op}
            if mine in by_provider and peer in by_provider:
                r = ratio(by_provider[peer], by_provider[mine])
                xs.append(position + (index - (len(pairs) - 1) / 2) * width)
                values.append(r.median)
                errors[0].append(r.median - r.low)
                errors[1].append(r.high - r.median)
                extent += [r.low, r.high]
        label = f"{mine.removeprefix('fusedclip-')} vs {peer}" if len(ours) > 1 else f"vs {peer}"
        speed.bar(
            xs,
            values,
            width,
            yerr=np.array(errors).reshape(2, -1),
            capsize=2,
            label=label,
            color=colours[peer],
            hatch=hatches[ours.index(mine) % len(hatches)],
            edgecolor="white",
        )
        for x, value in zip(xs, values, strict=True):
            speed.annotate(f"{value:.2g}", (x, value), ha="center", va="bottom", fontsize=6)
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_yscale("log")
    low = min(min(extent, default=1.0), 1.0) / 1.25  # every interval and the line at 1 in view
    high = max(max(extent, default=1.0), 1.0) * 1.25
    speed.set_ylim(low, high)
    ticks = [0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20, 50, 100]
    speed.set_yticks([t for t in ticks if low <= t <= high], minor=False)
    speed.set_yticks([], minor=True)
    speed.set_yticklabels([f"{t:g}" for t in ticks if low <= t <= high])
    speed.set_xticks(range(len(ops)), ops, fontsize=8)
    speed.set_ylabel("peer time / fusedclip time\n(> 1: fusedclip faster)", fontsize=8)
    speed.set_title(f"{workload}: fusedclip's speed-up against each peer, 95% interval", fontsize=9)
    speed.legend(fontsize=7, ncol=3)
    speed.grid(True, axis="y", which="both", alpha=0.3)

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    for index, provider in enumerate(providers):
        xs, values, errors = [], [], [[], []]
        for position, op in enumerate(ops):
            match = [r for r in rows if r["op"] == op and r["provider"] == provider]
            if match:
                s, floor_us = summary(match[0]), match[0]["floor_us"]
                value = 100 * floor_us / s.median
                xs.append(position + (index - (len(providers) - 1) / 2) * width)
                values.append(value)
                errors[0].append(value - 100 * floor_us / s.q3)
                errors[1].append(100 * floor_us / s.q1 - value)
        floor.bar(
            xs,
            values,
            width,
            yerr=np.array(errors).reshape(2, -1),
            capsize=2,
            label=provider,
            color=colours[provider],
        )
    floor.axhline(100, color="black", linestyle="--", linewidth=0.8)
    floor.set_xticks(range(len(ops)), ops, fontsize=8)
    floor.set_ylabel("% of copy floor\n(higher is faster)", fontsize=8)
    mb = rows[0]["bytes"] / 1e6
    floor.set_title(
        f"{workload} ({mb:.3g} MB, {rows[0]['tensors']} tensors): % of the copy floor, IQR",
        fontsize=9,
    )
    floor.legend(fontsize=7, ncol=3)
    floor.grid(True, axis="y", alpha=0.3)


def plot(result: dict, path: str) -> str | None:
    """One row of two panels per workload (bars, no lines joining unrelated workloads)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    if not names:
        return None
    figure, axes = plt.subplots(len(names), 2, figsize=(13, 3.3 * len(names)), squeeze=False)
    colours = _colours(result)
    for row_axes, name in zip(axes, names, strict=True):
        _plot_workload(row_axes, result, name, colours)
    figure.suptitle(
        f"fusedclip on {result['device']}: torch {result['torch']}, commit {result['commit']}, "
        f"copy bandwidth {result['copy_gbps']:.0f} GB/s",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def newest_results(results_dir: str = RESULTS_DIR, prefix: str = "") -> list[dict]:
    """The newest results file per device type: main results (rows), or with prefix "host-"
    bench.host's (calls), or with "train-" bench.train's (steps)."""
    key_field = {"host-": "calls", "train-": "steps"}.get(prefix, "rows")
    newest: dict[str, tuple[str, dict]] = {}
    # Also one folder down: make gpu-check writes into bench/results/gpu-<device>-<commit>/.
    paths = glob.glob(os.path.join(results_dir, f"{prefix}*.json"))
    paths += glob.glob(os.path.join(results_dir, "*", f"{prefix}*.json"))
    for path in paths:
        with open(path) as handle:
            result = json.load(handle)
        if key_field not in result:
            continue
        key = result.get("device_type", "cpu")
        if key not in newest or result.get("date", "") > newest[key][1].get("date", ""):
            newest[key] = (path, result)
    return [_with_path(result, path) for path, result in newest.values()]


def _with_path(result: dict, path: str) -> dict:
    return result | {"path": os.path.relpath(os.path.abspath(path), REPOSITORY)}


README_OPS = ("unscale_clip", "clip_value", "clip_step", "norm")  # every op is in the JSON


def _us(row: dict) -> str:
    return f"{row['median_us']:.0f} {_spread(row)}"


def readme_table(result: dict, ops=README_OPS) -> str:
    """Markdown: per workload and op, the best fusedclip provider against torch (and against
    torch.compile where the run has it), each time with its IQR, each ratio with its interval."""
    compiled = any(r["provider"] == "torch-compile" for r in result["rows"])
    lines = [
        f"**{result['device']}** — torch {result['torch']}, triton {result['triton']}, CUDA {result['cuda']}, "
        f"commit `{result['commit']}`, copy bandwidth {result['copy_gbps']:.0f} GB/s "
        + (
            f"(end of run: {result['copy_gbps_end']:.0f}) "
            if result.get("copy_gbps_end") is not None
            else ""
        )
        + f"(`{result['path']}`)",
        "",
        "| workload | op | MB | torch µs ±½IQR | fusedclip µs ±½IQR (backend) | vs torch [95%] |"
        + (" vs compiled [95%] |" if compiled else "")
        + " % of floor |",
        "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if compiled else "") + " ---: |",
    ]
    rows = [r for r in result["rows"] if r["op"] in ops]
    keys = sorted(
        dict.fromkeys((r["workload"], r["op"]) for r in rows),
        key=lambda key: (
            list(dict.fromkeys(r["workload"] for r in rows)).index(key[0]),
            ops.index(key[1]),
        ),
    )
    for workload, op in keys:
        group = {r["provider"]: r for r in rows if r["workload"] == workload and r["op"] == op}
        ours = [r for name, r in group.items() if name.startswith("fusedclip")]
        if TORCH_BASELINE not in group or not ours:
            continue
        best = min(ours, key=lambda r: r["median_us"])
        base = group[TORCH_BASELINE]
        floor = 100 * best["floor_us"]
        s = summary(best)
        cells = [
            workload,
            op,
            f"{best['bytes'] / 1e6:.0f}",
            _us(base),
            f"{_us(best)} ({best['provider'].removeprefix('fusedclip-')})",
            _ratio_text(ratio(base, best)),
        ]
        if compiled:
            peer = group.get("torch-compile")
            cells.append(_ratio_text(ratio(peer, best)) if peer else "-")
        cells.append(f"{floor / s.median:.0f}% [{floor / s.q3:.0f}–{floor / s.q1:.0f}] (IQR)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_text(r: stats.Ratio) -> str:
    mark = "≈ " if r.verdict == "same" else ""
    return f"{mark}{r.median:.2f}× [{r.low:.2f}–{r.high:.2f}]"


def host_readme_table(result: dict) -> str:
    """Markdown of a bench.host file: per call and per gradient, against the target rule."""
    lines = [
        f"**{result['device']}** — host cost per call, {result['elements_per_tensor']} float32 "
        f"elements per gradient, commit `{result['commit']}` (`{result['path']}`)",
        "",
        "| gradients | op | torch µs ±½IQR | fusedclip µs ±½IQR | ns per gradient | target µs | vs torch [95%] |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for call in result["calls"]:
        if "summaries" not in call:  # files from before spreads were kept: medians only
            continue
        for name, s in call["summaries"].items():
            if not name.startswith("fusedclip"):
                continue
            base = call["summaries"][TORCH_BASELINE]
            r = call["vs_torch"][name]
            lines.append(
                f"| {call['tensors']} | {call['op']} | {_median_and_spread(base)} | "
                f"{_median_and_spread(s)} | {1e3 * s['median'] / call['tensors']:.0f} | "
                f"{_against_target(s, call)} | "
                f"{_ratio_text(stats.Ratio(r['median'], r['low'], r['high']))} |"
            )
    if result.get("breakdown"):
        lines += ["", host_breakdown_table(result)]
    return "\n".join(lines)


def host_breakdown_table(result: dict) -> str:
    """Markdown of a bench.host file's breakdown of clip_grad_norm_ on the CPU backend."""
    lines = [
        "Where `clip_grad_norm_`'s time goes there (the parts timed interleaved; host = call − "
        "op, paired by round):",
        "",
        "| gradients | call µs ±½IQR | op µs ±½IQR | same bytes in one tensor µs | host µs ±½IQR | host ns per gradient | host against the target µs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for part in result["breakdown"]:
        s = part["summaries"]
        lines.append(
            f"| {part['tensors']} | {_median_and_spread(s['call'])} | "
            f"{_median_and_spread(s['op'])} | {_median_and_spread(s['bytes'])} | "
            f"{_median_and_spread(s['host'])} | "
            f"{1e3 * s['host']['median'] / part['tensors']:.0f} | "
            f"{_against_target(s['host'], part)} |"
        )
    return "\n".join(lines)


def _median_and_spread(s: dict) -> str:
    """A summary's median (a decimal below 100 µs) and ±½IQR in %, as the host tables print them."""
    median = f"{s['median']:.1f}" if s["median"] < 100 else f"{s['median']:.0f}"
    return f"{median} ±{50 * (s['q3'] - s['q1']) / s['median']:.0f}%"


def _against_target(s: dict, row: dict) -> str:
    return f"{row['target_us']:.0f} {'✓' if s['median'] <= row['target_us'] else '✗'}"


def train_readme_table(result: dict) -> str:
    """Markdown of a bench.train file: step time, the share after backward, the speed-up."""
    lines = [
        f"**{result['device']}** — whole training steps, commit `{result['commit']}` (`{result['path']}`)",
        "",
        "| model | dtype | mode | variant | step ms ±½IQR | after backward ms | share | vs torch [95%] | loss diff |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["steps"]:
        step, after = row["step_ms"], row["after_backward_ms"]
        versus = row["vs_torch"]
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['mode']} | {row['variant']} | "
            f"{step['median']:.1f} ±{50 * (step['q3'] - step['q1']) / step['median']:.0f}% | "
            f"{after['median']:.1f} ±{50 * (after['q3'] - after['q1']) / after['median']:.0f}% | "
            f"{row['clip_share']:.0%} | "
            + (
                _ratio_text(stats.Ratio(versus["median"], versus["low"], versus["high"]))
                if row["variant"] != "torch"
                else "-"
            )
            + f" | {row['loss_max_rel_diff']:.0e} |"
        )
    return "\n".join(lines)


def readme_tables(results: list[dict]) -> str:
    parts = []
    for result in results:
        if "calls" in result:
            parts.append(host_readme_table(result))
        elif "steps" in result:
            parts.append(train_readme_table(result))
        else:
            parts.append(readme_table(result))
    return "\n\n".join(parts)


README_BEGIN = "<!-- tables: python -m bench.report --update-readme -->"
README_END = "<!-- end of tables -->"


def update_readme(tables: str, path: str = os.path.join(REPOSITORY, "README.md")) -> None:
    """Replaces the generated block of the README's Results section with `tables`."""
    with open(path) as handle:
        text = handle.read()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path} has no {README_BEGIN} ... {README_END} block")
    text = text[: begin + len(README_BEGIN)] + "\n\n" + tables + "\n\n" + text[end:]
    with open(path, "w") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--readme", action="store_true", help="print the README results tables")
    parser.add_argument(
        "--update-readme", action="store_true", help="write them into README.md's Results section"
    )
    parser.add_argument(
        "files", nargs="*", help="results files (default: the newest of each kind and device)"
    )
    args = parser.parse_args(argv)
    if not (args.readme or args.update_readme):
        parser.error("nothing to do: pass --readme or --update-readme")
    if args.files:
        results = []
        for path in args.files:
            with open(path) as handle:
                results.append(_with_path(json.load(handle), path))
    else:
        results = (
            newest_results() + newest_results(prefix="host-") + newest_results(prefix="train-")
        )
    tables = readme_tables(results)
    if args.update_readme:
        update_readme(tables)
    else:
        print(tables)


if __name__ == "__main__":
    main()
