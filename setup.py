"""Builds the Torch extension rlhf_fast._C from csrc/.

The CPU sources are always built. The CUDA sources (csrc/cuda/*.cu) are added when
torch was built with CUDA and nvcc is found (or RLHF_FAST_FORCE_CUDA=1).
RLHF_FAST_NO_EXT=1 skips the extension entirely (pure-PyTorch reference only).
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("RLHF_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    have_nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    with_cuda = os.environ.get("RLHF_FAST_FORCE_CUDA") == "1" or (torch.version.cuda is not None and have_nvcc)
    # -fno-trapping-math: lets GCC if-convert the clamps and selects of the branch-free exp loops
    # (csrc/cpu/*.cpp) and vectorise them; it changes no result, only assumes FP exceptions are
    # not inspected (sampling's exp pass: 142 -> 34 us for V = 32768 with SSE2 alone)
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
    if os.environ.get("RLHF_FAST_NATIVE_ARCH", "0") == "1":
        cxx.append("-march=native")
    if with_cuda and cuda_sources:
        from csrc_flags import nvcc_flags  # noqa: E402  (csrc_flags.py sits beside setup.py)

        ext = CUDAExtension(
            "rlhf_fast._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DRLHF_FAST_WITH_CUDA"], "nvcc": nvcc_flags()},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("rlhf_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "rlhf_fast",
        "rlhf_fast.ops",
        "rlhf_fast.models",
        "rlhf_fast.rollout",
        "rlhf_fast.algorithms",
        "rlhf_fast.feedback",
        "rlhf_fast.trainers",
        "rlhf_fast.data",
        "rlhf_fast.kernels",
        "rlhf_fast.benchmarks",
        "rlhf_fast.demo",
    ],
    # The Triton sources are rlhf_fast/kernels/, not a top-level kernels/: transformers (5.2x)
    # depends on Hugging Face's `kernels` package, and a kernels/ folder at the repository root
    # shadows it for anything run from there (tests, `python -m rlhf_fast.cli`).
    # benchmarks/ ships as rlhf_fast.benchmarks so that `rlhf-fast bench` works from a wheel.
    package_dir={"rlhf_fast.benchmarks": "benchmarks"},
    package_data={"rlhf_fast.data": ["*.txt", "*.jsonl", "*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
