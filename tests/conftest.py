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


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """The suite's subprocesses (torchrun's log folders, scripts' temporary files) write their
    temporary files under pytest's own folder, which pytest prunes, not into /tmp for good."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess_tmp"))
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old


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


def timeline_memory(fn):
    """(peak live bytes, largest single allocation) of the tensors ``fn`` allocates, from
    the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    cur = peak = big = 0
    for _, action, _, size in p._memory_profile().timeline:
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            cur += size
            big = max(big, size)
        elif name == "DESTROY":
            cur -= size
        peak = max(peak, cur)
    return peak, big


def run_rows(run) -> list:
    """metrics.jsonl of the run folder ``run`` without the wall-clock timings (``time/*``,
    ``tokens_per*``, ``step_time``), for tests that compare two runs record by record."""
    import json

    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per", "step_time"))}
                for ln in f]


def save_tiny_model(folder) -> str:
    """A tiny Llama (h=32, one layer) and its locally trained tokenizer saved to ``folder`` (what
    `rlhf-fast sft` leaves in final/); returns the folder as a string."""
    from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer

    d = str(folder)
    tok = train_tokenizer(sample_texts(), 256)
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
