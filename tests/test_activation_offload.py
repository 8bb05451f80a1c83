"""Activation offloading (TRL's ``activation_offloading``; rlhf_fast.models.activation_offload).

On the CPU nothing is offloaded (no accelerator), so most tests inject the "lives on an
accelerator" predicate (``offloadable=everywhere``, or ``on_accelerator`` patched for the
trainers): every CPU tensor then counts as offloadable, and the hooks replace it by a host copy,
which the backward reads instead of the tensor itself. A :class:`Probe` sees which one it got.
"""

import contextlib
import warnings

import pytest
import torch
from torch import nn

from rlhf_fast.models import activation_offload as ao
from rlhf_fast.models.activation_offload import activation_offloading, keep_on_device
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_trainer_common import untimed_metrics

TINY = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def everywhere(t: torch.Tensor) -> bool:
    """The fake accelerator: every tensor counts as offloadable (CPU tensors included)."""
    return True


class Probe(torch.autograd.Function):
    """Saves ``x`` for the backward, which puts ``(offloaded, tensor it got back)`` into
    ``log[key]``: offloaded when that tensor is a copy (another data pointer), not ``x`` itself."""

    @staticmethod
    def forward(ctx, x, log, key):
        ctx.save_for_backward(x)
        ctx.log, ctx.key, ctx.ptr = log, key, x.data_ptr()
        return x.detach().clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.log[ctx.key] = (x.data_ptr() != ctx.ptr, x)
        return g, None, None


def went_out(tensors, off):
    """{i: whether ``off`` sent tensors[i] to the host}, from one forward and backward."""
    log = {}
    leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in tensors]
    with off:
        out = sum(Probe.apply(t, log, i).sum() for i, t in enumerate(leaves))
        out.backward()
    return {i: log[i][0] for i in range(len(leaves))}


# ----------------------------------------------------------------------------- what is offloaded


def test_size_threshold_in_bytes():
    """TRL's rule: a tensor of fewer than min_offload_size bytes (1024 by default) stays."""
    m = nn.Linear(2, 2)
    bf16 = torch.bfloat16
    ts = [torch.randn(255), torch.randn(256), torch.randn(512, dtype=bf16), torch.randn(255, dtype=bf16)]  # bytes:
    # 1020, 1024, 1024, 510
    assert went_out(ts, activation_offloading(m, offloadable=everywhere)) == {0: False, 1: True, 2: True, 3: False}
    assert went_out(ts, activation_offloading(m, offloadable=everywhere, min_offload_size=0)) == \
        {0: True, 1: True, 2: True, 3: True}
    assert not any(went_out(ts, activation_offloading(m, offloadable=everywhere, min_offload_size=1 << 20)).values())


def test_cpu_tensors_stay_by_default():
    """The default predicate: nothing on the CPU (nor on meta) is an accelerator tensor."""
    m = nn.Linear(2, 2)
    off = activation_offloading(m)
    assert not any(went_out([torch.randn(4096)], off).values())
    assert off.offloaded == 0 and off.kept == 1
    assert not ao.offloads_on(torch.device("cpu")) and not ao.offloads_on(torch.device("meta"))
    assert ao.on_accelerator(torch.empty(4, device="meta")) is False


def test_weights_and_their_views_stay():
    """Parameters, views of them (a Linear saves ``weight.t()``) and buffers are on the device
    anyway: kept (TRL skips parameters and their storages). A copy of a weight is an activation."""
    m = nn.Linear(64, 64)
    m.register_buffer("table", torch.randn(64, 64))
    w = m.weight
    ts = [w, w.t(), w[3:], m.table, m.table.t(), w.detach().clone(), w * 2]
    got = went_out(ts, activation_offloading(m, offloadable=everywhere))
    assert got == {0: False, 1: False, 2: False, 3: False, 4: False, 5: True, 6: True}
    # and in a real op: the Linear's saved weight stays, its input goes
    off = activation_offloading(m, offloadable=everywhere)
    x = torch.randn(32, 64, requires_grad=True)
    with off:
        m(x).square().sum().backward()
    assert off.offloaded == 2 and off.kept == 1  # x and the Linear's output (square's input) went; weight.t() kept


