"""Standalone GPU check of the hand-written CUDA kernels (csrc/cuda) against fusedclip.reference.

Run from the repository root after an in-place build (no pytest needed):

    python setup.py build_ext --inplace && python tests/standalone_cuda_check.py [--no-huge]
        [--no-wide] [--sections reduce,finalize,scale,clip,graph,cache]

Prints one PASS/FAIL line per check and exits 1 if any check failed. The reference runs on CPU
float64 copies. Timing lives in bench/ (python -m bench, python -m bench.launch).

The 'cache' section makes the device refuse a cooperative launch on purpose (the fallback check):
compute-sanitizer counts that refused API call as an error unless run with
`--report-api-errors no`, so give the sanitizer the other sections, or that flag.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402  (torch first: it loads libc10 that fusedclip._C links against)

# isort: split
import fusedclip._C  # noqa: E402, F401  (registers torch.ops.fusedclip.*)

from fusedclip import reference  # noqa: E402
from tests.exact import bits, same_alignment_copy  # noqa: E402
from tests.tolerances import FINALIZE_RTOL, GRAD_ULPS, RAW_NORM_RTOL, ULP  # noqa: E402

ops = torch.ops.fusedclip
testing = torch.ops.fusedclip_testing  # hooks registered in csrc/cuda/clip_cuda.cu
DEV = torch.device("cuda")
CHUNK = 16384  # kChunkElements of csrc/cuda/multi_tensor.cuh
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# 7 and 10 take the scaled sum for every dtype, the others only with a float64 tensor in the call.
NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf, 7.0]
SIZES = [0, 1, 3, 4095, 65537, 1 << 22]


results: list[tuple[str, bool]] = []


def check(name: str, fn) -> None:
    try:
        message = fn()
        ok = message is None or message is True
        detail = "" if ok else f": {message}"
    except Exception as error:  # noqa: BLE001
        ok = False
        detail = f": {type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"
    results.append((name, ok))
    print(f"{'PASS' if ok else 'FAIL'} {name}{detail}", flush=True)


def make(n: int, dtype: torch.dtype, scale: float = 1.0, misalign: int = 0) -> torch.Tensor:
    buffer = torch.randn(n + misalign, device=DEV, dtype=torch.float32).mul_(scale).to(dtype)
    return buffer[misalign:]


def cpu64(tensors):
    return [t.detach().cpu().to(torch.float64) for t in tensors]


def same_value(got: torch.Tensor, want: torch.Tensor, rtol: float) -> str | None:
    got = got.detach().cpu().to(torch.float64).reshape(-1)
    want = want.detach().cpu().to(torch.float64).reshape(-1)
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    for i, (g, w) in enumerate(zip(got.tolist(), want.tolist(), strict=True)):
        if math.isnan(w) or math.isnan(g):
            if not (math.isnan(w) and math.isnan(g)):
                return f"[{i}] got {g!r} want {w!r}"
        elif math.isinf(w) or math.isinf(g):
            if g != w:
                return f"[{i}] got {g!r} want {w!r}"
        elif abs(g - w) > rtol * abs(w) + 1e-300:
            return f"[{i}] got {g!r} want {w!r} (rel {abs(g - w) / max(abs(w), 1e-300):.2e})"
    return None


def compare_reduce(tensors, norm_type: float, per_tensor: bool = True) -> str | None:
    raw_norm, found_inf, per = ops.reduce(tensors, norm_type, per_tensor)
    torch.cuda.synchronize()
    want_norm, want_inf, want_per = reference.reduce(cpu64(tensors), norm_type, per_tensor)
    if raw_norm.dtype != torch.float64 or raw_norm.shape != ():
        return f"raw_norm {raw_norm.dtype} {tuple(raw_norm.shape)}"
    if found_inf.dtype != torch.float32 or found_inf.shape != ():
        return f"found_inf {found_inf.dtype} {tuple(found_inf.shape)}"
    if per.dtype != torch.float64 or per.shape != ((len(tensors),) if per_tensor else (0,)):
        return f"per_tensor_norms {per.dtype} {tuple(per.shape)}"
    # The oracle sees float64 copies, whose non-finite test matches the input's. It decides the
    # scaled sum by the dtypes it sees, which does not change a norm beyond RAW_NORM_RTOL.
    for label, got, want, rtol in (
        ("raw_norm", raw_norm, want_norm, RAW_NORM_RTOL),
        ("found_inf", found_inf, want_inf, 0.0),
        ("per_tensor_norms", per, want_per, RAW_NORM_RTOL),
    ):
        problem = same_value(got, want, rtol)
        if problem:
            return f"{label} {problem}"
    return None


# ---- reduce --------------------------------------------------------------------------------------


def reduce_checks() -> None:
    for dtype in DTYPES:
        for n in SIZES:
            tensors = [make(n, dtype)]
            for p in NORM_TYPES:
                check(f"reduce {dtype} n={n} p={p}", lambda t=tensors, p=p: compare_reduce(t, p))

    def mixed(p):
        torch.manual_seed(1)
        tensors = []
        for i, n in enumerate([3, 0, 65536, 65537, 4095, 1, 200_000, 0, 131_072, 7]):
            tensors.append(make(n, DTYPES[i % 4], scale=0.5 + i, misalign=i % 3))
        return compare_reduce(tensors, p)

    for p in NORM_TYPES:
        check(f"reduce mixed dtypes + zero-size + misaligned p={p}", lambda p=p: mixed(p))

    for dtype in DTYPES:
        for misalign in (1, 2, 3, 5):
            for n in (5, 17, 65535, 65536 * 2 + 9):
                t = make(n, dtype, misalign=misalign)
                check(
                    f"reduce misaligned view {dtype} offset={misalign} n={n}",
                    lambda t=t: compare_reduce([t], 2.0) or compare_reduce([t], math.inf),
                )

    check(
        "reduce per_tensor=False gives an empty [0]",
        lambda: compare_reduce([make(10, torch.float32)], 2.0, False),
    )
    check(
        "reduce 3000 small tensors",
        lambda: compare_reduce(
            [make(1 + (i * 37) % 3000, DTYPES[i % 2]) for i in range(3000)], 2.0
        ),
    )

    # Non-finite values at the first element, the last, a vector tail, a chunk boundary.
    for dtype in DTYPES:
        for n in (1, 3, 4095, 65537, 131_075):
            positions = sorted({0, n - 1, max(n - 2, 0), min(CHUNK, n - 1)})
            for position in positions:
                for bad in (math.inf, -math.inf, math.nan):
                    for misalign in (0, 1):
                        t = make(n, dtype, misalign=misalign)
                        t[position] = bad

                        def run(t=t, dtype=dtype):
                            for p in (2.0, 1.0, math.inf, 3.0):
                                problem = compare_reduce([make(4, dtype), t], p)
                                if problem:
                                    return f"p={p}: {problem}"
                                if ops.reduce([t], p, False)[1].item() != 1.0:
                                    return f"p={p}: found_inf not set"
                            return None

                        check(
                            f"reduce non-finite {bad} {dtype} n={n} at {position} misalign={misalign}",
                            run,
                        )

    # Norms finite whenever the true norm is: |g|^p of these leaves float64's range (#14 item 4),
    # so they take the scaled sum; an overflowing power is never found_inf.
    extremes = [
        ("p=10 [3e38] float32", [3e38], torch.float32, 10.0),
        ("p=100 [1e4, 1e4] float32", [1e4, 1e4], torch.float32, 100.0),
        ("p=1000 [3.0] float32", [3.0], torch.float32, 1000.0),
        ("p=100 [1e-6] float32", [1e-6], torch.float32, 100.0),
        ("p=2 1000 x 1e200 float64", [1e200] * 1000, torch.float64, 2.0),
        ("p=2 1000 x 1e-200 float64", [1e-200] * 1000, torch.float64, 2.0),
        ("p=12 1000 x 3e38 float32", [3e38] * 1000, torch.float32, 12.0),
        ("p=1.5 [1e300, 1e300] float64", [1e300, 1e300], torch.float64, 1.5),
        ("p=7 [65504] x 70000 float16", [65504.0] * 70000, torch.float16, 7.0),
        ("p=3 [3e38] x 70000 float32 (plain sum)", [3e38] * 70000, torch.float32, 3.0),
    ]
    for label, values, dtype, p in extremes:

        def extreme(values=values, dtype=dtype, p=p):
            t = torch.tensor(values, dtype=dtype, device=DEV)
            raw_norm, found_inf, _ = ops.reduce([t], p, False)
            if not math.isfinite(raw_norm.item()) or found_inf.item() != 0.0:
                return f"raw_norm {raw_norm.item()} found_inf {found_inf.item()}"
            # beside other tensors, misaligned, and per tensor
            neighbour = make(5000, torch.bfloat16)
            return compare_reduce([neighbour, t[1:] if len(values) > 1 else t], p)

        check(f"reduce finite norm for {label}", extreme)

    def extreme_nonfinite():
        for p in (2.0, 10.0, 100.0):
            for bad in (math.inf, math.nan):
                t = torch.tensor([1e200, bad, 1e-200], dtype=torch.float64, device=DEV)
                problem = compare_reduce([make(100, torch.float32), t], p)
                if problem:
                    return f"p={p} {bad}: {problem}"
        return None

    check("reduce scaled sum: inf gives inf, NaN gives NaN, both set found_inf", extreme_nonfinite)

    # NaN must survive the max even when a larger value follows it.
    def nan_max():
        t = torch.tensor([1.0, math.nan, 5.0, 100.0], device=DEV)
        return compare_reduce([t, torch.full((70000,), 1e3, device=DEV)], math.inf)

    check("reduce p=inf keeps NaN", nan_max)

    def determinism():
        torch.manual_seed(3)
        tensors = [
            make(n, DTYPES[i % 4], misalign=i % 2)
            for i, n in enumerate([1 << 22, 65537, 5, 1 << 20, 333_333, 0])
        ]
        for p in NORM_TYPES:
            first = [bits(x) for x in ops.reduce(tensors, p, True)]
            for _ in range(3):
                again = [bits(x) for x in ops.reduce(tensors, p, True)]
                if not all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
                    return f"p={p}: bits differ between runs"
        # a freshly allocated (uncached table) copy at other addresses gives the same bits
        copies = [t.clone() for t in tensors]
        if not torch.equal(
            bits(ops.reduce(copies, 2.0, True)[0]), bits(ops.reduce(tensors, 2.0, True)[0])
        ):
            return "bits differ for a copy at other addresses"
        return None

    check("reduce determinism (same bits, every run)", determinism)

    def cache_invalidation():
        a = make(100_000, torch.float32)
        first = ops.reduce([a], 2.0, False)[0].item()
        a.mul_(2)  # same pointers, new values: the cached table must still read the live data
        second = ops.reduce([a], 2.0, False)[0].item()
        if abs(second - 2 * first) > 1e-9 * second:
            return f"{second} != 2 * {first} (the norm of 2a)"
        b = make(100_001, torch.float32)  # new pointer and size: a new table
        return (
            compare_reduce([b], 2.0) or compare_reduce([a, b], 2.0) or compare_reduce([b, a], 2.0)
        )

    check("reduce table cache follows the tensors", cache_invalidation)


# ---- finalize ------------------------------------------------------------------------------------


def finalize_checks() -> None:
    def run(raw_value, max_norm, inv, out_dtype):
        raw_norm = torch.tensor(raw_value, dtype=torch.float64, device=DEV)
        total_norm, clip_coef = ops.finalize(raw_norm, max_norm, inv, out_dtype)
        want_norm, want_coef = reference.finalize(
            raw_norm.cpu(), max_norm, None if inv is None else inv.cpu(), out_dtype
        )
        for label, got, want, dtype in (
            ("total_norm", total_norm, want_norm, out_dtype),
            ("clip_coef", clip_coef, want_coef, torch.float64),
        ):
            if got.dtype != dtype or got.shape != () or got.device.type != "cuda":
                return f"{label}: {got.dtype} {tuple(got.shape)} {got.device}"
            # the same float64 operations as the oracle (norm.h's finalize_norm)
            problem = same_value(got, want, FINALIZE_RTOL)
            if problem:
                return f"{label} {problem}"
        return None

    inv_scales = [
        None,
        torch.tensor([1 / 65536], dtype=torch.float32, device=DEV),
        torch.tensor(1 / 1024, dtype=torch.float64, device=DEV),
        torch.tensor(-0.5, dtype=torch.float32, device=DEV),
        torch.tensor(1e300, dtype=torch.float64, device=DEV),  # coef outside float32 (#14 item 5)
    ]
    for raw_value in (0.0, 1e-3, 7.5, 1e30, 1e300, math.inf, math.nan):
        for max_norm in (None, 1.0, 1e40, 1e-20):
            for inv in inv_scales:
                for out_dtype in (torch.float32, torch.float64):
                    inv_label = None if inv is None else f"{inv.dtype}:{inv.item():g}"
                    check(
                        f"finalize raw_norm={raw_value} max_norm={max_norm} inv={inv_label} {out_dtype}",
                        lambda a=(raw_value, max_norm, inv, out_dtype): run(*a),
                    )


# ---- scale_ --------------------------------------------------------------------------------------


def compare_scale(tensors, coef: torch.Tensor, clip_value):
    before = cpu64(tensors)
    expected = [t.clone() for t in before]
    reference.scale_(expected, coef.cpu(), clip_value)
    ops.scale_(tensors, coef, clip_value)
    torch.cuda.synchronize()
    for i, (t, want) in enumerate(zip(tensors, expected, strict=True)):
        want = want.to(t.dtype).to(torch.float64)  # the oracle's result rounded to the dtype
        got = t.detach().cpu().to(torch.float64)
        try:
            # within GRAD_ULPS of the oracle's result rounded to the dtype; subnormals absolutely
            torch.testing.assert_close(
                got,
                want,
                rtol=GRAD_ULPS * ULP[t.dtype],
                atol=torch.finfo(t.dtype).tiny,
                equal_nan=True,
            )
        except AssertionError as error:
            return f"tensor {i} ({t.dtype}, n={t.numel()}): {error}"
    return None


def scale_checks() -> None:
    coefs = [
        torch.tensor(0.3, dtype=torch.float32, device=DEV),
        torch.tensor(1 / 3, dtype=torch.float64, device=DEV),
        torch.tensor([1.0], dtype=torch.float32, device=DEV),
    ]
    for dtype in DTYPES:
        for n in SIZES:
            for coef in coefs:
                for clip_value in (None, 0.5, 0.0):
                    for misalign in (0, 1):
                        t = make(n, dtype, scale=2.0, misalign=misalign)
                        check(
                            f"scale_ {dtype} n={n} coef={coef.dtype}:{coef.item():.4g} clip={clip_value} misalign={misalign}",
                            lambda t=t, c=coef, v=clip_value: compare_scale([t], c, v),
                        )

    def neighbours_untouched():
        for dtype in DTYPES:
            buffer = make(70_000, dtype)
            keep = bits(buffer)
            view = buffer[3:-5]
            ops.scale_([view], torch.tensor(0.5, device=DEV), 0.25)
            after = bits(buffer)
            if not (torch.equal(after[:3], keep[:3]) and torch.equal(after[-5:], keep[-5:])):
                return f"{dtype}: elements outside the view were written"
        return None

    check("scale_ writes only inside a misaligned view", neighbours_untouched)

    def nan_through_clamp():
        t = torch.tensor([math.nan, math.inf, -math.inf, 3.0, -3.0, 0.1], device=DEV)
        return compare_scale([t], torch.tensor(2.0, device=DEV), 1.0)

    check("scale_ NaN passes the clamp, inf is clamped", nan_through_clamp)

    def mixed():
        tensors = [
            make(n, DTYPES[i % 4], misalign=i % 3)
            for i, n in enumerate([3, 0, 65537, 4095, 1, 200_000, 0, 7])
        ]
        return compare_scale(tensors, torch.tensor(0.7, dtype=torch.float64, device=DEV), 1.5)

    check("scale_ mixed dtypes + zero-size + misaligned", mixed)
    check(
        "scale_ 3000 small tensors",
        lambda: compare_scale(
            [make(1 + (i * 37) % 3000, DTYPES[i % 2]) for i in range(3000)],
            torch.tensor(0.5, device=DEV),
            None,
        ),
    )

    def early_exit():
        # NaNs with payloads: a write through the float32 product would canonicalise them.
        for dtype in DTYPES:
            t = make(300_001, dtype, misalign=1)
            raw = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
            payload = {
                8: 0x7FF0000000000123,
                4: 0x7F800123,
                2: 0x7C03 if dtype == torch.float16 else 0x7F83,
            }[t.element_size()]
            raw[::1000] = payload
            before = bits(t)
            for coef in (
                torch.tensor(1.0, device=DEV),
                torch.tensor([1.0], dtype=torch.float64, device=DEV),
            ):
                ops.scale_([t], coef, None)
                if not torch.equal(bits(t), before):
                    return f"{dtype}: coef == 1 without clip_value changed the data"
        return None

    check("scale_ coef == 1 and no clip_value leaves data bitwise untouched", early_exit)

    # Coefficients float32 cannot hold as a normal number (#14 item 5): the product is formed in
    # float64 and rounded once, so it is the oracle's value exactly.
    def outside_float32(dtype, values, coef_value, clip_value):
        t = torch.tensor(values, dtype=torch.float64).to(dtype).to(DEV)
        coef = torch.tensor(coef_value, dtype=torch.float64, device=DEV)
        expected = [t.cpu().to(torch.float64)]
        reference.scale_(expected, coef.cpu(), clip_value)
        ops.scale_([t], coef, clip_value)
        want = expected[0].to(dtype)
        if not torch.equal(bits(t.cpu()), bits(want)):
            return f"got {t.cpu().tolist()} want {want.tolist()}"
        return None

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for label, values, coef_value, clip_value in (
            ("7e-51 on 1e30 (max_norm=1e-20 beside float64)", [1e30, -3e38, 1.0, 0.0], 7e-51, None),
            ("1e-30 on 6e4", [6e4, -6e4, 1.5, 0.0], 1e-30, None),
            ("1e300 on zeros", [0.0, -0.0, 0.0], 1e300, None),
            ("1e300 on zeros with a clamp", [0.0, -0.0], 1e300, 1.0),
            ("1e-300 with a clamp", [1e4, -2.0], 1e-300, 1e-310),
            ("2e48 on a 1e-40 subnormal", [1e-40, 0.5], 2e48, None),
        ):
            if dtype == torch.float16:  # its largest finite value is 65504
                values = [v for v in values if abs(v) <= 6e4]
            check(
                f"scale_ coef {coef_value:g} outside float32: {label} {dtype}",
                lambda d=dtype, v=values, c=coef_value, cv=clip_value: outside_float32(d, v, c, cv),
            )
    check(
        "scale_ coef outside float32 on a large misaligned float32 tensor",
        lambda: compare_scale(
            [make(300_001, torch.float32, scale=1e30, misalign=3)],
            torch.tensor(7e-51, dtype=torch.float64, device=DEV),
            None,
        ),
    )


# ---- clip_: the single cooperative launch against reduce -> finalize -> scale_ ------------------


def clip_checks(wide: bool) -> None:
    """Every output and gradient bit of clip_(launch=single) equals the three ops in sequence.
    `wide` adds a set with more chunks than resident blocks, so blocks loop over chunks."""

    def run(tensors, p, max_norm, inv, clip_value):
        expected = [same_alignment_copy(t) for t in tensors]
        got = ops.clip_(tensors, p, max_norm, inv, clip_value, torch.float64, True, "single")
        raw_norm, found_inf, per_tensor = ops.reduce(expected, p, True)
        norm, coef = ops.finalize(raw_norm, max_norm, inv, torch.float64)
        ops.scale_(expected, coef, clip_value)
        for name, a, b in zip(
            ("total_norm", "found_inf", "clip_coef", "per_tensor"),
            got,
            (norm, found_inf, coef, per_tensor),
            strict=True,
        ):
            if not torch.equal(bits(a), bits(b)):
                return f"{name}: {a.tolist()} != {b.tolist()}"
        for index, (a, b) in enumerate(zip(tensors, expected, strict=True)):
            if not torch.equal(bits(a), bits(b)):
                return f"gradient {index} ({a.dtype}) differs"
        return None

    sets = {
        "mixed dtypes + zero-size + misaligned": lambda: [
            make(n, DTYPES[i % 4], scale=3.0, misalign=i % 3)
            for i, n in enumerate([70_000, 0, 5, 1 << 20, 3000, 65536, 1])
        ],
        "one non-finite": lambda: (
            [make(200_000, torch.bfloat16)] + [torch.tensor([1.0, math.inf], device=DEV)]
        ),
        "float64 1e200 beside float32 (scaled sum, coef outside float32)": lambda: [
            make(70_000, torch.float32, scale=1e30, misalign=1),
            torch.full((3000,), 1e200, dtype=torch.float64, device=DEV),
        ],
    }
    for label, build in sets.items():
        for p in (2.0, math.inf, 3.0, 100.0):
            for max_norm, inv, clip_value in (
                (1.0, 0.125, None),
                (None, None, 0.01),
                (1e30, None, None),
            ):
                inv_tensor = None if inv is None else torch.tensor(inv, device=DEV)
                check(
                    f"clip_ single == split: {label} p={p} max_norm={max_norm} inv={inv} "
                    f"clip_value={clip_value}",
                    lambda b=build, p=p, m=max_norm, i=inv_tensor, c=clip_value: run(
                        b(), p, m, i, c
                    ),
                )
    if wide:  # one configuration: the set is large, and the sanitizers run this script too
        check(
            "clip_ single == split: 3000 chunks, 2000 tensors",
            lambda: run(
                [make(3000 * CHUNK, torch.float16)]
                + [make(1 + i, torch.float32) for i in range(2000)],
                2.0,
                1.0,
                torch.tensor(0.125, device=DEV),
                None,
            ),
        )


# ---- huge tensor, graphs -------------------------------------------------------------------------


def huge_check() -> None:
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        print(f"SKIP huge tensor: {free / 2**30:.1f} GiB free")
        return

    def run():
        t = torch.ones(n, dtype=torch.float16, device=DEV)
        t[-1] = 2.0
        t[(1 << 31) + 1] = 3.0
        raw_norm, found_inf, per = ops.reduce([t[1:]], 2.0, True)
        # every partial sum is an integer below 2^53, so exact: the norm is one rounded sqrt
        want = math.sqrt((n - 1 - 2) + 4.0 + 9.0)
        if raw_norm.item() != want or per.item() != want or found_inf.item() != 0.0:
            return f"raw_norm {raw_norm.item()} per {per.item()} want {want}"
        t[-2] = math.inf
        if ops.reduce([t], math.inf, False)[1].item() != 1.0:
            return "found_inf missed an inf past 2^31"
        t[-2] = 1.0
        ops.scale_([t[1:]], torch.tensor(0.5, device=DEV), None)
        tail = t[-4:].float().tolist()
        if t[0].item() != 1.0 or tail != [0.5, 0.5, 0.5, 1.0] or t[(1 << 31) + 1].item() != 1.5:
            return f"scale_ past 2^31: head {t[0].item()} tail {tail} mid {t[(1 << 31) + 1].item()}"
        return None

    check(f"reduce/scale_ on one tensor of {n} elements (> 2^31)", run)


def graph_check() -> None:
    def run():
        torch.manual_seed(5)
        grads = [
            make(n, DTYPES[i % 3], misalign=i % 2) for i, n in enumerate([70_000, 5, 1 << 20, 3000])
        ]
        inv_scale = torch.tensor([1 / 8], device=DEV)
        originals = [g.clone() for g in grads]

        def step():
            raw_norm, found_inf, _ = ops.reduce(grads, 2.0, False)
            total_norm, clip_coef = ops.finalize(raw_norm, 1.0, inv_scale, torch.float32)
            ops.scale_(grads, clip_coef, None)
            return total_norm, found_inf

        eager_norm, _ = step()
        eager = [g.clone() for g in grads]
        for g, o in zip(grads, originals, strict=True):
            g.copy_(o)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        for g, o in zip(grads, originals, strict=True):
            g.copy_(o)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_norm, _ = step()
        for _ in range(2):
            # the graph must see the live values: restore, replay, compare
            for g, o in zip(grads, originals, strict=True):
                g.copy_(o)
            graph.replay()
            torch.cuda.synchronize()
            if not torch.equal(bits(graph_norm), bits(eager_norm)):
                return f"graph norm {graph_norm.item()} != eager {eager_norm.item()}"
            for g, e in zip(grads, eager, strict=True):
                if not torch.equal(bits(g), bits(e)):
                    return "graph replay gradients differ from eager"
        # churn the eager cache, then replay again: the graph's table must still be alive
        for i in range(8):
            ops.reduce([make(100 + i, torch.float32)], 2.0, False)
        torch.cuda.synchronize()
        for g, o in zip(grads, originals, strict=True):
            g.copy_(o)
        graph.replay()
        torch.cuda.synchronize()
        if not torch.equal(bits(graph_norm), bits(eager_norm)):
            return "graph norm changed after the eager cache churned"
        return None

    check("CUDA graph capture and replay of reduce + finalize + scale_", run)


def many_captures_check() -> None:
    """Each capture's table lives as long as its graph (#14 item 10): graphs made and dropped one
    after another neither pile up tables nor allocate a pinned buffer each."""

    def wait_for_released(baseline: int) -> int:
        # the graph's user object is destroyed asynchronously, on a CUDA thread
        deadline = time.monotonic() + 10.0
        alive = testing.cuda_table_stats()[1]
        while alive > baseline and time.monotonic() < deadline:
            time.sleep(0.01)
            alive = testing.cuda_table_stats()[1]
        return alive

    def settled_stats() -> list[int]:
        # graphs dropped by earlier checks may still be releasing their tables
        gc.collect()
        torch.cuda.synchronize()
        previous, current = None, testing.cuda_table_stats()
        while current != previous:
            time.sleep(0.05)
            previous, current = current, testing.cuda_table_stats()
        return current

    def run():
        grads = [make(n, DTYPES[i % 4], misalign=i % 2) for i, n in enumerate([70_000, 5, 3000])]
        originals = [g.clone() for g in grads]
        inv_scale = torch.tensor(0.5, device=DEV)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops.clip_(grads, 2.0, 1.0, inv_scale, None, torch.float32, False, "split")
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        expected = [o.clone() for o in originals]
        want = ops.clip_(expected, 2.0, 1.0, inv_scale, None, torch.float32, False, "split")
        _, alive_before, _, pinned_before = settled_stats()
        for cycle in range(40):
            graph = torch.cuda.CUDAGraph()
            launch = ("split", "single")[cycle % 2]
            with torch.cuda.graph(graph):
                got = ops.clip_(grads, 2.0, 1.0, inv_scale, None, torch.float32, False, launch)
            if testing.cuda_table_stats()[1] != alive_before + 1:
                return f"cycle {cycle}: {testing.cuda_table_stats()} after one capture"
            for g, o in zip(grads, originals, strict=True):
                g.copy_(o)
            graph.replay()
            torch.cuda.synchronize()
            if not torch.equal(bits(got[0]), bits(want[0])):
                return f"cycle {cycle}: norm {got[0].item()} != {want[0].item()}"
            for g, e in zip(grads, expected, strict=True):
                if not torch.equal(bits(g), bits(e)):
                    return f"cycle {cycle}: replayed gradients differ from eager"
            del graph, got
            gc.collect()
            torch.cuda.synchronize()
            alive = wait_for_released(alive_before)
            if alive != alive_before:
                return f"cycle {cycle}: {alive - alive_before} captured tables outlive their graph"
        pinned_after = testing.cuda_table_stats()[3]
        if pinned_after - pinned_before > 1:
            return f"40 captures in turn allocated {pinned_after - pinned_before} pinned buffers"
        return None

    check("CUDA graph tables are freed with their graph (40 captures in turn)", run)


def table_reuse_check() -> None:
    """A gradient set whose addresses did not change reuses its device table (#17)."""

    def run():
        grads = [make(n, DTYPES[i % 4]) for i, n in enumerate([70_000, 3, 4097, 0])]
        ops.reduce(grads, 2.0, True)
        built = testing.cuda_table_stats()[0]
        for _ in range(3):
            raw_norm, _, _ = ops.reduce(grads, 2.0, True)
            _, clip_coef = ops.finalize(raw_norm, 1.0, None, torch.float32)
            ops.scale_(grads, clip_coef, 0.5)
            ops.clip_(grads, 2.0, 1.0, None, None, torch.float32, True, "auto")
        if testing.cuda_table_stats()[0] != built:
            return f"{testing.cuda_table_stats()[0] - built} tables built for unchanged tensors"
        moved = [g.clone() for g in grads]  # other addresses: one new table
        ops.reduce(moved, 2.0, True)
        if testing.cuda_table_stats()[0] != built + 1:
            return "new addresses did not build a new table"
        return None

    check("reduce/scale_/clip_ reuse the device table of an unchanged gradient set", run)


def cooperative_fallback_check() -> None:
    """A cooperative grid the device refuses (#14 item 11): launch='auto' falls back to the split
    path with the same bits and no error left behind; launch='single' raises, nothing written."""

    def run():
        grads = [make(n, DTYPES[i % 4], misalign=i % 3) for i, n in enumerate([200_000, 7, 3000])]
        expected = [same_alignment_copy(g) for g in grads]
        want = ops.clip_(expected, 2.0, 0.5, None, 0.01, torch.float64, True, "split")
        testing.set_single_launch_grid(1 << 24)  # more blocks than any GPU holds at once
        try:
            # auto first: it tries the cooperative launch itself, is refused and falls back
            got = ops.clip_(grads, 2.0, 0.5, None, 0.01, torch.float64, True, "auto")
            torch.cuda.synchronize()
            before = [bits(g) for g in grads]
            try:
                ops.clip_(grads, 2.0, 0.5, None, 0.01, torch.float64, True, "single")
                return "launch='single' with a refused grid did not raise"
            except RuntimeError as error:
                if "launch='auto'" not in str(error):
                    return f"unhelpful error: {error}"
            if not all(torch.equal(bits(g), b) for g, b in zip(grads, before, strict=True)):
                return "launch='single' refused but wrote the gradients"
        finally:
            testing.set_single_launch_grid(0)
        outputs = ("total_norm", "found_inf", "clip_coef", "per_tensor")
        for name, a, b in zip(outputs, got, want, strict=True):
            if not torch.equal(bits(a), bits(b)):
                return f"{name}: {a.tolist()} != {b.tolist()}"
        for index, (a, b) in enumerate(zip(before, expected, strict=True)):
            if not torch.equal(a, bits(b)):
                return f"gradient {index} differs from the split path"
        # no error left behind: later launches, the single one included, still work
        ops.clip_(grads, 2.0, 0.5, None, None, torch.float64, True, "single")
        torch.cuda.synchronize()
        return None

    check("clip_ launch='auto' falls back to split when the cooperative grid is refused", run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-huge", action="store_true", help="skip the 2^31-element tensor")
    parser.add_argument("--no-wide", action="store_true", help="skip the 3000-chunk clip_ set")
    parser.add_argument(
        "--sections",
        default="reduce,finalize,scale,clip,graph,cache",
        help="comma-separated subset to run (a sanitizer can take just one)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fusedclip::reduce", "CUDA"):
        print("FAIL fusedclip._C has no CUDA kernels (built without CUDA_HOME?)")
        return 1
    torch.manual_seed(0)
    sections = {
        "reduce": reduce_checks,
        "finalize": finalize_checks,
        "scale": scale_checks,
        "clip": lambda: clip_checks(wide=not args.no_wide),
        "graph": lambda: (graph_check(), many_captures_check()),
        "cache": lambda: (table_reuse_check(), cooperative_fallback_check()),
    }
    unknown = set(args.sections.split(",")) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {sorted(sections)}")
    for name in args.sections.split(","):
        sections[name]()
    if not args.no_huge:
        huge_check()
    failed = [name for name, ok in results if not ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    for name in failed[:50]:
        print(f"  FAILED {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
