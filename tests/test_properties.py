"""Property-based hostile tests (issue #14, "How it is checked").

Random sets of 0-40 gradients (odd sizes, views, repeats, overlapping views, dtype mixes, inf, NaN,
+-0, subnormals, values near the dtype's max) go through every public entry point on every backend
that runs here, against a float64 oracle written below from the README's semantics (it does not
use fusedclip.reference): the norm of the unique memory, the clip coefficient
inv_scale * min(1, max_norm / (norm + 1e-6)), applied then clamped by value and rounded once to the
gradient's dtype. Every call runs twice on fresh copies (same bits), and a call that raises must
leave every byte of every gradient as it was.

Budget: FUSEDCLIP_HYPOTHESIS_EXAMPLES=<n> sets the number of examples of each property test (the
Triton interpreter runs a tenth of them); the defaults keep the module under 2 minutes on 2 cores.
Examples are derandomized (a fixed seed per test), so a failure reproduces.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import NORM_RTOL, ULP, backend_params, is_interpreted
from exact import bits
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fusedclip

_BUDGET = os.environ.get("FUSEDCLIP_HYPOTHESIS_EXAMPLES")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NORM_TYPES = [0.5, 1.0, 2.0, 3.0, 10.0, 100.0, math.inf]
# 0, 1, and 2^k +- 1: tails that no vector width divides, and sizes around the chunk boundaries.
SIZES = [0, 1, 2, 3, 7, 9, 15, 17, 31, 33, 63, 65, 127, 129, 255, 257, 1023, 1025, 4095, 4097]
INTERPRETED_SIZES = [size for size in SIZES if size <= 129]
# Magnitudes from zero to extreme, for max_norm, clip_value and inv_scale alike.
EXTREMES = [0.0, -0.0, 1e-300, 1e-40, 1e-20, 1e-6, 0.5, 1.0, 2.0, 1e6, 1e20, 1e38, 1e300]
# inv_scale is 1 / a loss scale: zero and extremes are taken, a negative float is refused (it
# would flip every sign); a tensor's sign is not read (that would sync), so negatives stay there.
INV_SCALES = EXTREMES + [-0.5, -1e-30, 2.0**-24, 65536.0]
INV_SCALE_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _examples(default: int, interpreted: bool = False) -> int:
    count = int(_BUDGET) if _BUDGET else default
    return max(1, count // 10) if interpreted and _BUDGET else count


def _profile(examples: int):
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


# ---------------------------------------------------------------------------------------------
# Gradient sets: bases (contiguous allocations) and entries (views of them, as passed in a call)


class BaseSpec(NamedTuple):
    numel: int
    dtype: torch.dtype
    magnitude: str  # how the values are drawn, see _fill
    exponent: int  # "ordinary" values are about 10^exponent
    seed: int
    specials: tuple  # (position in [0, 1), value name) pairs written over the drawn values


class EntrySpec(NamedTuple):
    base: int
    view: str  # see _view


ORDINARY_EXPONENTS = [-300, -30, -12, -6, -3, 0, 0, 0, 3, 6, 12, 30, 300]
MAGNITUDES = ["ordinary"] * 4 + ["wide", "huge", "tiny", "zeros"]
FINITE_SPECIALS = ["+0", "-0", "subnormal", "-subnormal", "max", "-max"]
NONFINITE_SPECIALS = ["inf", "-inf", "nan"]
# Views of a base of their own: dense, or with gaps; none overlaps another gradient.
SEPARATE_VIEWS = ["flat"] * 4 + [
    "reshape",  # base.view(a, b)
    "transpose",  # base.view(a, b).t(): dense, not contiguous
    "permute",  # base.view(a, 1, b).permute(2, 0, 1)
    "scalar",  # a 0-dim tensor (base.view(()) of a one-element base)
    "odd_stride",  # base.as_strided((1, n), (7, 1)): a size-1 dim whose stride means nothing
    "offset",  # base[1:]: dense, starting one element past the allocation (misaligned loads)
    "inner",  # base[3:-2]
    "step",  # base[::2]: gaps
    "step_offset",  # base[1::3]
    "step2d",  # base.view(a, b)[:, ::2]
    "sparse",  # a COO tensor of a copy of the base's values, with repeated indices (uncoalesced)
]
DENSE_VIEWS = ["flat", "reshape", "transpose", "permute", "scalar", "odd_stride"]  # the whole base
ALIASING_VIEWS = SEPARATE_VIEWS + [
    "same",  # the very tensor object of an earlier entry of this base
    "expand",  # base[:1].expand(3): overlaps itself
    "expand2d",  # base.view(1, n).expand(2, n)
    "partial",  # base[1:3]: overlaps the base partially
    "reinterpret",  # the base's bytes as another floating dtype: overlaps without being the same
]
REINTERPRET = {
    torch.float32: torch.bfloat16,
    torch.float64: torch.float32,
    torch.float16: torch.bfloat16,
    torch.bfloat16: torch.float16,
}


@st.composite
def base_specs(draw, sizes, dtypes, nonfinite, exponent, mixed):
    numel = draw(st.sampled_from(sizes))
    dtype = draw(st.sampled_from(dtypes))
    magnitude = draw(st.sampled_from(MAGNITUDES)) if mixed else "ordinary"
    seed = draw(st.integers(0, 2**31 - 1))
    # A set of one magnitude gets no value near the max, which would dominate its norm.
    names = (FINITE_SPECIALS if mixed else FINITE_SPECIALS[:4]) + (
        NONFINITE_SPECIALS if nonfinite else []
    )
    specials = draw(
        st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(names)), max_size=3)
    )
    return BaseSpec(numel, dtype, magnitude, exponent, seed, tuple(specials))


@st.composite
def gradient_sets(draw, max_tensors=40, sizes=SIZES, dtypes=DTYPES, valid=False):
    """(bases, entries), up to `max_tensors` entries. One set in three aliases freely (any view
    of any earlier base: mostly refused by writing calls); the others give each gradient its own
    base, except exact repeats (the same tensor again, or g.view(-1) of a dense g). Non-finite
    values are in one set in eight, so that most sets measure and clip finite gradients.
    `valid`: neither (a set every call accepts)."""
    count = draw(st.integers(0, max_tensors))
    aliasing = not valid and draw(st.integers(0, 2)) == 0
    nonfinite = not valid and draw(st.integers(0, 7)) == 0
    # Half the sets are of one magnitude (tiny to huge norms, so that max_norm, the 1e-6 and the
    # coefficient's range all matter); the others mix magnitudes from subnormal to the max.
    mixed = draw(st.booleans())
    exponent = draw(st.sampled_from(ORDINARY_EXPONENTS))
    bases, entries = [], []
    for _ in range(count):
        if aliasing and bases and draw(st.integers(0, 3)) == 0:
            base = draw(st.integers(0, len(bases) - 1))
            view = draw(st.sampled_from(ALIASING_VIEWS))
        elif entries and draw(st.integers(0, 7)) == 0:
            repeated = draw(st.sampled_from(entries))
            base = repeated.base
            view = "same"
            if repeated.view in DENSE_VIEWS:
                view = draw(st.sampled_from(["same"] + DENSE_VIEWS))
        else:
            bases.append(draw(base_specs(sizes, dtypes, nonfinite, exponent, mixed)))
            base = len(bases) - 1
            view = draw(st.sampled_from(ALIASING_VIEWS if aliasing else SEPARATE_VIEWS))
        entries.append(EntrySpec(base, view))
    return bases, entries


def _special(name: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    sign = -1.0 if name.startswith("-") else 1.0
    kind = name.lstrip("-+")
    return (
        sign
        * {
            "0": 0.0,
            "subnormal": info.smallest_normal / 4,
            "max": info.max,
            "inf": math.inf,
            "nan": math.nan,
        }[kind]
    )


def _fill(spec: BaseSpec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec.seed)
    info = torch.finfo(spec.dtype)
    normal = torch.randn(spec.numel, generator=generator, dtype=torch.float64)
    uniform = torch.rand(spec.numel, generator=generator, dtype=torch.float64)
    if spec.magnitude == "ordinary":
        # about 10^exponent, within what the dtype holds
        largest = math.floor(math.log10(info.max)) - 2
        smallest = math.ceil(math.log10(info.smallest_normal)) + 2
        exponent = min(max(spec.exponent, smallest), largest)
        values = normal * 10.0 ** (exponent + 2 * uniform[:1] - 1)
    elif spec.magnitude == "wide":
        # log-uniform over the whole normal range of the dtype, random signs
        low, high = math.log2(info.smallest_normal), math.log2(info.max)
        values = torch.sign(normal) * torch.exp2(low + (high - low) * uniform)
    elif spec.magnitude == "huge":
        values = torch.sign(normal) * info.max * (0.5 + 0.5 * uniform)
    elif spec.magnitude == "tiny":
        # subnormals and the smallest normals
        values = torch.sign(normal) * info.smallest_normal * 4 * uniform
    else:
        values = torch.zeros(spec.numel, dtype=torch.float64)
    values = values.to(spec.dtype)
    for position, name in spec.specials:
        if spec.numel:
            values[int(position * spec.numel)] = _special(name, spec.dtype)
    return values


def _factor(numel: int) -> tuple[int, int]:
    for a in range(2, int(math.isqrt(numel)) + 1):
        if numel % a == 0:
            return a, numel // a
    return 1, numel


def _view(base: torch.Tensor, kind: str) -> torch.Tensor:
    """The view `kind` of a 1-D base; a plain base where that view does not exist for its size."""
    numel = base.numel()
    a, b = _factor(numel)
    if kind == "sparse":
        dense_size = numel // 2 + 1
        positions = torch.arange(numel) * 5 % dense_size
        return torch.sparse_coo_tensor(positions.view(1, -1), base.clone(), (dense_size,))
    if kind == "reshape":
        return base.view(a, b)
    if kind == "transpose":
        return base.view(a, b).t()
    if kind == "permute":
        return base.view(a, 1, b).permute(2, 0, 1)
    if kind == "scalar" and numel == 1:
        return base.view(())
    if kind == "odd_stride":
        return base.as_strided((1, numel), (7, 1))
    if kind == "offset" and numel >= 2:
        return base[1:]
    if kind == "inner" and numel >= 6:
        return base[3:-2]
    if kind == "step" and numel >= 2:
        return base[::2]
    if kind == "step_offset" and numel >= 2:
        return base[1::3]
    if kind == "step2d" and b >= 2:
        return base.view(a, b)[:, ::2]
    if kind == "expand" and numel >= 1:
        return base[:1].expand(3)
    if kind == "expand2d" and numel >= 1:
        return base.view(1, numel).expand(2, numel)
    if kind == "partial" and numel >= 3:
        return base[1:3]
    if kind == "reinterpret" and numel >= 1:
        return base.view(REINTERPRET[base.dtype])
    return base


class Materialized(NamedTuple):
    bases: list[torch.Tensor]
    entries: list[torch.Tensor]
    entry_bases: list[int]

    @property
    def held(self) -> list[torch.Tensor]:
        """Every tensor whose bytes the call may write: the bases and the sparse entries."""
        sparse = {id(entry): entry for entry in self.entries if entry.is_sparse}
        return self.bases + list(sparse.values())


def values64(tensor: torch.Tensor) -> np.ndarray:
    """A gradient's values in float64, flat. A sparse one: the dense form of its coalesced values
    (README: the norm is over those; duplicates are summed at float64)."""
    if tensor.is_sparse:
        tensor = tensor.to(torch.float64).coalesce().to_dense()
    return tensor.detach().to(torch.float64).reshape(-1).numpy().copy()


def materialize(bases: list[BaseSpec], entries: list[EntrySpec]) -> Materialized:
    tensors = [_fill(spec) for spec in bases]
    views, last_view = [], {}
    for entry in entries:
        if entry.view == "same" and entry.base in last_view:
            view = last_view[entry.base]
        else:
            view = _view(tensors[entry.base], entry.view)
        last_view[entry.base] = view
        views.append(view)
    return Materialized(tensors, views, [entry.base for entry in entries])


# ---------------------------------------------------------------------------------------------
# The oracle, from the README: written independently of fusedclip.reference and fusedclip.plan


def element_bytes(view: torch.Tensor) -> np.ndarray:
    """Byte offset, in its base's storage, of each element of `view` (row-major order)."""
    offsets = np.zeros(1, dtype=np.int64)
    for size, stride in zip(view.shape, view.stride(), strict=True):
        offsets = (offsets[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
    return (offsets + view.storage_offset()) * view.element_size()


def memory_key(view: torch.Tensor, base: int) -> tuple:
    """README: the same memory is the same storage, offset, sizes, strides and dtype, or a dense
    view of one dtype over the same bytes (g and g.view(-1)). A sparse tensor is itself."""
    if view.is_sparse:
        return ("sparse", id(view))
    offsets = np.sort(element_bytes(view))
    size = view.element_size()
    first = int(offsets[0]) if offsets.size else view.storage_offset() * size
    if np.array_equal(offsets, first + size * np.arange(offsets.size)):
        return (base, "dense", first, offsets.size, view.dtype)
    return (base, view.storage_offset(), tuple(view.shape), tuple(view.stride()), view.dtype)


class Unique(NamedTuple):
    kept: list[int]  # indices of the entries counted (first of each repeat)
    overlap: str | None  # why a writing call must refuse the set, or None
    counted_as: list[int]  # for each entry, the position in `kept` of the entry it repeats


def unique_memory(gradients: Materialized) -> Unique:
    kept, seen, counted_as = [], {}, []
    for index, (view, base) in enumerate(
        zip(gradients.entries, gradients.entry_bases, strict=True)
    ):
        key = memory_key(view, base)
        if key not in seen:
            seen[key] = len(kept)
            kept.append(index)
        counted_as.append(seen[key])
    overlap = None
    covered = {
        b: np.zeros(t.numel() * t.element_size(), np.int64) for b, t in enumerate(gradients.bases)
    }
    for index in kept:
        view = gradients.entries[index]
        if view.is_sparse:
            continue  # its own memory
        offsets = element_bytes(view)
        if np.unique(offsets).size < offsets.size:
            overlap = overlap or f"entry {index} overlaps itself"
        every_byte = (offsets[:, None] + np.arange(view.element_size())).reshape(-1)
        np.add.at(covered[gradients.entry_bases[index]], every_byte, 1)
    if overlap is None and any((count > 1).any() for count in covered.values()):
        overlap = "two entries overlap partially"
    return Unique(kept, overlap, counted_as)


def oracle_norm(values: np.ndarray, norm_type: float) -> float:
    """The p-norm of float64 `values`, accurate for every p: scaled by the largest magnitude
    before the power (as LAPACK's nrm2), summed exactly (math.fsum)."""
    if values.size == 0:
        return 0.0
    magnitudes = np.abs(values)
    if np.isnan(magnitudes).any():
        return math.nan
    largest = float(magnitudes.max())
    if math.isinf(largest) or math.isinf(norm_type):
        return largest
    if largest == 0.0:
        return 0.0
    power_sum = math.fsum((magnitudes / largest) ** norm_type)
    with np.errstate(over="ignore"):
        return float(np.float64(largest) * np.float64(power_sum) ** (1.0 / norm_type))


def _times(a: float, b: float) -> float:
    """a * b in float64, IEEE (0 * inf is NaN, overflow is inf), without numpy's warnings."""
    with np.errstate(all="ignore"):
        return float(np.float64(a) * np.float64(b))


def oracle_coefficient(norm: float, max_norm: float | None, inv_scale: float | None) -> float:
    """inv_scale * min(1, max_norm / (norm + 1e-6)), NaN propagating (Python's min would not)."""
    coef = 1.0
    if max_norm is not None:
        with np.errstate(all="ignore"):
            ratio = float(np.float64(max_norm) / (np.float64(norm) + 1e-6))
        coef = ratio if math.isnan(ratio) else min(1.0, ratio)
    return coef if inv_scale is None else _times(coef, inv_scale)


def oracle_written(values: np.ndarray, coef: float, clip_value: float | None) -> np.ndarray:
    """clamp(g * coef, -clip_value, clip_value) in float64, before the rounding to the dtype."""
    with np.errstate(all="ignore"):
        scaled = values * np.float64(coef)
    if clip_value is not None:
        scaled = np.clip(scaled, -clip_value, clip_value)  # NaN stays NaN
    return scaled


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


# ---------------------------------------------------------------------------------------------
# Comparisons


def _overflow_magnitude(dtype: torch.dtype) -> float:
    """The first power of two past the dtype's max: where an overflowing rounding lands."""
    return 2.0 ** (math.log2(torch.finfo(dtype).max) // 1 + 1)


def assert_rounded_close(
    actual: torch.Tensor, exact: np.ndarray, dtype: torch.dtype, rtol: float, what: str
) -> None:
    """`actual` (of `dtype`) against the float64 values `exact` rounded once to `dtype`, within
    rtol of its magnitude (plus the dtype's smallest normal). A result that overflows to inf on
    one side and stays at the dtype's max on the other is one rounding apart: it counts as
    2^(emax+1). NaN must be NaN, a true inf must be that inf."""
    got = actual.detach().to(torch.float64).reshape(-1).numpy().copy()
    exact = np.asarray(exact, dtype=np.float64).reshape(-1)
    expected = torch.from_numpy(exact).to(dtype).to(torch.float64).numpy().copy()
    if dtype != torch.float64:
        overflow = _overflow_magnitude(dtype)
        rounded_over = np.isfinite(exact) & np.isinf(expected)
        expected[rounded_over] = np.sign(expected[rounded_over]) * overflow
        got_over = np.isfinite(exact) & np.isinf(got)
        got[got_over] = np.sign(got[got_over]) * overflow
    tiny = torch.finfo(dtype).smallest_normal
    with np.errstate(all="ignore"):
        error = np.abs(got - expected)
        bad = np.isnan(got) != np.isnan(exact)
        finite = np.isfinite(expected) & np.isfinite(got)
        bad |= finite & (error > rtol * np.abs(expected) + tiny)
        bad |= ~finite & ~np.isnan(exact) & (got != expected)
    if bad.any():
        where = np.flatnonzero(bad)[:5]
        rows = [
            f"  [{i}] got {got[i]!r}, expected {expected[i]!r} (exact {exact[i]!r})" for i in where
        ]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ:\n" + "\n".join(rows))


def _subnormal(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    magnitudes = np.abs(values)
    return (magnitudes > 0) & (magnitudes < torch.finfo(dtype).smallest_normal)


def raw(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Everything a tensor holds, bit for bit (a sparse one: its indices and values)."""
    if tensor.is_sparse:
        return [tensor._indices().clone(), bits(tensor._values())]
    return [bits(tensor)]


def snapshot(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [raw(tensor) for tensor in tensors]


def assert_unchanged(before: list, tensors: list[torch.Tensor], what: str) -> None:
    for index, (old, tensor) in enumerate(zip(before, tensors, strict=True)):
        now = raw(tensor)
        same = len(old) == len(now) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(old, now, strict=True)
        )
        assert same, f"{what}: tensor {index} changed"


# ---------------------------------------------------------------------------------------------
# The calls: every public entry point, with what the oracle expects of it


class Call(NamedTuple):
    api: str
    norm_type: float
    max_norm: object  # None, a float or a 0-dim tensor
    clip_value: object
    inv_scale: object
    total_norm: object  # clip_grads_with_norm_'s argument
    per_tensor: bool
    error_if_nonfinite: bool  # clip_grad_norm_ and get_total_norm: the split (synced) path


def _number_or_tensor(values, tensor_dtypes=("float64", "float32")):
    """A value from `values`, as a float or as a 0-dim tensor of one of `tensor_dtypes`."""
    return st.tuples(st.sampled_from(values), st.sampled_from(("float",) + tensor_dtypes)).map(
        lambda pair: (
            pair[0] if pair[1] == "float" else torch.tensor(pair[0], dtype=getattr(torch, pair[1]))
        )
    )


def _optional(strategy):
    return st.one_of(st.none(), strategy)


APIS = [
    "fused_clip_",
    "fused_clip_",
    "measure",
    "get_total_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
]


# max_norm as a multiple of the set's norm (resolved once the set exists): around the edge
# where the coefficient leaves 1.
RELATIVE_MAX_NORMS = st.sampled_from([0.5, 1 - 2**-20, 1.0, 1 + 2**-20, 2.0]).map(
    lambda factor: ("relative", factor)
)


def resolve_max_norm(call: Call, gradients: Materialized) -> Call:
    """A relative max_norm made absolute: its factor times the set's norm (a finite, nonzero one)."""
    if not isinstance(call.max_norm, tuple):
        return call
    factor = call.max_norm[1]
    kept = unique_memory(gradients).kept
    values = [values64(gradients.entries[i]) for i in kept]
    norm = oracle_norm(np.concatenate(values) if values else np.zeros(0), call.norm_type)
    inv_scale = _as_float(call.inv_scale)
    norm = _times(norm, 1.0 if inv_scale is None else abs(inv_scale))
    max_norm = factor * norm if math.isfinite(norm) and norm > 0 else factor
    return call._replace(max_norm=max_norm)


@st.composite
def calls(draw):
    api = draw(st.sampled_from(APIS))
    norm_type = draw(st.sampled_from(NORM_TYPES))
    max_norm = clip_value = inv_scale = total_norm = None
    per_tensor = False
    error_if_nonfinite = api in ("clip_grad_norm_", "get_total_norm") and draw(st.booleans())
    if api in ("fused_clip_", "measure", "clip_grad_norm_", "clip_grads_with_norm_"):
        max_norm = draw(st.one_of(_number_or_tensor(EXTREMES), RELATIVE_MAX_NORMS))
        if api in ("fused_clip_", "measure"):
            max_norm = draw(st.sampled_from([None, max_norm]))
            per_tensor = draw(st.booleans())
    if api in ("fused_clip_", "clip_grad_value_"):
        clip_value = draw(_number_or_tensor(EXTREMES))
        if api == "fused_clip_":
            clip_value = draw(st.sampled_from([None, clip_value]))
    if api in ("fused_clip_", "measure", "clip_grad_norm_", "clip_grad_value_"):
        inv_scale = draw(_optional(_number_or_tensor(INV_SCALES, INV_SCALE_DTYPES)))
    if api == "clip_grads_with_norm_":
        total_norm = draw(_number_or_tensor([0.0, 1e-30, 0.7, 3.0, 1e30, 1e39, math.inf]))
    return Call(
        api, norm_type, max_norm, clip_value, inv_scale, total_norm, per_tensor, error_if_nonfinite
    )


def writes(call: Call) -> bool:
    if call.api == "fused_clip_":
        return any(v is not None for v in (call.max_norm, call.clip_value, call.inv_scale))
    return call.api in ("clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_")


def _parameters(entries: list[torch.Tensor]) -> list[torch.Tensor]:
    """A parameter per entry, whose .grad is that entry (the drop-ins take parameters)."""
    parameters = []
    for entry in entries:
        parameter = torch.zeros(entry.shape, dtype=entry.dtype, requires_grad=True)
        parameter.grad = entry
        parameters.append(parameter)
    return parameters


def run_call(call: Call, entries: list[torch.Tensor], backend: str):
    """(total_norm, found_inf, clip_coef, per_tensor_norms), each None where the API has none."""
    if call.api == "fused_clip_":
        return tuple(
            fusedclip.fused_clip_(
                entries,
                max_norm=call.max_norm,
                norm_type=call.norm_type,
                clip_value=call.clip_value,
                inv_scale=call.inv_scale,
                per_tensor=call.per_tensor,
                backend=backend,
            )
        )
    if call.api == "measure":
        return tuple(
            fusedclip.measure(
                entries,
                max_norm=call.max_norm,
                norm_type=call.norm_type,
                inv_scale=call.inv_scale,
                per_tensor=call.per_tensor,
                backend=backend,
            )
        )
    if call.api == "get_total_norm":
        total = fusedclip.get_total_norm(
            entries, call.norm_type, call.error_if_nonfinite, backend=backend
        )
        return total, None, None, None
    parameters = _parameters(entries)
    if call.api == "clip_grad_norm_":
        total = fusedclip.clip_grad_norm_(
            parameters,
            call.max_norm,
            call.norm_type,
            call.error_if_nonfinite,
            inv_scale=call.inv_scale,
            backend=backend,
        )
        return total, None, None, None
    if call.api == "clip_grad_value_":
        fusedclip.clip_grad_value_(
            parameters, call.clip_value, inv_scale=call.inv_scale, backend=backend
        )
    else:
        fusedclip.clip_grads_with_norm_(parameters, call.max_norm, call.total_norm, backend=backend)
    return None, None, None, None


class Expected(NamedTuple):
    refusal: tuple[type, str] | None  # the error the call must raise, and why
    total_norm: float
    found_inf: float
    clip_coef: float  # what each written element is multiplied by
    per_tensor_norms: list[float]
    out_dtype: torch.dtype
    kept: list[int]


def expect(call: Call, gradients: Materialized) -> Expected:
    unique = unique_memory(gradients)
    refusal = (ValueError, unique.overlap) if writes(call) and unique.overlap else None
    if isinstance(call.inv_scale, float) and call.inv_scale < 0:
        refusal = (ValueError, "a negative inv_scale")
    kept = unique.kept
    values = [values64(gradients.entries[i]) for i in kept]
    joined = np.concatenate(values) if values else np.zeros(0)
    inv_scale = _as_float(call.inv_scale)
    unscale = 1.0 if inv_scale is None else abs(inv_scale)
    # ||s * g|| = |s| * ||g||: the norm of the unscaled gradients. With no gradient at all there
    # is nothing to unscale: torch's norm of an empty set, 0, whatever inv_scale is (|inv_scale| * 0
    # would be NaN for an infinite one).
    total_norm = _times(oracle_norm(joined, call.norm_type), unscale) if kept else 0.0
    # One per listed gradient, in the list's order: a repeat has its first listing's norm.
    unique_norms = [_times(oracle_norm(v, call.norm_type), unscale) for v in values]
    per_tensor = [unique_norms[position] for position in unique.counted_as]
    if call.api == "clip_grads_with_norm_":
        coef = oracle_coefficient(_as_float(call.total_norm), _as_float(call.max_norm), None)
    elif call.api == "clip_grad_value_":
        coef = 1.0 if inv_scale is None else inv_scale
    else:
        coef = oracle_coefficient(total_norm, _as_float(call.max_norm), inv_scale)
    any_float64 = any(gradients.entries[i].dtype == torch.float64 for i in kept)
    out_dtype = torch.float64 if any_float64 else torch.float32
    returned_norm = torch.tensor(total_norm, dtype=torch.float64).to(out_dtype)
    if refusal is None and call.error_if_nonfinite and not torch.isfinite(returned_norm):
        refusal = (RuntimeError, f"a norm of {returned_norm.item()} with error_if_nonfinite")
    return Expected(
        refusal,
        total_norm,
        float(not np.isfinite(joined).all()),
        coef,
        per_tensor,
        out_dtype,
        kept,
    )


def check_call(call: Call, bases: list[BaseSpec], entries: list[EntrySpec], backend: str) -> None:
    interpreted = is_interpreted("cpu", backend)
    gradients = materialize(bases, entries)
    call = resolve_max_norm(call, gradients)
    expected = expect(call, gradients)
    event(f"{call.api}, {'refused' if expected.refusal else 'accepted'}")
    event(f"found_inf={expected.found_inf}, clipped={expected.clip_coef < 1}")
    before = snapshot(gradients.held)
    if expected.refusal is not None:
        with pytest.raises(expected.refusal[0]):
            run_call(call, gradients.entries, backend)
        assert_unchanged(before, gradients.held, f"refused ({expected.refusal[1]})")
        return
    originals = [values64(entry) for entry in gradients.entries]
    result = run_call(call, gradients.entries, backend)
    # Same input, same bits: a second run on a fresh copy of the same set.
    twin = materialize(bases, entries)
    twin_result = run_call(call, twin.entries, backend)
    for first, second in zip(
        gradients.held + list(result), twin.held + list(twin_result), strict=True
    ):
        if first is not None:
            if first.is_sparse:
                first, second = first.to_dense(), second.to_dense()
            assert torch.equal(bits(first), bits(second)), "not deterministic"
    total_norm, found_inf, clip_coef, per_tensor_norms = result
    # The Triton interpreter (triton 3.8) flushes bfloat16 subnormals to zero when it widens them
    # (an upstream bug): where the set holds any, its norm says nothing about the kernels; the GPU
    # runs check them.
    any_subnormal = any(
        _subnormal(originals[i], torch.bfloat16).any()
        for i in expected.kept
        if gradients.entries[i].dtype == torch.bfloat16
    )
    skip_norms = interpreted and any_subnormal
    if total_norm is not None and gradients.entries:
        assert total_norm.dtype == expected.out_dtype, f"norm dtype {total_norm.dtype}"
        if not skip_norms:
            assert_rounded_close(
                total_norm,
                [expected.total_norm],
                expected.out_dtype,
                NORM_RTOL[expected.out_dtype],
                "total_norm",
            )
    if found_inf is not None and gradients.entries:
        assert found_inf.item() == expected.found_inf, "found_inf"
    if clip_coef is not None and gradients.entries and not skip_norms:
        assert_rounded_close(
            clip_coef,
            [expected.clip_coef],
            torch.float64,
            NORM_RTOL[expected.out_dtype],
            "clip_coef",
        )
    if call.api in ("fused_clip_", "measure") and not call.per_tensor:
        assert per_tensor_norms is None, "per_tensor_norms returned without per_tensor=True"
    if per_tensor_norms is not None and gradients.entries and not skip_norms:
        assert per_tensor_norms.numel() == len(gradients.entries), (
            "one per-tensor norm per listed gradient"
        )
        assert_rounded_close(
            per_tensor_norms,
            expected.per_tensor_norms,
            expected.out_dtype,
            NORM_RTOL[expected.out_dtype],
            "per_tensor_norms",
        )
    if not writes(call) or not gradients.entries:
        assert_unchanged(before, gradients.held, "a call that only reads")
        return
    clip_value = _as_float(call.clip_value)
    # The coefficient the kernels use comes from their own norm (within NORM_RTOL of the
    # oracle's); the written values follow the oracle's coefficient within 2 ulp, except where the
    # norm itself is at the limit of its tolerance (ignored: the norm check above covers it).
    coef = expected.clip_coef
    keeps_signs = coef > 0 and math.isfinite(coef) and (clip_value is None or clip_value > 0)
    for index, view in enumerate(gradients.entries):
        dtype = view.dtype
        exact = oracle_written(originals[index], expected.clip_coef, clip_value)
        if view.is_sparse:
            # only the stored elements are scaled: the others stay zeros
            stored = np.zeros(exact.size, dtype=bool)
            stored[view._indices()[0].numpy()] = True
            exact[~stored] = 0.0
            view = view.to_dense()
        if interpreted and dtype == torch.bfloat16:
            continue  # the interpreter rounds float32 -> bfloat16 by truncation
        assert_rounded_close(view, exact, dtype, 2 * ULP[dtype], f"gradient {index} ({dtype})")
        if keeps_signs and not interpreted and not gradients.entries[index].is_sparse:
            # A positive factor and a positive bound keep every sign, of zeros too (not checked for
            # sparse gradients: to_dense adds their values to +0).
            got = values64(view)
            signed = ~np.isnan(got) & ~np.isnan(originals[index])
            flipped = np.signbit(got) != np.signbit(originals[index])
            assert not (flipped & signed).any(), f"gradient {index} ({dtype}): a sign changed"
    # Bytes of the bases that no gradient covers (the gaps of a stepped view) stay as they were.
    for base_index, base in enumerate(gradients.bases):
        covered = np.zeros(base.numel() * base.element_size(), dtype=bool)
        for index in expected.kept:
            view = gradients.entries[index]
            if gradients.entry_bases[index] == base_index and not view.is_sparse:
                offsets = element_bytes(view)
                covered[(offsets[:, None] + np.arange(view.element_size())).reshape(-1)] = True
        old = before[base_index][0].contiguous().view(torch.uint8).numpy()
        new = bits(base).view(torch.uint8).numpy()
        assert np.array_equal(old[~covered], new[~covered]), (
            f"base {base_index}: bytes outside every gradient changed"
        )


# ---------------------------------------------------------------------------------------------
# The properties


BACKENDS = backend_params()
NATIVE = [param for param in BACKENDS if not is_interpreted(*param.values)]
INTERPRETED = [param for param in BACKENDS if is_interpreted(*param.values)]


@pytest.mark.parametrize(("device", "backend"), NATIVE)
@_profile(_examples(250))
@given(gradients=gradient_sets(), call=calls())
def test_every_call_matches_the_oracle(device, backend, gradients, call):
    check_call(call, *gradients, backend)


@pytest.mark.parametrize(("device", "backend"), INTERPRETED)
@_profile(_examples(30, interpreted=True))
@given(gradients=gradient_sets(max_tensors=6, sizes=INTERPRETED_SIZES), call=calls())
def test_every_call_matches_the_oracle_interpreted(device, backend, gradients, call):
    """The same, small and few: the Triton interpreter runs a kernel per element in Python."""
    check_call(call, *gradients, backend)


# ---------------------------------------------------------------------------------------------
# Refusals: a bad argument or a bad gradient anywhere in the list, and nothing changes


class Corruption(NamedTuple):
    error: type  # what the README says the call raises
    apis: tuple[str, ...]  # the calls it applies to


WRITING_APIS = ("fused_clip_", "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_")
ALL_APIS = WRITING_APIS + ("measure", "get_total_norm")
CORRUPTIONS = {
    "negative max_norm": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "measure", "clip_grads_with_norm_")
    ),
    "NaN max_norm": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "measure", "clip_grads_with_norm_")
    ),
    "negative clip_value": Corruption(ValueError, ("fused_clip_", "clip_grad_value_")),
    "NaN clip_value": Corruption(ValueError, ("fused_clip_", "clip_grad_value_")),
    "norm_type 0": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "measure", "get_total_norm")
    ),
    "norm_type -2": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "measure", "get_total_norm")
    ),
    "norm_type NaN": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "measure", "get_total_norm")
    ),
    "norm_type 'two'": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "measure", "get_total_norm")
    ),
    "inf inv_scale": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "clip_grad_value_", "measure")
    ),
    "NaN inv_scale": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "clip_grad_value_", "measure")
    ),
    "negative inv_scale": Corruption(
        ValueError, ("fused_clip_", "clip_grad_norm_", "clip_grad_value_", "measure")
    ),
    "two-element inv_scale": Corruption(
        TypeError, ("fused_clip_", "clip_grad_norm_", "clip_grad_value_", "measure")
    ),
    "integer inv_scale": Corruption(
        TypeError, ("fused_clip_", "clip_grad_norm_", "clip_grad_value_", "measure")
    ),
    "two-element total_norm": Corruption(TypeError, ("clip_grads_with_norm_",)),
    "complex total_norm": Corruption(TypeError, ("clip_grads_with_norm_",)),
    # (torch refuses a .grad of another dtype than its parameter's: gradients only)
    "integer gradient": Corruption(TypeError, ("fused_clip_", "measure", "get_total_norm")),
    "complex gradient": Corruption(TypeError, ("fused_clip_", "measure", "get_total_norm")),
    "None gradient": Corruption(TypeError, ("fused_clip_", "measure", "get_total_norm")),
    "a parameter for a gradient": Corruption(TypeError, ("fused_clip_", "measure")),
    "self-overlapping gradient": Corruption(ValueError, WRITING_APIS),
    "partially overlapping gradients": Corruption(ValueError, WRITING_APIS),
    "the same bytes as another dtype": Corruption(ValueError, WRITING_APIS),
    "inference tensor": Corruption(ValueError, WRITING_APIS),
    "non-finite with error_if_nonfinite": Corruption(
        RuntimeError, ("clip_grad_norm_", "get_total_norm")
    ),
    "unknown backend": Corruption(ValueError, ALL_APIS),
}