class _Head(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.proj, self.log = nn.Linear(16, 16), log

    def forward(self, h):
        return self.proj(Probe.apply(h, self.log, "head"))


class _Toy(nn.Module):
    """A body and an LM head that is called as a module (TRL's case): only the body's saved
    tensors may leave."""

    def __init__(self, log, head_name="lm_head"):
        super().__init__()
        self.body = nn.Linear(16, 16)
        setattr(self, head_name, _Head(log))
        self.head_name, self.log = head_name, log

    def get_output_embeddings(self):
        return self.lm_head if self.head_name == "lm_head" else None

    def forward(self, x):
        h = Probe.apply(self.body(x), self.log, "body")
        out = getattr(self, self.head_name)(h)
        return Probe.apply(out, self.log, "after")


@pytest.mark.parametrize("head_name", ["lm_head", "score"])
def test_output_head_stays(head_name):
    """The output head's forward is a keep-on-device region (TRL's NoOpManager on model.lm_head),
    found through get_output_embeddings(), or a reward model's score head; the region ends with
    the head's forward: what the body saves before it and the model after it is offloaded."""
    log = {}
    toy = _Toy(log, head_name)
    off = activation_offloading(toy, offloadable=everywhere)
    with off:
        toy(torch.randn(32, 16)).sum().backward()
    assert {k: v[0] for k, v in log.items()} == {"body": True, "head": False, "after": True}
    assert ao._keep_depth() == 0
    # x (the body Linear's input), the body's output and the head's output (the Probes' inputs)
    # went; inside the head, its Probe's input and its Linear's input and weight.t() stayed
    assert off.offloaded == 3 and off.kept == 3


def test_head_region_closes_on_error():
    """An exception inside the head leaves no keep-on-device region open."""
    log = {}
    toy = _Toy(log)

    def boom(*_):
        raise RuntimeError("boom")

    toy.lm_head.register_forward_hook(boom, prepend=True)
    off = activation_offloading(toy, offloadable=everywhere)
    with pytest.raises(RuntimeError, match="boom"), off:
        toy(torch.randn(32, 16))
    assert ao._keep_depth() == 0


def test_keep_on_device_region():
    """keep_on_device(): kept inside, offloaded again after; a no-op without offloading."""
    off = activation_offloading(nn.Linear(2, 2), offloadable=everywhere)
    a, b = (torch.randn(1024, requires_grad=True) for _ in range(2))
    log = {}
    with off:
        with keep_on_device():
            ya = Probe.apply(a, log, "a")
        yb = Probe.apply(b, log, "b")
        (ya.sum() + yb.sum()).backward()
    assert not log["a"][0] and log["b"][0]
    with keep_on_device():  # no offloading active: nothing happens
        assert ao._keep_depth() == 1
    assert ao._keep_depth() == 0


def test_layouts_come_back():
    """Values bit for bit; a dense tensor (a transpose too) keeps its strides; a slice with gaps
    comes back contiguous (as TRL); a broadcast view stays (its copy would be bigger)."""
    base = torch.randn(64, 48)
    ts = [base.t(), base[:, 5:30], torch.randn(1, 48).expand(64, 48), torch.randn(4, 8, 16).permute(2, 0, 1)]
    leaves = [t.detach().requires_grad_() for t in ts]
    log = {}
    with activation_offloading(nn.Linear(2, 2), offloadable=everywhere):
        sum(Probe.apply(t, log, i).sum() for i, t in enumerate(leaves)).backward()
    back = {i: x for i, (_, x) in log.items()}
    assert {i: went for i, (went, _) in log.items()} == {0: True, 1: True, 2: False, 3: True}
    for i, t in enumerate(leaves):
        assert torch.equal(back[i], t) and back[i].dtype == t.dtype
    assert back[0].stride() == leaves[0].stride() and back[3].stride() == leaves[3].stride()
    assert back[1].is_contiguous()


def test_bad_arguments():
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="model"):
        activation_offloading("model")
    for bad in (-1, 1.5, True, "1024"):
        with pytest.raises(ValueError, match="min_offload_size"):
            activation_offloading(m, min_offload_size=bad)
    with pytest.raises(TypeError, match="pin_memory"):
        activation_offloading(m, pin_memory=1)
    with pytest.raises(TypeError, match="offloadable"):
        activation_offloading(m, offloadable=True)


