"""The Triton kernels compile for an H100 (sm_90) through the real Triton compiler and
ptxas, on a machine without a GPU: the interpreter skips type checking, layouts and
register allocation, so this catches what it cannot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia as nv

        return (Path(nv.__file__).parent / "bin" / "ptxas").exists()
    except Exception:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, str(HERE / "_compile_sm90.py"), "--bf16"], env=env, capture_output=True,
                       text=True, timeout=600, cwd=HERE.parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") >= 20, r.stdout
