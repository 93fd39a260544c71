"""Packaging: the sdist carries every source the build needs, setup.py finds the toolkit as
.ci/run does, the build record and build_info() agree with what loaded, a torch mismatch refuses
the extension at import, and the reference fallback warns once. (.ci/run also installs the sdist
into a fresh venv and imports it: that build takes minutes, too long for a test.)"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import tomllib
import warnings

import pytest
import torch

import fusedclip
from fusedclip import dispatch, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The module; the package exports a function of the same name.
build_info_module = importlib.import_module("fusedclip.build_info")


def _setup_module():
    spec = importlib.util.spec_from_file_location("fusedclip_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


def _tracked_files(*patterns: str) -> list[str]:
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
        os.path.join(ROOT, ".git")
    ):
        pytest.skip("not a git checkout")
    output = subprocess.run(
        ["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return output.split()


def test_the_sdist_holds_every_source_the_build_needs(tmp_path):
    pytest.importorskip("build")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "FUSEDCLIP_SKIP_EXT": "1"},
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("fusedclip-*.tar.gz")
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = {name.removeprefix(top + "/") for name in archive.getnames()}
    needed = _tracked_files("csrc", "fusedclip", "bench/*.py") + [
        "setup.py",
        "pyproject.toml",
        "LICENSE",
        "README.md",
    ]
    missing = [name for name in needed if name not in names]
    assert not missing, f"the sdist lacks {missing}"
    built = [name for name in names if name.endswith(".so") or name.endswith("_build.json")]
    assert not built, f"the sdist carries build outputs {built}"


def test_version_has_one_source():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module_name, _, name = attr.rpartition(".")
    assert getattr(importlib.import_module(module_name), name) == fusedclip.__version__


def test_the_wheel_installs_the_fusedclip_package_alone():
    """It installed a top-level `bench` package too (and a console script into it), which shadows
    a user's own bench/ folder and labelled results with whatever git checkout surrounded the
    venv. bench/ now ships in the sdist only."""
    setuptools = pytest.importorskip("setuptools")
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(ROOT, include=include)
    assert "fusedclip" in packages
    assert {package.split(".")[0] for package in packages} == {"fusedclip"}, packages
    assert "scripts" not in project["project"]
    manifest = open(os.path.join(ROOT, "MANIFEST.in")).read()
    assert "recursive-include bench *.py" in manifest  # the sdist still carries the harness


def test_python_m_bench_runs_from_the_checkout():
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_make_rebuilds_when_a_build_setting_changes(tmp_path):
    """The build stamp depended on the sources and the venv alone: a first `make` without a
    toolkit (or with FUSEDCLIP_SKIP_CUDA=1) never gained the CUDA kernels, and a new
    TORCH_CUDA_ARCH_LIST or CUDA_HOME was ignored. A dry run in a copy of the Makefile."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    inputs = [tmp_path / "requirements-dev.txt", tmp_path / "setup.py", tmp_path / ".venv/.deps"]
    for path in inputs:
        path.write_text("")
    settings = ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "FUSEDCLIP_SKIP_CUDA")
    settings += ("FUSEDCLIP_SKIP_EXT", "FUSEDCLIP_REQUIRE_CUDA", "MAKEFLAGS", "MFLAGS")
    env = {name: value for name, value in os.environ.items() if name not in settings}

    def builds(**changed) -> bool:
        command = [make, "-n", "build"]
        run = subprocess.run(command, cwd=tmp_path, env=env | changed, capture_output=True)
        assert run.returncode == 0, run.stderr
        return b"build_ext --inplace" in run.stdout

    assert builds(), "never built"
    stamp = tmp_path / "build" / ".extension"
    stamp.parent.mkdir(exist_ok=True)
    stamp.write_text("")
    past = time.time() - 100
    built = [*inputs, tmp_path / "build" / ".settings", stamp]
    for age, path in enumerate(path for path in built if path.exists()):
        os.utime(path, (past + age, past + age))  # each newer than what it depends on
    assert not builds(), "rebuilt with nothing changed"
    assert builds(TORCH_CUDA_ARCH_LIST="10.0")
    assert builds(CUDA_HOME=str(tmp_path / "cuda"))
    assert builds(FUSEDCLIP_SKIP_CUDA="1")


