"""Builds fusedclip._C: the CPU kernels always, the CUDA kernels whenever a CUDA toolkit is found.

The build never asks whether a GPU is present. The toolkit is `CUDA_HOME` (or `CUDA_PATH`), else
the one behind the `nvcc` on PATH (a wrapper script that execs the real compiler counts: its
target's bin/.. is the root), else /usr/local/cuda. Archs: `TORCH_CUDA_ARCH_LIST`, else
DEFAULT_CUDA_ARCHS (ending in +PTX, so GPUs newer than the list JIT the kernels).

FUSEDCLIP_SKIP_EXT=1 skips the extension (the package then runs on the reference and Triton
backends); FUSEDCLIP_SKIP_CUDA=1 builds the CPU kernels alone. FUSEDCLIP_REQUIRE_CUDA=1 turns a missing toolkit into an error instead of a CPU-only
build (CI sets it, so CUDA code that does not compile never lands).

What was built is written to fusedclip/_build.json beside the extension (pip hides a successful
build's output): `fusedclip.build_info()` reports it, and importing fusedclip under another torch
than the one recorded there refuses the extension with a message.
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# The sources are C++20 (std::erase_if, templated lambdas): torch 2.14's cpp_extension passes
# -std=c++20 unless told otherwise, torch 2.11's -std=c++17, which does not compile them.
CXX_STANDARD = "-std=c++20"


def _load_build_info_module():
    """fusedclip/build_info.py by path: importing the package would load the extension."""
    spec = importlib.util.spec_from_file_location(
        "_fusedclip_build_info", os.path.join(ROOT, "fusedclip", "build_info.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _usable_cuda_home(candidate):
    return bool(candidate) and all(
        os.path.exists(os.path.join(candidate, part))
        for part in ("bin/nvcc", "include/cuda_runtime.h")
    )


def _nvcc_target(nvcc_path):
    """The real compiler behind `nvcc_path`: itself, or the `.../bin/nvcc` a wrapper script execs."""
    with open(nvcc_path, "rb") as file:
        head = file.read(4096)
    if head.startswith(b"#!"):
        match = re.search(rb"(/[^\s\"']*/bin/nvcc)\b", head)
        if match:
            return os.path.realpath(match.group(1).decode())
    return os.path.realpath(nvcc_path)


def find_cuda_home():
    """(toolkit root or None, how it was found or why none was)."""
    if os.environ.get("FUSEDCLIP_SKIP_CUDA") == "1":
        return None, "FUSEDCLIP_SKIP_CUDA=1"
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        explicit = os.environ.get(variable)
        if explicit:
            if _usable_cuda_home(explicit):
                return explicit, f"{variable}={explicit}"
            return None, (
                f"{variable}={explicit} is not a CUDA toolkit root (needs bin/nvcc and "
                "include/cuda_runtime.h)"
            )
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        root = os.path.dirname(os.path.dirname(_nvcc_target(nvcc_on_path)))
        if _usable_cuda_home(root):
            return root, f"nvcc on PATH ({nvcc_on_path})"
        return None, f"the nvcc on PATH ({nvcc_on_path}) is not inside a CUDA toolkit ({root})"
    if _usable_cuda_home("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA toolkit found (CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda)"


def _nvcc_version(cuda_home):
    output = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    match = re.search(r"release (\d+\.\d+)", output)
    return match.group(1) if match else None


def _extensions():
    if os.environ.get("FUSEDCLIP_SKIP_EXT") == "1":
        return [], {}
    cuda_home, cuda_found_by = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    build_info = _load_build_info_module()
    cpu_sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc/include")]
    # at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp it compiles
    # to a serial loop. The extension then shares the libgomp that torch has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", CXX_STANDARD, *openmp]
    record = {"torch_version": torch.__version__, "torch_cuda_version": torch.version.cuda}
    if cuda_home and cuda_sources:
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        extension = cpp_extension.CUDAExtension(
            "fusedclip._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", CXX_STANDARD, "-lineinfo"],
            },
            extra_link_args=openmp,
        )
        record.update(
            kernels=["cpu", "cuda"],
            cuda_home=cuda_home,
            cuda_found_by=cuda_found_by,
            cuda_version=_nvcc_version(cuda_home),
            cuda_archs=os.environ["TORCH_CUDA_ARCH_LIST"],
        )
        summary = (
            f"fusedclip: built the CPU and CUDA kernels (CUDA {record['cuda_version']} from "
            f"{cuda_found_by}, archs {record['cuda_archs']}) against torch {torch.__version__}"
        )
    else:
        if os.environ.get("FUSEDCLIP_REQUIRE_CUDA") == "1":
            raise RuntimeError(
                f"FUSEDCLIP_REQUIRE_CUDA=1 but {cuda_found_by}; set CUDA_HOME to the toolkit root"
            )
        extension = cpp_extension.CppExtension(
            "fusedclip._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
        record.update(kernels=["cpu"], cuda_skipped=cuda_found_by)
        summary = (
            f"fusedclip: built the CPU kernels only ({cuda_found_by}) against torch "
            f"{torch.__version__}; CUDA_HOME naming a CUDA toolkit builds the CUDA kernels too"
        )

    class BuildExtensionWithRecord(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Writes what it built beside the extension (in place or into the wheel's tree)."""

        def run(self):
            super().run()
            extension_dir = os.path.dirname(self.get_ext_fullpath("fusedclip._C"))
            build_info.write_build_record(
                os.path.join(extension_dir, build_info.BUILD_RECORD_NAME), record
            )
            print(summary, file=sys.stderr)

    return [extension], {"build_ext": BuildExtensionWithRecord}


# setuptools (setup.py, pip, build) runs this file as __main__; tests import its helpers.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
