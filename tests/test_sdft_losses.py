"""SDFT's pure pieces against TRL 1.16's experimental SDFT (trl/experimental/sdft): the loss
functions of loss_utils.py (three modes, alpha 0 / 0.5 / 1, tail bucket, IS clipping), the chunked
hidden-state loss against them, the teacher prompt (_compose_teacher_prompt) and the EMA update
(SyncRefModelCallback._sync_target_model) bit for bit."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.sdft import loss_utils as trl_lu  # noqa: E402
from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder  # noqa: E402
from trl.trainer.callbacks import SyncRefModelCallback  # noqa: E402

from rlhf_fast.algorithms import self_distillation as sd  # noqa: E402
from rlhf_fast.trainers.sdft import compose_teacher_prompt, ema_update  # noqa: E402

CASES = [("topk_logits", 0.0, False), ("topk_logits", 0.5, False), ("topk_logits", 1.0, True),
         ("topk_logits", 0.5, True), ("full_logits", 0.0, False), ("full_logits", 0.5, False),
         ("full_logits", 1.0, False), ("sampled_token", 1.0, False)]


def trl_token_loss(zs, zt, tokens, mode, alpha, tail, k, old=None, clip=None):
    """TRL's per-token loss (sdft_trainer.py _compute_self_distillation_loss before masking)."""
    if mode == "topk_logits":
        out = trl_lu.compute_topk_self_distillation_loss(zs, zt, distillation_topk=k, distillation_alpha=alpha,
                                                         distillation_add_tail=tail)
    elif mode == "full_logits":
        out = trl_lu.compute_full_logit_self_distillation_loss(zs, zt, distillation_alpha=alpha)
    else:
        out = trl_lu.compute_sampled_token_self_distillation_loss(zs, zt, tokens, distillation_alpha=alpha)
    if clip is not None and old is not None:
        from trl.trainer.utils import selective_log_softmax

        out = trl_lu.apply_importance_sampling_clipping(out, selective_log_softmax(zs, tokens), old, clip)
    return out


@pytest.mark.parametrize("mode,alpha,tail", CASES)
@pytest.mark.parametrize("clip", [None, 1.3])
def test_token_losses_equal_trl(mode, alpha, tail, clip):
    g = torch.Generator().manual_seed(0)
    N, V, k = 11, 37, 5
    zs = (torch.randn(N, V, generator=g) * 3).requires_grad_()
    zt = torch.randn(N, V, generator=g) * 3
    tokens = torch.randint(0, V, (N,), generator=g)
    old = (torch.log_softmax(zs.detach(), -1).gather(1, tokens[:, None])[:, 0]
           + torch.randn(N, generator=g))  # ratios on both sides of the clip
    ref = trl_token_loss(zs, zt, tokens, mode, alpha, tail, k, old, clip)
    (gr,) = torch.autograd.grad(ref.sum(), zs)
    ours = sd.token_losses(zs, zt, tokens, mode=mode, alpha=alpha, topk=k, add_tail=tail, old_logp=old, is_clip=clip)
    (go,) = torch.autograd.grad(ours.sum(), zs)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(go, gr, rtol=1e-6, atol=1e-7)
    assert float(ref.detach().abs().sum()) > 1e-3  # a real comparison


def test_sampled_token_needs_alpha_one():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha must be 1.0"):
        sd.sampled_token_loss(z, z, torch.zeros(2, dtype=torch.long), alpha=0.5)


@pytest.mark.parametrize("mode,alpha,tail", CASES)
def test_chunked_hidden_state_loss_equals_logits(mode, alpha, tail):
    """self_distillation_loss from hidden states, 4 rows at a time, each recomputed in the backward,
    equals the token losses of the whole logits (weighted sum, gradients to hidden and head)."""
    g = torch.Generator().manual_seed(1)
    N, H, V, T = 10, 6, 23, 0.7
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    ws = torch.randn(V, H, generator=g, requires_grad=True)
    ht, wt = torch.randn(N, H + 2, generator=g), torch.randn(V, H + 2, generator=g)
    tokens = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, generator=g)
    old = torch.randn(N, generator=g) - 3
    kw = dict(mode=mode, alpha=alpha, topk=4, add_tail=tail)
    ref = (sd.token_losses(hs @ ws.T / T, ht @ wt.T / T, tokens, old_logp=old, is_clip=2.0, **kw) * w).sum()
    gref = torch.autograd.grad(ref, (hs, ws))
    tot, per_tok, ent = sd.self_distillation_loss(hs, ws, ht, wt, tokens, w, temperature=T, old_logp=old,
                                                  is_clip=2.0, chunk_size=4, **kw)
    got = torch.autograd.grad(tot, (hs, ws))
    torch.testing.assert_close(tot, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, gref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert per_tok.shape == (N,) and ent.shape == (N,) and not per_tok.requires_grad


def _builder(template):
    return DemonstrationTeacherContextBuilder(SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=template)))


@pytest.mark.parametrize("template", ["{prompt}\n\n{privileged_context}", "Context: {privileged_context}\nQ: {prompt}"])
@pytest.mark.parametrize("prompt,ctx", [
    ("What is 2+2?", "The answer is 4."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}], "Paris."),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}],
     [{"role": "assistant", "content": "demo one"}, {"role": "user", "content": ""},
      {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]),
    ("p", 17),
])
def test_teacher_prompt_equals_trl(template, prompt, ctx):
    assert compose_teacher_prompt(prompt, ctx, template) == _builder(template)._compose_teacher_prompt(prompt, ctx)


def test_teacher_prompt_refusals():
    with pytest.raises(ValueError, match="training prompt 3 has no 'privileged_context'"):
        compose_teacher_prompt("p", None, "{prompt}{privileged_context}", "training prompt 3")
    with pytest.raises(ValueError, match="last user turn"):
        compose_teacher_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "c",
                               "{prompt}{privileged_context}")


def test_ema_update_equals_trl_bit_for_bit():
    from rlhf_fast.models.tiny import tiny_causal_lm

    student = tiny_causal_lm(40, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    teacher = tiny_causal_lm(40, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    theirs = copy.deepcopy(teacher)
    for rate in (0.05, 0.3, 1.0):
        SyncRefModelCallback._sync_target_model(student, theirs, rate)
        ema_update(teacher, student, rate)
        for a, b in zip(teacher.parameters(), theirs.parameters()):
            assert torch.equal(a, b)
    for a, b in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(a, b)  # rate 1: a copy
