"""`python -m bench.host`: what one call costs the host for many tiny gradients, fusedclip against
torch: the cost an eager step on a small model pays per gradient, before and while its kernels run.

Each gradient has 256 float32 elements, so the kernels' own work is negligible. On a GPU the
timed region is the call alone (launches are asynchronous; the device is synchronized before each
sample, outside it): host time. On a CPU it also holds the (tiny) kernels. Providers alternate
sample by sample. Every provider's result is checked against the float64 reference first.
Results go to bench/results/host-<device>-<commit>.json.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch

from bench import measure, providers, report

TENSOR_COUNTS = [16, 161, 1000]  # 161: ResNet-50's parameters
ELEMENTS = 256
OPS = ("clip", "unscale_clip", "clip_value")


def _check(case: providers.Case, op: str, name: str, run) -> None:
    case.restore()
    value = run(case)
    expected = providers.expected_norm(case, op)
    if expected is not None and abs(float(value) - expected) > 1e-4 * expected:
        raise AssertionError(f"{name} {op}: {float(value)} against the reference {expected}")


def run(device: str, repeats: int) -> list[dict]:
    table = {name: ops for name, ops in providers.providers(device).items() if name != "torch-loop"}
    rows = []
    for count in TENSOR_COUNTS:
        generator = torch.Generator().manual_seed(count)
        tensors = [torch.randn(ELEMENTS, generator=generator).to(device) for _ in range(count)]
        case = providers.make_case(tensors, with_optimizer=False)

        def restore(case=case):
            case.restore()
            measure.synchronize(device)

        for op in OPS:
            runs = {}
            for name, ops in table.items():
                if op in ops:
                    _check(case, op, name, ops[op])
                    runs[name] = lambda run=ops[op], case=case: run(case)
            samples = measure.time_interleaved(device, runs, restore, repeats)
            medians = {name: statistics.median(times) for name, times in samples.items()}
            rows.append({"tensors": count, "op": op, "median_us": medians})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'tensors':>7} {'op':<13} {'provider':<18} {'us/call':>9} {'us/tensor':>9} {'vs torch':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        baseline = row["median_us"][providers.TORCH_BASELINE]
        for name, us in row["median_us"].items():
            print(
                f"{row['tensors']:>7} {row['op']:<13} {name:<18} {us:>9.1f} "
                f"{us / row['tensors']:>9.3f} {baseline / us:>7.2f}x"
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=report.RESULTS_DIR)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(device, args.repeats)
    result = report.environment(device) | {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "elements_per_tensor": ELEMENTS,
        "calls": rows,
    }
    print_table(rows)
    path = report.write_json(result, args.out, prefix="host-")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