def _fake_toolkit(root):
    """A directory laid out like a CUDA toolkit, and a wrapper script that execs its nvcc."""
    toolkit = root / "cuda-99.9"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text(
        "#!/bin/sh\necho 'Cuda compilation tools, release 99.9'\n"
    )
    (toolkit / "bin" / "nvcc").chmod(0o755)
    wrappers = root / "wrappers" / "bin"
    wrappers.mkdir(parents=True)
    (wrappers / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrappers / "nvcc").chmod(0o755)
    return toolkit, wrappers


def test_setup_finds_the_toolkit_behind_a_wrapper_nvcc_on_path(tmp_path, monkeypatch):
    setup_module = _setup_module()
    toolkit, wrappers = _fake_toolkit(tmp_path)
    for variable in ("CUDA_HOME", "CUDA_PATH", "FUSEDCLIP_SKIP_CUDA"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}/usr/bin{os.pathsep}/bin")
    cuda_home, found_by = setup_module.find_cuda_home()
    assert cuda_home == str(toolkit), found_by
    assert str(wrappers / "nvcc") in found_by
    assert setup_module._nvcc_version(cuda_home) == "99.9"

    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    cuda_home, reason = setup_module.find_cuda_home()
    assert cuda_home is None and "is not a CUDA toolkit root" in reason
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_module.find_cuda_home()[0] == str(toolkit)
    monkeypatch.setenv("FUSEDCLIP_SKIP_CUDA", "1")
    assert setup_module.find_cuda_home() == (None, "FUSEDCLIP_SKIP_CUDA=1")


def test_the_default_arch_list_ends_in_ptx():
    assert _setup_module().DEFAULT_CUDA_ARCHS.endswith("+PTX")


def test_build_info_agrees_with_what_loaded():
    info = fusedclip.build_info()
    assert info.version == fusedclip.__version__
    assert info.torch_version == torch.__version__
    assert info.extension_loaded == (ops.EXTENSION_ERROR is None)
    assert set(info.backends) == set(dispatch.BACKEND_NAMES) - {"auto"}
    for name, reason in info.backends.items():
        assert reason == dispatch.unavailable_reason(name), name
        assert (reason is None) == (name in fusedclip.backends()), name
    record = build_info_module.read_build_record()
    if info.extension_loaded and record is not None:
        assert record["torch_version"] == torch.__version__
        assert ("cuda" in record["kernels"]) == ops.has_kernel("reduce", "CUDA")
    text = str(info)
    for name in info.backends:
        assert name in text


@pytest.mark.parametrize(
    "built, running, refused",
    [
        pytest.param("2.14.1+cu130", "2.14.1+cu130", False, id="same"),
        pytest.param("2.14.1+cu130", "2.14.1+cpu", False, id="same-release-other-wheel"),
        pytest.param("2.14.1", "2.13.0", True, id="older-torch"),
        pytest.param("2.14.1", "2.15.0.dev20260101", True, id="nightly"),
    ],
)
def test_torch_mismatch(built, running, refused):
    message = build_info_module.torch_mismatch({"torch_version": built}, running)
    assert (message is not None) == refused
    if refused:
        assert built in message and running in message and "--no-build-isolation" in message
    assert build_info_module.torch_mismatch(None, running) is None


@pytest.mark.parametrize(
    "kernels, running_cuda, refused",
    [
        pytest.param(["cpu", "cuda"], "13.0", False, id="same-cuda"),
        pytest.param(["cpu", "cuda"], "13.2", False, id="same-cuda-major"),
        pytest.param(["cpu", "cuda"], None, True, id="cuda-kernels-under-a-cpu-torch"),
        pytest.param(["cpu", "cuda"], "12.6", True, id="other-cuda-major"),
        pytest.param(["cpu"], None, False, id="cpu-kernels-under-a-cpu-torch"),
    ],
)
def test_torch_mismatch_of_the_cuda_kernels(kernels, running_cuda, refused):
    """The CUDA kernels link torch's CUDA libraries: an extension that has them, built under a
    CUDA 13 torch, was let into a +cpu or CUDA 12 torch of the same release (and then failed to
    load, or at the first launch, without the rebuild command)."""
    record = {"torch_version": "2.14.1+cu130", "torch_cuda_version": "13.0", "kernels": kernels}
    message = build_info_module.torch_mismatch(record, "2.14.1+x", running_cuda)
    assert (message is not None) == refused
    if refused:
        assert "CUDA 13.0" in message and build_info_module.REBUILD_HINT in message


