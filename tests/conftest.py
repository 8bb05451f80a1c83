import os

import pytest
import torch

# Keep the suite deterministic and light on the 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matmuls run faster without OpenMP wake-ups on a
    shared 2-core machine (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """:func:`one_thread` for a whole module (``pytestmark =
    pytest.mark.usefixtures("one_thread_per_module")``): its module-scoped fixtures (tiny
    models, tokenizers) are built on one thread too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def live_cpu_backends():
    """The backends that can run CPU tensors here (always 'torch'; 'cpp' when built)."""
    from rlhf_fast.ops import _dispatch

    out = ["torch"]
    if _dispatch.backend_available("cpp")[0]:
        out.append("cpp")
    return out
