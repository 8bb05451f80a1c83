"""Triton kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by
`make test` before Python starts), or on a GPU. Without Triton the directory is skipped."""

import os

import pytest
import torch

try:
    import triton  # noqa: F401

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    _HAVE_TRITON = False

# Without Triton, or without a device Triton can run on, collect nothing here.
if not _HAVE_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def triton_backend():
    """Force the triton backend for the public ops inside the test."""
    from rlhf_fast import ops

    with ops.use_backend("triton"):
        yield


def device() -> torch.device:
    """Where the kernels run: the GPU when present, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close_to_oracle(ours, low_prec_ref, oracle, *, factor=2.0, atol=1e-5, what=""):
    """flash-attn's rule: our error against an fp32/fp64 oracle is at most ``factor`` times
    the error of PyTorch's own low-precision computation on the same input, plus ``atol``."""
    ours, low_prec_ref, oracle = (t.detach().double() for t in (ours, low_prec_ref, oracle))
    err = (ours - oracle).abs().max().item()
    ref_err = (low_prec_ref - oracle).abs().max().item()
    assert err <= factor * ref_err + atol, f"{what}: error {err:.3g} > {factor}·{ref_err:.3g} + {atol:g}"