def test_the_rebuild_command_leaves_the_installed_torch_alone(tmp_path):
    """The hint said `pip install --no-build-isolation --force-reinstall <checkout>`: that also
    reinstalls torch at its newest version after building against the old one, so the rebuilt
    extension is refused again. Its flags, in a dry run against no index, touch fusedclip alone
    (without --no-deps pip must look up torch, and fails here)."""
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
         "--report", str(tmp_path / "report.json"), *build_info_module.PIP_REBUILD_FLAGS, ROOT],
        env={**os.environ, "FUSEDCLIP_SKIP_EXT": "1"},
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    installs = [item["metadata"]["name"] for item in report["install"]]
    assert installs == ["fusedclip"]
    flags = " ".join(build_info_module.PIP_REBUILD_FLAGS)
    assert flags in build_info_module.REBUILD_HINT
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert f"pip install {flags}" in readme, "the README's rebuild command is not the hint's"


def test_the_cuda_backend_says_why_the_build_has_no_cuda_kernels(monkeypatch):
    """It said "built without a CUDA toolkit (set CUDA_HOME and rebuild)" for a build that had
    found one and skipped it on FUSEDCLIP_SKIP_CUDA=1, where CUDA_HOME alone changes nothing. The
    reason comes from the record read at import: traced, dispatch reads no file (a fullgraph
    compile of a CUDA clip then failed to trace the file read)."""
    monkeypatch.setattr(ops, "has_kernel", lambda op_name, dispatch_key: dispatch_key != "CUDA")
    monkeypatch.setattr(ops, "EXTENSION_ERROR", None)
    record = {"torch_version": torch.__version__, "kernels": ["cpu"]}
    for skipped in ("FUSEDCLIP_SKIP_CUDA=1", "no CUDA toolkit found (CUDA_HOME unset, ...)"):
        monkeypatch.setattr(ops, "BUILD_RECORD", record | {"cuda_skipped": skipped})
        reason = dispatch.unavailable_reason("cuda")
        assert skipped in reason and "without FUSEDCLIP_SKIP_CUDA=1" in reason, reason
        torch._dynamo.reset()
        traced = torch.compile(
            lambda x: (dispatch.unavailable_reason("cuda"), x + 1)[1], fullgraph=True
        )
        assert torch.equal(traced(torch.ones(2)), torch.full((2,), 2.0))


def test_an_extension_built_for_another_torch_is_refused_at_import(tmp_path):
    """A copy of the package whose build record names another torch: importing it warns, keeps
    the extension unloaded, and auto runs the fallback."""
    package = tmp_path / "fusedclip"
    shutil.copytree(
        os.path.dirname(fusedclip.__file__),
        package,
        ignore=shutil.ignore_patterns("__pycache__", build_info_module.BUILD_RECORD_NAME),
    )
    if not list(package.glob("_C*.so")):
        pytest.skip("the extension is not built here")
    build_info_module.write_build_record(
        str(package / build_info_module.BUILD_RECORD_NAME),
        {"torch_version": "2.0.0", "kernels": ["cpu"]},
    )
    script = textwrap.dedent(
        """
        import sys
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import fusedclip
        from fusedclip import ops
        assert fusedclip.__file__.startswith(sys.argv[1]), fusedclip.__file__
        print("ERROR:", ops.EXTENSION_ERROR)
        print("WARNINGS:", [str(w.message) for w in caught])
        print("BACKENDS:", fusedclip.backends())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    error_line, warning_line, backends_line = result.stdout.strip().splitlines()[-3:]
    assert "built against torch 2.0.0" in error_line and torch.__version__ in error_line
    assert "built against torch 2.0.0" in warning_line
    assert "'cpu'" not in backends_line


def test_auto_on_the_reference_warns_once_naming_how_to_build(monkeypatch):
    monkeypatch.setattr(ops, "has_kernel", lambda op_name, dispatch_key: False)
    # select() and extension_device_types() remember their choices
    monkeypatch.setattr(dispatch, "_selected", {})
    monkeypatch.setattr(dispatch, "_extension_device_types", {})
    dispatch._warn_reference_fallback.cache_clear()
    try:
        parameters = [torch.nn.Parameter(torch.randn(10)) for _ in range(2)]
        for parameter in parameters:
            parameter.grad = torch.randn(10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                fusedclip.clip_grad_norm_(parameters, 1.0)
        fallback = [w for w in caught if "float64 reference" in str(w.message)]
        assert len(fallback) == 1, [str(w.message) for w in caught]
        assert "pip install --no-build-isolation" in str(fallback[0].message)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fusedclip.clip_grad_norm_(parameters, 1.0, backend="reference")
        assert not caught, "an explicit reference backend is what was asked for"
    finally:
        dispatch._warn_reference_fallback.cache_clear()