def _bad_gradient(kind: str) -> tuple[list[torch.Tensor], list]:
    """(the bad gradients to insert, extra tensors whose bytes must not change either)."""
    if kind == "integer gradient":
        bad = torch.arange(5, dtype=torch.int32)
        return [bad], [bad]
    if kind == "complex gradient":
        bad = torch.ones(5, dtype=torch.complex64)
        return [bad], [bad]
    if kind == "None gradient":
        return [None], []
    if kind == "a parameter for a gradient":
        bad = torch.ones(5, requires_grad=True)
        return [bad], [bad.detach()]
    if kind == "self-overlapping gradient":
        bad = torch.ones(5)
        return [bad[:2].expand(2, 2)], [bad]
    if kind == "partially overlapping gradients":
        bad = torch.ones(7)
        return [bad, bad[2:4]], [bad]
    if kind == "the same bytes as another dtype":
        bad = torch.ones(7)
        return [bad, bad.view(torch.bfloat16)], [bad]
    if kind == "inference tensor":
        with torch.inference_mode():
            bad = torch.ones(5)
        return [bad], [bad]
    if kind == "non-finite with error_if_nonfinite":
        bad = torch.tensor([1.0, math.nan, 2.0])
        return [bad], [bad]
    return [], []


def run_corrupted(kind: str, api: str, gradients: list[torch.Tensor], backend: str) -> None:
    norm_type = {"norm_type 0": 0.0, "norm_type -2": -2.0, "norm_type NaN": math.nan}.get(
        kind, "two" if kind == "norm_type 'two'" else 2.0
    )
    max_norm = {"negative max_norm": -1.0, "NaN max_norm": math.nan}.get(kind, 0.5)
    clip_value = {"negative clip_value": -0.1, "NaN clip_value": math.nan}.get(kind, 0.5)
    inv_scale = {
        "inf inv_scale": math.inf,
        "NaN inv_scale": math.nan,
        "negative inv_scale": -0.5,
        "two-element inv_scale": torch.tensor([0.5, 0.5]),
        "integer inv_scale": torch.tensor(2),
    }.get(kind, 0.5)
    total_norm = {
        "two-element total_norm": torch.tensor([3.0, 4.0]),
        "complex total_norm": torch.tensor(3 + 0j),
    }.get(kind, 3.0)
    backend = "no-such-backend" if kind == "unknown backend" else backend
    error_if_nonfinite = kind == "non-finite with error_if_nonfinite"
    if api == "fused_clip_":
        fusedclip.fused_clip_(
            gradients,
            max_norm=max_norm,
            norm_type=norm_type,
            clip_value=clip_value,
            inv_scale=inv_scale,
            backend=backend,
        )
    elif api == "measure":
        fusedclip.measure(
            gradients, max_norm=max_norm, norm_type=norm_type, inv_scale=inv_scale, backend=backend
        )
    elif api == "get_total_norm":
        fusedclip.get_total_norm(
            gradients, norm_type, error_if_nonfinite=error_if_nonfinite, backend=backend
        )
    else:
        # The drop-ins take parameters; a None or non-tensor "gradient" cannot be a .grad.
        parameters = _parameters(gradients)
        if api == "clip_grad_norm_":
            fusedclip.clip_grad_norm_(
                parameters,
                max_norm,
                norm_type,
                error_if_nonfinite=error_if_nonfinite,
                inv_scale=inv_scale,
                backend=backend,
            )
        elif api == "clip_grad_value_":
            fusedclip.clip_grad_value_(parameters, clip_value, inv_scale=inv_scale, backend=backend)
        else:
            fusedclip.clip_grads_with_norm_(parameters, max_norm, total_norm, backend=backend)


