"""What this fusedclip was built with, which backends run here, and why the others do not.

`setup.py` writes `_build.json` beside the extension when it builds it (torch and CUDA versions,
archs, which kernels); `build_info()` reads it back together with what the running process sees.
`print(fusedclip.build_info())` is the readable report. This module imports only torch, so that
`fusedclip.ops` can use it before the extension loads and `setup.py` can load it by path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import torch

BUILD_RECORD_NAME = "_build.json"
BUILD_RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILD_RECORD_NAME)
# How a user rebuilds the extension against the torch installed in their environment: pip's
# flags (--no-deps: --force-reinstall alone reinstalls torch too, at its newest version, after
# building against the old one), or in a checkout built in place, setup.py.
PIP_REBUILD_FLAGS = ("--no-build-isolation", "--no-deps", "--force-reinstall")
REBUILD_HINT = (
    "rebuild it against this torch: pip install "
    f"{' '.join(PIP_REBUILD_FLAGS)} <fusedclip checkout or fusedclip-*.tar.gz>, or in a "
    "checkout built in place, python setup.py build_ext --inplace"
)


def write_build_record(path: str, record: dict) -> None:
    """Used by setup.py: what the build produced, for build_info() and the import-time check."""
    with open(path, "w") as file:
        json.dump(record, file, indent=1, sort_keys=True)
        file.write("\n")


def read_build_record(path: str = BUILD_RECORD_PATH) -> dict | None:
    """The record of the last extension build, or None when there is none (no extension built,
    or built by a setup.py older than the record)."""
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return None


def _release(version: str) -> str:
    # "2.14.1+cu130" and "2.14.1+cpu" are the same C++ API; the local label names the wheel flavour.
    return version.split("+", 1)[0]


def _cuda_major(version: str | None) -> str | None:
    return None if version is None else version.split(".", 1)[0]


_NOT_GIVEN = object()


def torch_mismatch(
    record: dict | None, running_version: str | None = None, running_cuda=_NOT_GIVEN
) -> str | None:
    """None when the extension was built against the running torch (or nothing is recorded), else
    the message that says which torch it was built with and how to rebuild. `running_version`,
    `running_cuda`: torch.__version__ and torch.version.cuda unless given (tests)."""
    running_version = torch.__version__ if running_version is None else running_version
    running_cuda = torch.version.cuda if running_cuda is _NOT_GIVEN else running_cuda
    if record is None or "torch_version" not in record:
        return None
    built_version = record["torch_version"]
    if _release(built_version) != _release(running_version):
        return (
            f"it was built against torch {built_version}, but torch {running_version} is running "
            f"(a C++ extension only loads safely into the torch it was compiled for); "
            f"{REBUILD_HINT}"
        )
    # The CUDA kernels link torch's CUDA libraries, of the CUDA major version torch was built with.
    built_cuda = record.get("torch_cuda_version")
    if "cuda" in record.get("kernels", ()) and _cuda_major(built_cuda) != _cuda_major(running_cuda):
        running = f"CUDA {running_cuda}" if running_cuda else "no CUDA"
        return (
            f"its CUDA kernels were built against torch {built_version} (CUDA {built_cuda}), but "
            f"torch {running_version} ({running}) is running; {REBUILD_HINT}"
        )
    return None


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What `fusedclip.build_info()` returns. `backends` maps every backend name to None when it
    can run here, else to the reason it cannot."""

    version: str
    torch_version: str
    torch_cuda_version: str | None
    cuda_available: bool
    extension_loaded: bool
    extension_error: str | None
    built_with: dict | None
    backends: dict[str, str | None]

    def __str__(self) -> str:
        lines = [
            f"fusedclip {self.version} under torch {self.torch_version} "
            f"(CUDA {self.torch_cuda_version or 'none'}; "
            f"{'a' if self.cuda_available else 'no'} CUDA device available)"
        ]
        if self.extension_loaded:
            lines.append("extension: loaded")
        else:
            lines.append(f"extension: not loaded: {self.extension_error}")
        if self.built_with is not None:
            built = self.built_with
            kernels = " + ".join(kernel.upper() for kernel in built.get("kernels", []))
            lines.append(f"  built with torch {built.get('torch_version')}: {kernels} kernels")
            if "cuda" in built.get("kernels", []):
                lines.append(
                    f"  CUDA {built.get('cuda_version')} at {built.get('cuda_home')}, "
                    f"archs {built.get('cuda_archs')}"
                )
            elif built.get("cuda_skipped"):
                lines.append(f"  no CUDA kernels: {built['cuda_skipped']}")
        lines.append("backends:")
        for name, reason in self.backends.items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'no: ' + reason}")
        return "\n".join(lines)


def build_info() -> BuildInfo:
    """What the extension was built with (torch, CUDA, archs, kernels), whether it loaded, and
    for each backend whether it can run here or why not. Print it for a readable report."""
    from fusedclip import dispatch, ops
    from fusedclip._version import __version__

    return BuildInfo(
        version=__version__,
        torch_version=torch.__version__,
        torch_cuda_version=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        extension_loaded=ops.EXTENSION_ERROR is None,
        extension_error=ops.EXTENSION_ERROR,
        # A record left beside no extension (removed by hand) describes nothing that is here.
        built_with=ops.BUILD_RECORD if importlib.util.find_spec("fusedclip._C") else None,
        backends={name: dispatch.unavailable_reason(name) for name in dispatch.BACKEND_NAMES[1:]},
    )
