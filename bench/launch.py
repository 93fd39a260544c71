"""`python -m bench.launch`: fusedclip::clip_'s single cooperative CUDA launch against its split
path (one launch per pass), for gradient sets from 64 KB to 1 GB, to set and check the threshold
below which launch="auto" takes the single launch.

Each size runs as one tensor and as 256 equal tensors, unscale + clip by norm (the clip always
clips), timed with CUDA events:
- warm: the gradients were just restored, so what fits in L2 is there (as after a backward pass);
- cold: L2 flushed before each sample;
each replayed from a CUDA graph (kernel time and gaps only) and eager (host launch cost too).
The modes take turns sample by sample; each median is kept with its quartiles and interval.
Before timing, the two launches' outputs and gradients must agree bit for bit. Results go to
bench/results/launch-<device>-<commit>.json.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from bench import measure, providers, report, stats
from fusedclip import ops

SIZES_MB = [0.0625, 0.25, 1, 4, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256, 1024]
TENSOR_COUNTS = [1, 256]
MODES = ("single", "split", "auto")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _clip(case: providers.Case, launch: str):
    return ops.clip_(
        case.grads, 2.0, case.unscaled_max_norm, case.inv_scale, None, torch.float32, False, launch
    )


def _check_identical(case: providers.Case) -> None:
    outputs = {}
    for launch in ("single", "split"):
        case.restore()
        outputs[launch] = (
            [t.clone() for t in _clip(case, launch)],
            [g.clone() for g in case.grads],
        )
    (single, single_grads), (split, split_grads) = outputs["single"], outputs["split"]
    for a, b in zip(single + single_grads, split + split_grads, strict=True):
        if not torch.equal(_bits(a), _bits(b)):
            raise AssertionError("single and split launches disagree")


def _time_case(case: providers.Case, flush: torch.Tensor, repeats: int) -> list[dict]:
    torch_unscale_clip = providers.torch_provider(foreach=None)["unscale_clip"]
    runs = {mode: (lambda mode=mode: _clip(case, mode)) for mode in MODES}
    runs["torch"] = lambda: torch_unscale_clip(case)
    rows = []
    for condition in ("warm", "cold"):

        def restore(condition=condition):
            case.restore()
            if condition == "cold":
                flush.zero_()

        for graph in (True, False):
            budget = measure.Budget(float("inf"), min_samples=repeats, max_samples=repeats)
            timing = measure.time_interleaved(
                "cuda", runs, restore, budget, graph=set(runs) if graph else set()
            )
            summaries = {name: stats.summarize(v) for name, v in timing.samples.items()}
            rows.append(
                {
                    "condition": condition,
                    "graph_replay": graph,
                    "median_us": {name: s.median for name, s in summaries.items()},
                    "summaries": {name: s.as_dict() for name, s in summaries.items()},
                }
            )
    return rows


def run(repeats: int, sizes_mb: list[float]) -> list[dict]:
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    flush = torch.empty(l2_bytes, device="cuda")  # 4x L2 bytes of float32
    rows = []
    for size_mb in sizes_mb:
        for count in TENSOR_COUNTS:
            numel = max(1, int(size_mb * (1 << 20)) // 4 // count)
            case = providers.make_case(
                [torch.randn(numel, device="cuda") for _ in range(count)], with_optimizer=False
            )
            _check_identical(case)
            for row in _time_case(case, flush, repeats):
                rows.append(
                    {"bytes": 4 * numel * count, "tensors": count, "l2_bytes": l2_bytes} | row
                )
            del case
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'MB':>8} {'tensors':>7} {'L2':>5} {'graph':>5} {'single us':>10} {'split us':>9} "
        f"{'auto us':>8} {'torch us':>9} {'split/single':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        us = row["median_us"]
        print(
            f"{row['bytes'] / 2**20:>8.2f} {row['tensors']:>7} {row['condition']:>5} "
            f"{'yes' if row['graph_replay'] else 'no':>5} {us['single']:>10.1f} {us['split']:>9.1f} "
            f"{us['auto']:>8.1f} {us['torch']:>9.1f} {us['split'] / us['single']:>11.2f}x"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.launch", description=__doc__)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--sizes-mb", default=",".join(str(s) for s in SIZES_MB))
    parser.add_argument("--out", default=report.RESULTS_DIR)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench.launch compares CUDA launches; it needs a GPU")
    rows = run(args.repeats, [float(s) for s in args.sizes_mb.split(",")])
    result = report.environment("cuda") | {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "sweep": rows,
    }
    print_table(rows)
    path = report.write_json(result, args.out, prefix="launch-")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
