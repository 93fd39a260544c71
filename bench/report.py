"""Results: the terminal table, the JSON file, the plot, and the README's results table.

`python -m bench.report --readme` prints the markdown table of the newest results file of each
device in bench/results/.
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

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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
            cwd=os.path.dirname(RESULTS_DIR),
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(RESULTS_DIR),
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
        "commit": commit,
    }


def print_table(rows: list[dict], file=sys.stdout) -> None:
    header = f"{'workload':<20} {'op':<13} {'provider':<18} {'MB':>8} {'us':>10} {'GB/s':>8} {'floor':>6} {'vs torch':>9} {'rel err':>9}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for row in rows:
        speedup = f"{row['speedup_vs_torch']:.2f}x" if row["speedup_vs_torch"] else "-"
        error = f"{row['norm_rel_err']:.1e}" if row["norm_rel_err"] is not None else "-"
        print(
            f"{row['workload']:<20} {row['op']:<13} {row['provider']:<18} {row['bytes'] / 1e6:>8.1f} "
            f"{row['median_us']:>10.1f} {row['gbps']:>8.1f} {row['floor_fraction']:>6.0%} {speedup:>9} {error:>9}",
            file=file,
        )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def write_json(result: dict, out_dir: str = RESULTS_DIR, prefix: str = "") -> str:
    """Writes bench/results/<prefix><device>-<commit>.json; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    name = f"{prefix}{slug(result['device'])}-{result['commit'].split('+')[0]}.json"
    path = os.path.join(out_dir, name)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    return path


def plot(result: dict, path: str) -> str | None:
    """Time against gradient bytes per provider, one panel per op, the floor drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = [
        op
        for op in ("norm", "clip", "unscale_clip", "clip_step")
        if any(r["op"] == op for r in result["rows"])
    ]
    figure, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4.2), squeeze=False)
    for axis, op in zip(axes[0], ops, strict=True):
        rows = [r for r in result["rows"] if r["op"] == op]
        for provider in dict.fromkeys(r["provider"] for r in rows):
            points = sorted((r["bytes"], r["median_us"]) for r in rows if r["provider"] == provider)
            axis.plot(
                [p[0] / 1e6 for p in points],
                [p[1] for p in points],
                "o-",
                label=provider,
                markersize=4,
            )
        floor = sorted({(r["bytes"], r["floor_us"]) for r in rows})
        axis.plot(
            [f[0] / 1e6 for f in floor], [f[1] for f in floor], "k--", label="copy-bandwidth floor"
        )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("gradient MB")
        axis.set_ylabel("µs (median)")
        axis.set_title(op)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(
        f"fusedclip vs torch on {result['device']} (torch {result['torch']}, commit {result['commit']})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def newest_results(results_dir: str = RESULTS_DIR) -> list[dict]:
    """The newest results file per device type."""
    newest: dict[str, tuple[str, dict]] = {}
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        with open(path) as handle:
            result = json.load(handle)
        if "rows" not in result:
            continue
        key = result.get("device_type", "cpu")
        if key not in newest or result.get("date", "") > newest[key][1].get("date", ""):
            newest[key] = (path, result)
    return [
        result
        | {
            "path": os.path.relpath(
                path, os.path.dirname(os.path.dirname(os.path.abspath(results_dir)))
            )
        }
        for path, result in newest.values()
    ]


README_OPS = ("unscale_clip", "clip_step", "norm")


def readme_table(result: dict, ops=README_OPS) -> str:
    """Markdown: per workload and op, the best fusedclip provider against torch."""
    lines = [
        f"**{result['device']}** — torch {result['torch']}, triton {result['triton']}, CUDA {result['cuda']}, "
        f"commit `{result['commit']}`, copy bandwidth {result['copy_gbps']:.0f} GB/s "
        f"(`{result['path']}`)",
        "",
        "| workload | op | MB | torch µs | fusedclip µs (backend) | vs torch | % of floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = dict.fromkeys((r["workload"], r["op"]) for r in result["rows"] if r["op"] in ops)
    for workload, op in keys:
        rows = [r for r in result["rows"] if r["workload"] == workload and r["op"] == op]
        torch_rows = [r for r in rows if r["provider"] == "torch"]
        ours = [r for r in rows if r["provider"].startswith("fusedclip")]
        if not torch_rows or not ours:
            continue
        best = min(ours, key=lambda r: r["median_us"])
        lines.append(
            f"| {workload} | {op} | {best['bytes'] / 1e6:.0f} | {torch_rows[0]['median_us']:.0f} | "
            f"{best['median_us']:.0f} ({best['provider'].removeprefix('fusedclip-')}) | "
            f"{best['speedup_vs_torch']:.2f}× | {best['floor_fraction']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", action="store_true", help="print the README results tables")
    args = parser.parse_args()
    if args.readme:
        for result in newest_results():
            print(readme_table(result))
            print()


if __name__ == "__main__":
    main()
