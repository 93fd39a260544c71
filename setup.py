"""Builds fusedclip._C: the CPU kernels always, the CUDA kernels whenever a CUDA toolkit is found.

The build never asks whether a GPU is present. FUSEDCLIP_SKIP_EXT=1 skips the extension (the
package then runs on the reference and Triton backends). FUSEDCLIP_REQUIRE_CUDA=1 turns a missing
toolkit into an error instead of a CPU-only build (CI sets it, so CUDA code that does not compile
never lands).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _usable_cuda_home(candidate):
    return bool(candidate) and all(
        os.path.exists(os.path.join(candidate, part))
        for part in ("bin/nvcc", "include/cuda_runtime.h")
    )


def _extensions():
    if os.environ.get("FUSEDCLIP_SKIP_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension

    cpu_sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc/include")]
    # at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp it compiles
    # to a serial loop. The extension then shares the libgomp that torch has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", *openmp]
    # cpp_extension reads CUDA_HOME (or guesses from nvcc on PATH) when imported.
    cuda_home = cpp_extension.CUDA_HOME
    if _usable_cuda_home(cuda_home) and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extension = cpp_extension.CUDAExtension(
            "fusedclip._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo"],
            },
            extra_link_args=openmp,
        )
        print(f"fusedclip: building CPU and CUDA kernels with CUDA_HOME={cuda_home}", file=sys.stderr)
    else:
        if os.environ.get("FUSEDCLIP_REQUIRE_CUDA") == "1":
            raise RuntimeError(
                f"FUSEDCLIP_REQUIRE_CUDA=1 but CUDA_HOME={cuda_home!r} is not a CUDA toolkit root "
                "(needs bin/nvcc and include/cuda_runtime.h); set CUDA_HOME to the toolkit root"
            )
        extension = cpp_extension.CppExtension(
            "fusedclip._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
        print("fusedclip: no CUDA toolkit found, building the CPU kernels alone", file=sys.stderr)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