# ----------------------------------------------------------------------------- a model's backward


def _tiny(checkpointing: bool):
    from rlhf_fast.models.loading import enable_activation_checkpointing
    from rlhf_fast.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(97, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def _grads(model, ids, off):
    from rlhf_fast.models.logprobs import sequence_logprobs

    model.zero_grad(set_to_none=True)
    with off:
        logp = sequence_logprobs(model, ids, torch.ones_like(ids))
        packed = getattr(off, "offloaded", 0)
        (-logp.sum()).backward()
    assert getattr(off, "offloaded", 0) == packed  # nothing is packed in the backward
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_unchanged(checkpointing):
    """A tiny Llama's gradients through the fused log-probs equal bit for bit with every saved
    activation going through the host; with activation checkpointing too, where the blocks save
    only their inputs (offloaded) and the backward's recomputation is not offloaded again."""
    model = _tiny(checkpointing)
    ids = torch.randint(4, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    want = _grads(model, ids, contextlib.nullcontext())
    off = activation_offloading(model, offloadable=everywhere)
    got = _grads(model, ids, off)
    assert off.offloaded > 0
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    if checkpointing:  # fewer saved tensors than without checkpointing: the blocks' inputs only
        plain = activation_offloading(_tiny(False), offloadable=everywhere)
        _grads(plain.model, ids, plain)
        assert off.offloaded < plain.offloaded


def test_fused_head_saves_stay():
    """The fused LM head (which never calls the head module) saves the final hidden rows: they
    stay, as TRL keeps its output head's."""
    from rlhf_fast.models.logprobs import head_token_stats

    h = torch.randn(40, 32, requires_grad=True)
    w = nn.Parameter(torch.randn(97, 32))
    labels = torch.randint(0, 97, (40,))
    seen = []
    off = activation_offloading(nn.Linear(2, 2), offloadable=lambda t: seen.append(t.shape) is None)
    with off:
        head_token_stats(h, w, None, labels).sum().backward()
    assert off.offloaded == 0 and not seen


# ----------------------------------------------------------------------------- the trainers


from tests.test_offline_metrics import pref_tok, sft_tok  # noqa: E402,F401 (the trainers' tokenizers, fixtures)


COMMON = dict(model=TINY, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0, log_every=1, max_len=32, max_steps=2,
              device="cpu")


def _sft(tmp_path, tok, name, **kw):
    cfg = SFTConfig(output_dir=str(tmp_path / name), grad_accum=2, **COMMON, **kw)
    return SFTTrainer(cfg, train_records=synthetic_sft_records(16), eval_records=[], tokenizer=tok)


def _dpo(tmp_path, tok, name, **kw):
    cfg = DPOConfig(output_dir=str(tmp_path / name), grad_accum=2, **COMMON, **kw)
    return DPOTrainer(cfg, train_records=synthetic_preference_records(16, seed=1), eval_records=[], tokenizer=tok)


def _reward(tmp_path, tok, name, **kw):
    cfg = RewardConfig(output_dir=str(tmp_path / name), **COMMON, **kw)
    return RewardTrainer(cfg, train_records=synthetic_preference_records(16, seed=1), eval_records=[], tokenizer=tok)


def _kto(tmp_path, tok, name, **kw):
    cfg = KTOConfig(output_dir=str(tmp_path / name), **COMMON, **kw)
    return KTOTrainer(cfg, train_records=synthetic_preference_records(8, seed=1), eval_records=[], tokenizer=tok)


TRAINERS = {"sft": (_sft, "sft_tok"), "dpo": (_dpo, "pref_tok"), "reward": (_reward, "pref_tok"),
            "kto": (_kto, "pref_tok")}


@pytest.mark.parametrize("kind, checkpointing", [("sft", False), ("sft", True), ("dpo", False), ("dpo", True),
                                                 ("reward", False), ("kto", False)])
def test_trainer_steps_unchanged(tmp_path, request, monkeypatch, kind, checkpointing):
    """Two steps with activation_offloading (every CPU tensor treated as an accelerator's) log the
    same metrics.jsonl, bit for bit, as without; and the hooks did run (tensors went out)."""
    make, tok = TRAINERS[kind]
    tok = request.getfixturevalue(tok)
    plain = make(tmp_path, tok, "plain", gradient_checkpointing=checkpointing)
    plain.train()
    monkeypatch.setattr(ao, "on_accelerator", everywhere)
    tr = make(tmp_path, tok, "offload", gradient_checkpointing=checkpointing, activation_offloading=True)
    tr.train()
    assert isinstance(tr._activation_offload, ao.ActivationOffload) and tr._activation_offload.offloaded > 0
    assert untimed_metrics(str(tmp_path / "offload")) == untimed_metrics(str(tmp_path / "plain"))
    for a, b in zip(plain.model.parameters(), tr.model.parameters()):
        assert torch.equal(a, b)


def test_cpu_run_warns_once_and_changes_nothing(tmp_path, sft_tok):
    """On the CPU the option is accepted and does nothing, with one warning for the run (TRL's
    trainers fail there: torch.accelerator.current_accelerator() is None)."""
    plain = _sft(tmp_path, sft_tok, "plain")
    plain.train()
    tr = _sft(tmp_path, sft_tok, "on", activation_offloading=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr.train()
    msgs = [str(x.message) for x in w if "activation_offloading" in str(x.message)]
    assert len(msgs) == 1 and "does nothing on device cpu" in msgs[0]
    assert untimed_metrics(str(tmp_path / "on")) == untimed_metrics(str(tmp_path / "plain"))


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, DPOConfig, KTOConfig])
def test_config_key(cls):
    assert cls().activation_offloading is False
    assert cls(activation_offloading=True).activation_offloading is True
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="activation_offloading must be true or false"):
            cls(activation_offloading=bad)


