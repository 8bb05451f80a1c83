"""WPO weighting (``use_weighting``) in the DPO trainer: the step's loss, gradient and logged
metrics against TRL's own ``DPOTrainer._compute_loss`` run on a copy of the same tiny model
patched with TRL's fused LM head (its chunked kernel computes ``log_sum_sq_probs``); the
chunked no-grad log Σ p² against full logits; the log-probs of the weighting path equal the
plain path's; config errors."""

import collections
import copy
import types

import pytest
import torch

from rlhf_fast.trainers import dpo as dpo_mod
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, token_logps, wpo_token_logps
from rlhf_fast.trainers.reward import synthetic_preference_records
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _trainer(tmp_path, tok, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / "run"), batch_size=6, lr=3e-3, warmup_steps=2, eval_every=0,
                log_every=1, max_len=48, max_steps=4, device="cpu", grad_clip=0.0, beta=0.3, use_weighting=True)
    base.update(kw)
    return DPOTrainer(DPOConfig(**base), train_records=synthetic_preference_records(32, seed=5), eval_records=[],
                      tokenizer=tok)


def _sharpen(tr):
    """Peaked next-token distributions (the weights of a fresh tiny model are all ≈ 1, since
    its distributions are ≈ uniform) and a reference that differs from the policy."""
    with torch.no_grad():
        head = tr.model.get_output_embeddings().weight
        head.mul_(10.0)
        if tr.reference is not None:
            for p in tr.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))


def _trl_weighted_loss(model, batch, ref_c, ref_r, *, beta, loss_types, loss_weights, label_smoothing, ld_alpha):
    """TRL 1.x's ``DPOTrainer._compute_loss`` with ``use_weighting`` on a stub trainer whose model
    is ``model`` patched by TRL's ``add_fused_lm_head`` (log-probs and log Σ p² from TRL's
    chunked kernel); the reference log-probs as precomputed. Returns (loss, TRL's metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                unwrap_model=lambda x: x)
    stub = types.SimpleNamespace(
        model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=True, _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["response_mask"] * batch["attention_mask"],
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = TRLDPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


CASES = [dict(loss_type="sigmoid"),
         # (not hinge: TRL multiplies its relu output in place, and its backward then fails)
         dict(loss_type=["ipo", "apo_zero"], loss_weights=[0.5, 1.0], ld_alpha=0.5),
         dict(loss_type="robust", label_smoothing=0.1)]


@pytest.mark.parametrize("kw", CASES, ids=["sigmoid", "ipo_apo_ld", "robust"])
def test_weighted_step_equals_trls(tmp_path, tok, kw):
    pytest.importorskip("trl")
    tr = _trainer(tmp_path, tok, **kw)
    _sharpen(tr)
    items = [tr.train_items[i] for i in tr.batches._perm[:6]]
    batch = tr._batch(items)
    with torch.no_grad():
        ref = dpo_mod.reference_logps(tr.reference, batch, False, ld_alpha=kw.get("ld_alpha"))
    theirs_model = copy.deepcopy(tr.model).train()  # TRL logs under "train" for a training model
    types_ = kw["loss_type"] if isinstance(kw["loss_type"], list) else [kw["loss_type"]]
    theirs, tm = _trl_weighted_loss(theirs_model, batch, ref[:6], ref[6:], beta=0.3, loss_types=types_,
                                    loss_weights=kw.get("loss_weights"),
                                    label_smoothing=kw.get("label_smoothing", 0.0), ld_alpha=kw.get("ld_alpha"))
    g_theirs = torch.autograd.grad(theirs, list(theirs_model.parameters()))
    # the weights matter here: far from 1, and different per pair
    tok_, lss = wpo_token_logps(tr.model, batch)
    w = dpo_mod.wpo_weights(tok_, lss, dpo_mod.response_mask(batch))
    assert float(w.max()) < 0.5 and float(w.max() / w.min()) > 1.5

    got = {}
    tr.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: got.__setitem__("g", [p.grad.clone() for p in tr.model.parameters()]))
    m = tr.train_step()
    assert m["loss"] == pytest.approx(float(theirs.detach()), rel=2e-5)
    for a, b in zip(got["g"], g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-6)
    for ours_k, trl_k in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                          ("rewards/accuracy", "rewards/accuracies"), ("rewards/margin", "rewards/margins"),
                          ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")):
        assert m[ours_k] == pytest.approx(tm[trl_k], rel=1e-4, abs=1e-6), ours_k


def test_weighting_path_log_probs_and_chunked_log_sum_sq(tmp_path, tok, monkeypatch):
    """The weighting path's log-probs are the plain path's, bit for bit; its log Σ p², taken in
    chunks of 3 rows, equals the full logits' logsumexp(2z) − 2·logsumexp(z)."""
    tr = _trainer(tmp_path, tok)
    _sharpen(tr)
    batch = tr._batch(tr.train_items[:5])
    monkeypatch.setattr(dpo_mod, "_WPO_CHUNK_ELEMS", 3 * 300)
    tok_, lss = wpo_token_logps(tr.model, batch)
    assert torch.equal(tok_, token_logps(tr.model, batch))
    with torch.no_grad():
        z = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    full = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)  # [N, T]: predicts position t + 1
    mask = dpo_mod.response_mask(batch)
    mask[:, 0] = False
    expect = torch.zeros_like(lss, dtype=torch.float64)
    expect[:, 1:] = full[:, :-1]
    torch.testing.assert_close(lss.double(), expect * mask, rtol=1e-5, atol=1e-5)
    assert not lss.requires_grad and tok_.requires_grad


def test_defaults_leave_the_step_unweighted(tmp_path, tok):
    """use_weighting off (the default) runs the plain path: the same metrics as before, and
    differs from the weighted step on a model whose weights are not 1."""
    a = _trainer(tmp_path / "a", tok, use_weighting=False)
    b = _trainer(tmp_path / "b", tok, use_weighting=True)
    _sharpen(a)
    with torch.no_grad():
        for pa, pb in zip(list(a.model.parameters()) + list(a.reference.parameters()),
                          list(b.model.parameters()) + list(b.reference.parameters())):
            pb.copy_(pa)
    ma, mb = a.train_step(), b.train_step()
    assert ma["logps/chosen"] == mb["logps/chosen"] and ma["rewards/margin"] == mb["rewards/margin"]
    assert ma["loss"] != pytest.approx(mb["loss"], rel=1e-3)


def test_config_errors_name_the_key(tmp_path):
    kw = dict(model=TINY, output_dir=str(tmp_path / "x"), use_weighting=True)
    for extra, msg in ((dict(loss_type="aot"), "use_weighting does not apply to loss_type \\['aot'\\]"),
                       (dict(loss_type="simpo"), "use_weighting does not apply to the reference-free"),
                       (dict(use_weighting=1), "use_weighting must be true or false")):
        with pytest.raises(ValueError, match=msg):
            DPOConfig(**{**kw, **extra})
