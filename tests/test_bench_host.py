"""bench.host's breakdown of clip_grad_norm_ on the CPU backend: each part computes the norm the
call does, the host part is the call minus the op round by round, and the README table reports
what the file holds."""

from __future__ import annotations

import pytest

from bench import host, measure, report
from fusedclip import dispatch

pytestmark = pytest.mark.skipif(
    dispatch.unavailable_reason("cpu", "cpu") is not None, reason="needs the CPU extension"
)


@pytest.fixture(scope="module")
def part():
    return host.breakdown(16, measure.Budget(0.05, 3, 5))


def test_every_part_is_timed_in_the_same_rounds(part):
    samples = part["samples"]
    assert set(samples) == {*host.BREAKDOWN_PARTS, "host"}
    assert len({len(values) for values in samples.values()}) == 1
    assert samples["host"] == [c - o for c, o in zip(samples["call"], samples["op"], strict=True)]
    assert part["target_us"] == host.target_us(16)


def test_the_readme_table_holds_the_breakdown(part):
    calls = [
        {
            "tensors": 16,
            "op": "clip",
            "target_us": host.target_us(16),
            "summaries": {name: part["summaries"]["call"] for name in ("torch", "fusedclip-cpu")},
            "vs_torch": {"fusedclip-cpu": {"median": 1.0, "low": 1.0, "high": 1.0}},
        }
    ]
    result = {
        "device": "a CPU",
        "elements_per_tensor": host.ELEMENTS,
        "commit": "abc",
        "path": "bench/results/host-x.json",
        "calls": calls,
        "breakdown": [part],
    }
    table = report.host_readme_table(result)
    row = table.splitlines()[-1].split(" | ")
    host_median = part["summaries"]["host"]["median"]
    assert row[0] == "| 16"
    assert row[4].startswith(f"{host_median:.1f} ±")
    assert row[-1] == f"{host.target_us(16):.0f} {'✓' if host_median <= 12 else '✗'} |"
    heading = "Where `clip_grad_norm_`'s time goes"
    assert heading in table
    assert heading not in report.host_readme_table(result | {"breakdown": []})