def test_config_from_the_command_line():
    from rlhf_fast.trainers.config import load_config

    cfg = load_config(SFTConfig, None, ["--activation_offloading", "true"])
    assert cfg.activation_offloading is True


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
def test_cuda_peak_memory_drops_and_gradients_equal():
    """On a GPU: a small Llama's forward + backward (activations dominate: T = 1024, 8 layers)
    peaks at under a third of the activation memory with offloading, with equal gradients."""
    from rlhf_fast.models.logprobs import sequence_logprobs
    from rlhf_fast.models.tiny import tiny_causal_lm

    dev = torch.device("cuda")
    model = tiny_causal_lm(512, hidden_size=128, num_layers=8, num_heads=4, max_position_embeddings=1024,
                           seed=0).to(dev).train()
    ids = torch.randint(4, 512, (8, 1024), device=dev, generator=torch.Generator(dev).manual_seed(0))

    def run(ctx):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with ctx:
            (-sequence_logprobs(model, ids, torch.ones_like(ids)).sum()).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, {n: p.grad.clone() for n, p in model.named_parameters()}

    _, first = run(contextlib.nullcontext())  # also the warm-up (kernels, workspaces)
    peak_plain, want = run(contextlib.nullcontext())
    off = activation_offloading(model)
    peak_off, got = run(off)
    assert off.offloaded > 0
    if all(torch.equal(first[k], want[k]) for k in want):  # a deterministic backward: bit for bit
        assert all(torch.equal(want[k], got[k]) for k in want)
    else:  # (an attention backward that accumulates atomically differs between any two runs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert peak_off < peak_plain / 3, (peak_off, peak_plain)