@st.composite
def corrupted_calls(draw):
    kind = draw(st.sampled_from(sorted(CORRUPTIONS)))
    api = draw(st.sampled_from(CORRUPTIONS[kind].apis))
    return kind, api


def check_refusal(kind, api, bases, entries, position, backend) -> None:
    gradients = materialize(bases, entries)
    bad, extras = _bad_gradient(kind)
    at = int(position * (len(gradients.entries) + 1))
    listed = gradients.entries[:at] + bad + gradients.entries[at:]
    tensors = gradients.held + extras
    before = snapshot(tensors)
    with pytest.raises(CORRUPTIONS[kind].error):
        run_corrupted(kind, api, listed, backend)
    assert_unchanged(before, tensors, f"{api} refused {kind}")


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_refusals_change_nothing(device, backend):
    interpreted = is_interpreted(device, backend)
    if interpreted:
        sets = gradient_sets(max_tensors=6, sizes=INTERPRETED_SIZES, valid=True)
    else:
        sets = gradient_sets(valid=True)

    @_profile(_examples(20 if interpreted else 150, interpreted=interpreted))
    @given(gradients=sets, corruption=corrupted_calls(), position=st.floats(0, 1, exclude_max=True))
    def check(gradients, corruption, position):
        check_refusal(*corruption, *gradients, position, backend)

    check()


