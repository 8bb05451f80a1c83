"""nvcc flags shared by setup.py and `make check-cuda`, so the check compiles exactly
what the extension would."""

import os


def cuda_arch_flags():
    archs = os.environ.get("RLHF_FAST_CUDA_ARCHS", "80;90").split(";")
    out = []
    for a in archs:
        a = a.strip()
        if a:
            out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def nvcc_flags():
    return [
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "--use_fast_math",
        "-DNDEBUG",
        "-DRLHF_FAST_WITH_CUDA",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + cuda_arch_flags()
