"""WPO weighting (``use_weighting``) together with the NLL term (``sft`` in ``loss_type``, or
``rpo_alpha``). TRL 1.16's ``DPOTrainer._compute_loss`` means to multiply its micro-batch ``sft``
term (``batch_loss.expand(B)``) by each pair's weight before the mean, but its in-place ``*=`` on
the expanded tensor raises; so the pair terms come from TRL's own ``_compute_loss`` and the sft
term from its lines transcribed (trl/trainer/dpo_trainer.py, the ``sft`` branch and the
``use_weighting`` block: NLL token mean × mean(w_c·w_r)), on full float64 logits. Loss and
gradient of one micro-batch step; TRL's crash shown."""

import copy

import pytest
import torch

from rlhf_fast.trainers import dpo as dpo_mod
from tests.test_dpo_wpo import _sharpen, _trainer, _trl_weighted_loss
from tests.test_reward import preference_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _trl_sft_term(model, batch, B):
    """TRL's weighted sft term: −mean(chosen completion log-probs) × mean over pairs of w_c·w_r,
    w = exp(mean over the completion of log p − log Σ p²), detached (float64 full logits)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp_all = logits[:, :-1].log_softmax(-1)
    tok = logp_all.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # [2B, T-1]
    mask = (batch["response_mask"] * batch["attention_mask"])[:, 1:].bool()
    with torch.no_grad():
        lss = torch.logsumexp(2 * logits[:, :-1], -1) - 2 * torch.logsumexp(logits[:, :-1], -1)
        w = torch.exp(((tok - lss) * mask).sum(1) / mask.sum(1).clamp_min(1))
    nll = -tok[:B][mask[:B]].mean()
    return nll * (w[:B] * w[B:]).mean()


# (our settings, TRL's pair loss types and weights, the sft weight)
CASES = [(dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]), ["sigmoid"], [1.0], 0.7),
         (dict(loss_type="sigmoid", rpo_alpha=0.5), ["sigmoid"], [1.0], 0.5),
         (dict(loss_type="sft"), [], [], 1.0)]


@pytest.mark.parametrize("kw,trl_types,trl_weights,sft_w", CASES, ids=["sigmoid_sft", "rpo_alpha", "sft_only"])
def test_weighted_nll_step_equals_trls(tmp_path, tok, kw, trl_types, trl_weights, sft_w):
    tr = _trainer(tmp_path, tok, **kw)
    _sharpen(tr)
    items = [tr.train_items[i] for i in tr.batches._perm[:6]]
    batch = tr._batch(items)
    with torch.no_grad():
        ref = dpo_mod.reference_logps(tr.reference, batch, False)
    theirs_model = copy.deepcopy(tr.model).train()
    theirs = sft_w * _trl_sft_term(copy.deepcopy(tr.model).train(), batch, 6)
    params = [list(theirs_model.parameters())]
    if trl_types:
        pair, _ = _trl_weighted_loss(theirs_model, batch, ref[:6], ref[6:], beta=0.3, loss_types=trl_types,
                                     loss_weights=trl_weights, label_smoothing=0.0, ld_alpha=None)
    got = {}
    tr.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: got.__setitem__("g", [p.grad.clone() for p in tr.model.parameters()]))
    # the sft part on its own model copy, so its gradient adds to the pair part's
    sft_model = copy.deepcopy(tr.model).train()
    sft = sft_w * _trl_sft_term(sft_model, batch, 6)
    g = [a.double() for a in torch.autograd.grad(sft, list(sft_model.parameters()))]
    total = float(sft)
    if trl_types:
        g = [a + b.double() for a, b in zip(g, torch.autograd.grad(pair, params[0]))]
        total += float(pair)
    m = tr.train_step()
    assert m["loss"] == pytest.approx(total, rel=2e-5)
    for a, b in zip(got["g"], g):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=2e-6)
    assert float(theirs) == pytest.approx(float(sft), rel=1e-12)
    # the pair weights are far below 1 here, so an unweighted NLL would be far off
    tok_, lss = dpo_mod.wpo_token_logps(tr.model, batch)
    w = dpo_mod.wpo_weights(tok_, lss, dpo_mod.response_mask(batch))
    assert float((w[:6] * w[6:]).mean()) < 0.3


def test_trl_itself_raises_on_its_weighted_sft_term(tmp_path, tok):
    """Why the sft term is transcribed: TRL 1.16 multiplies an expanded tensor in place."""
    tr = _trainer(tmp_path, tok, loss_type=["sigmoid", "sft"])
    batch = tr._batch(tr.train_items[:6])
    with torch.no_grad():
        ref = dpo_mod.reference_logps(tr.reference, batch, False)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        _trl_weighted_loss(copy.deepcopy(tr.model).train(), batch, ref[:6], ref[6:], beta=0.3,
                           loss_types=["sigmoid", "sft"], loss_weights=None, label_smoothing=0.0, ld_alpha=None)
