"""The dry run of `make gpu-check` (bench/gpu_check.py): the same steps on the CPU backend and the
Triton interpreter, tiny sizes, no sanitizer; so that the one GPU run of a short loan does not fail
on a typo in a command, a flag that changed, or a results file the summary cannot read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check, report

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, **env):
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", *args],
        cwd=REPOSITORY,
        env=os.environ | {"FUSEDCLIP_GPU_CHECK_DIR": str(tmp_path)} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    completed = _run(out)
    with open(out / "summary.json") as handle:
        return completed, out, json.load(handle)


def test_dry_run_runs_every_step(dry_run):
    completed, out, summary = dry_run
    assert completed.returncode == 0, completed.stdout + completed.stderr
    status = {step["name"]: step["status"] for step in summary["steps"]}
    assert list(status) == ["build", "pytest", "bench", "host", "memcheck", "racecheck"]
    for name in ("build", "pytest", "bench", "host"):
        assert status[name] == "ok", (
            name,
            status[name],
            (out / "logs" / f"{name}.log").read_text()[-3000:],
        )
    for name in ("memcheck", "racecheck"):
        assert status[name].startswith("skipped (dry run"), status


def test_dry_run_results_are_checked_and_summarised(dry_run):
    completed, out, summary = dry_run
    names = sorted(os.listdir(out))
    main = [n for n in names if n.endswith(".json") and not n.startswith(("host-", "summary"))]
    host = [n for n in names if n.startswith("host-") and n.endswith(".json")]
    assert len(main) == 1 and len(host) == 1, names
    assert any(n.endswith(".png") for n in names), names
    with open(out / main[0]) as handle:
        result = json.load(handle)
    assert result["complete"] and result["profile"] == "tiny"
    ours = [r for r in result["rows"] if r["provider"].startswith("fusedclip")]
    assert {r["op"] for r in ours} >= {"norm", "clip", "unscale_clip", "clip_value"}
    assert all(
        r["norm_rel_err"] is not None and r["norm_rel_err"] < report.NORM_CHECK_RTOL for r in ours
    )
    targets = {t["target"]: t for t in summary["targets"]}
    (norms,) = [t for name, t in targets.items() if name.startswith("every fusedclip norm within")]
    assert norms["met"], norms
    assert any(t.startswith("host time") for t in targets)
    screen = (out / "summary.txt").read_text().splitlines()
    assert len(screen) <= 25 and screen[0].startswith("gpu-check (dry run)")
    assert completed.stdout.rstrip().endswith(screen[-1])


def test_a_sanitizer_section_that_does_not_exist_fails_the_check_at_once(tmp_path):
    completed = _run(tmp_path, "--steps", "memcheck", FUSEDCLIP_MEMCHECK_SECTIONS="reduce,no_such")
    assert completed.returncode == 1, completed.stdout
    with open(tmp_path / "summary.json") as handle:
        status = {s["name"]: s["status"] for s in json.load(handle)["steps"]}
    assert status["memcheck"].startswith("failed (no section ['no_such']"), status
    assert status["racecheck"] == "skipped (--steps)"


@pytest.mark.parametrize(
    "name, log, expected",
    [
        (
            "memcheck",
            "5 passed, 0 failed\n========= ERROR SUMMARY: 0 errors\n",
            "0 errors, checks 5 passed, 0 failed",
        ),
        (
            "racecheck",
            "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n",
            "2 hazards",
        ),
        (
            "memcheck",
            "========= Invalid __global__ read of size 4 bytes\n",
            "no sanitizer summary; 1 reports so far",
        ),
        ("pytest", "..s\n===== 3 passed, 1 skipped in 2.1s =====\n", "3 passed, 1 skipped in 2.1s"),
    ],
)
def test_the_summary_reads_each_tool_s_last_word(name, log, expected):
    step = gpu_check.Step(name, [], 1)
    assert gpu_check.describe(step, log) == expected


@pytest.mark.parametrize("dry_run", [False, True], ids=["gpu", "dry-run"])
def test_the_gpu_s_own_tests_run_first_and_compiled_graphs_last(dry_run, tmp_path):
    (step,) = [s for s in gpu_check.steps(dry_run, str(tmp_path)) if s.name == "pytest"]
    files = [argument for argument in step.command if argument.startswith("tests" + os.sep)]
    on_disk = sorted(
        os.path.join("tests", name)
        for name in os.listdir(os.path.join(REPOSITORY, "tests"))
        if name.startswith("test_") and name.endswith(".py")
    )
    assert sorted(files) == on_disk, "every test file, each once"
    first = [os.path.join("tests", name) for name in ("test_cuda.py", "test_triton.py")]
    assert files[:2] == first and files[-1] == os.path.join("tests", "test_compile.py"), files
