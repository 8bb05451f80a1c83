"""Compile every csrc/cuda/*.cu to an object file with the flags setup.py gives nvcc, so CUDA
code cannot rot on machines without a GPU. Skips (exit 0, with a note) when nvcc is absent."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csrc_flags import nvcc_flags  # noqa: E402


def main() -> int:
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        print("check-cuda: no CUDA sources")
        return 0
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
    if not nvcc or not os.path.exists(nvcc):
        print("check-cuda: nvcc not found, skipped")
        return 0
    from torch.utils.cpp_extension import include_paths

    incs = []
    for p in include_paths() + [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]:
        incs += ["-I", p]
    failed = 0
    # one nvcc per source in parallel: each is single-threaded and takes minutes (two archs)
    jobs = max(1, min(len(sources), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        def compile_one(src):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-Xcompiler", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=1"] + nvcc_flags() + incs
            return src, subprocess.run(cmd, capture_output=True, text=True)

        for src, r in pool.map(compile_one, sources):
            status = "ok" if r.returncode == 0 else "FAILED"
            print(f"check-cuda: {os.path.relpath(src, ROOT)} {status}")
            if r.returncode != 0:
                failed += 1
                print(r.stderr[-4000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
