"""Regression tracking with pytest-benchmark: `pytest bench --benchmark-only`.

Small versions of the harness's workloads, the same providers; the harness (`python -m bench`)
is the source of the README's numbers.
"""

from __future__ import annotations

import pytest
import torch

from bench import providers, workloads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORKLOADS = {
    "200x16K": workloads.Workload("200x16K", [((16 << 10,), torch.float32)] * 200),
    "4x1M": workloads.Workload("4x1M", [((1 << 20,), torch.float32)] * 4),
}
PROVIDERS = providers.providers(DEVICE)


@pytest.fixture(scope="module", params=list(WORKLOADS))
def case(request):
    return providers.make_case(WORKLOADS[request.param].make(DEVICE), with_optimizer=False)


@pytest.mark.parametrize("op", ["norm", "clip", "unscale_clip", "clip_value"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench(benchmark, case, op, provider):
    run = PROVIDERS[provider].get(op)
    if run is None:
        pytest.skip(f"{provider} has no {op}")

    def timed():
        run(case)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = op
    benchmark.pedantic(timed, setup=case.restore, rounds=10, warmup_rounds=1)