# ---------------------------------------------------------------------------------------------
# Bugs the properties found, each as its smallest input (failing until fixed)


@pytest.mark.parametrize(("device", "backend"), NATIVE)
def test_bug_per_tensor_norms_is_none_unless_asked_for_when_writing(device, backend):
    """ClipResult: per_tensor_norms is None unless per_tensor=True. A writing fused_clip_ (the
    backend's one-op clip_ path) returned an empty tensor instead on the cpu backend."""
    gradient = torch.ones(3)
    result = fusedclip.fused_clip_([gradient], max_norm=1.0, backend=backend)
    assert result.per_tensor_norms is None, f"got {result.per_tensor_norms!r}"


@pytest.mark.parametrize(("device", "backend"), NATIVE)
@pytest.mark.parametrize("max_norm", [None, 1.0], ids=["reads", "writes"])
def test_bug_an_empty_gradient_listed_twice_counts_once(device, backend, max_norm):
    """The aliasing rule: the same tensor listed twice counts once in the total, and per-tensor
    norms are one per listed tensor, for a zero-size tensor as for a non-empty one ([g, g] gives
    two equal norms; once the empty pair and the non-empty pair disagreed)."""
    empty = torch.ones(0)
    result = fusedclip.fused_clip_(
        [empty, empty], max_norm=max_norm, per_tensor=True, backend=backend
    )
    nonempty = torch.ones(3)
    same_nonempty = fusedclip.fused_clip_([nonempty, nonempty], per_tensor=True, backend=backend)
    norms = same_nonempty.per_tensor_norms
    assert norms.tolist() == [pytest.approx(math.sqrt(3.0), rel=1e-6)] * 2, f"got {norms!r}"
    assert same_nonempty.total_norm.item() == pytest.approx(math.sqrt(3.0), rel=1e-6)
    assert result.per_tensor_norms.tolist() == [0.0, 0.0], f"got {result.per_tensor_norms!r}"


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("norm_type", [0.5, 1.0, 2.0, 3.0])
def test_bug_norm_of_the_largest_float64_is_finite_for_p_below_one(device, backend, norm_type):
    """The norm of [DBL_MAX] is DBL_MAX, finite in float64: finite and accurate for every p. With
    p = 0.5 the triton backend (interpreter, main at a04a804) returned inf: (sum |g|^p)^(1/p)
    taken unscaled rounds sqrt(DBL_MAX)^2 above the range."""
    largest = torch.finfo(torch.float64).max
    gradient = torch.tensor([largest], dtype=torch.float64)
    total_norm = fusedclip.get_total_norm([gradient], norm_type, backend=backend)
    assert_rounded_close(total_norm, [largest], torch.float64, NORM_RTOL[torch.float64], "norm")
