"""TRL CPOTrainer's reference-free ``hinge`` and ``ipo`` (our ``cpo_hinge`` / ``cpo_ipo``) and
AlphaPO's reward shape (``alpha``; ``loss_type: alphapo``): the per-pair losses, rewards and
gradients against TRL's own ``CPOTrainer.cpo_loss``, a whole trainer step (loss, gradient,
logged metrics, the cpo_alpha NLL included) against TRL's ``get_batch_loss_metrics`` on the same
model and rows, TRL's ``alphapo`` shorthand, the finite AlphaPO reward where TRL's overflows,
and the config errors."""

import types

import pytest
import torch

from rlhf_fast.trainers.dpo import DPOConfig
from rlhf_fast.trainers.preference_losses import reference_free_loss
from tests.test_dpo import _step_grads, _trainer, _trl_reference_free
from tests.test_reward import preference_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TRL_NAME = {"simpo": "simpo", "cpo": "sigmoid", "cpo_hinge": "hinge", "cpo_ipo": "ipo"}


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _trl_cpo_loss(loss_type, c, r, *, beta, alpha=0.0, label_smoothing=0.0, simpo_gamma=0.5):
    """trl/experimental/cpo/cpo_trainer.py CPOTrainer.cpo_loss on a stub holding the settings."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    stub = types.SimpleNamespace(alpha=alpha, beta=beta, loss_type=TRL_NAME[loss_type], simpo_gamma=simpo_gamma,
                                 label_smoothing=label_smoothing,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(stub, c, r)


@pytest.mark.parametrize("loss_type", ["cpo_hinge", "cpo_ipo", "cpo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, -0.5])
def test_pair_losses_and_gradients_equal_trls(loss_type, alpha):
    """TRL's CPO takes token means for ipo / simpo (``average_log_prob``), sums otherwise: it gets
    those, ours the sums and token counts."""
    g = torch.Generator().manual_seed(3)
    n_c, n_r = torch.randint(1, 9, (7,), generator=g), torch.randint(1, 9, (7,), generator=g)
    c = (-torch.rand(7, generator=g, dtype=torch.float64) * n_c).requires_grad_()
    r = (-torch.rand(7, generator=g, dtype=torch.float64) * n_r).requires_grad_()
    mean = loss_type in ("cpo_ipo", "simpo")
    beta = 0.7
    losses, rc, rr = _trl_cpo_loss(loss_type, c / n_c if mean else c, r / n_r if mean else r, beta=beta, alpha=alpha)
    out = reference_free_loss(c, r, loss_type=loss_type, beta=beta, chosen_tokens=n_c, rejected_tokens=n_r,
                              alpha=alpha)
    torch.testing.assert_close(out["loss"], losses)
    torch.testing.assert_close(out["chosen_rewards"], rc)
    torch.testing.assert_close(out["rejected_rewards"], rr)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    theirs = torch.autograd.grad((losses * w).sum(), (c, r))
    ours = torch.autograd.grad((out["loss"] * w).sum(), (c, r))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert (out["loss"] > 0).any()


def _trl_step(tr, items, batch):
    """TRL's CPOTrainer.get_batch_loss_metrics on the trainer's rows (tests/test_dpo.py's stub),
    with the trainer's beta / alpha / cpo_alpha and TRL's name for its loss."""
    return _trl_reference_free(tr, items, batch, "cpo", TRL_NAME[tr.cfg.loss_terms[0][0]], tr.cfg.alpha)


# AlphaPO on token means: on these rows' summed log-probs (about -100) TRL's exp(logp) underflows to 0
# in float32 and its loss is inf (test_alphapo_reward_stays_finite_where_trls_overflows)
STEP_CASES = [dict(loss_type="cpo_hinge", beta=0.3), dict(loss_type="cpo_ipo", beta=0.5, cpo_alpha=0.5),
              dict(loss_type="cpo_ipo", beta=0.5, alpha=0.25), dict(loss_type="alphapo", beta=2.0, alpha=0.5)]


@pytest.mark.parametrize("kw", STEP_CASES, ids=["hinge", "ipo", "ipo_alphapo", "alphapo"])
def test_trainer_step_equals_trls(tmp_path, tok, kw):
    tr = _trainer(tmp_path, tok, batch_size=6, grad_clip=0.0, **kw)
    assert tr.reference is None
    items = [tr.train_items[i] for i in tr.batches._perm[:6]]
    theirs, tm = _trl_step(tr, items, tr._batch(items))
    g_theirs = torch.autograd.grad(theirs, list(tr.model.parameters()))
    m, g_ours = _step_grads(tr)
    assert m["loss"] == pytest.approx(float(theirs.detach()), rel=2e-5)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-6)
    for ours_k, trl_k in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                          ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                          ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected"),
                          ("nll", "nll_loss")):
        if ours_k == "nll" and tr.cfg.nll_weight == 0:  # alphapo: cpo_alpha 0, no NLL term
            assert "nll" not in m and tm["nll_loss"] == 0
            continue
        assert m[ours_k] == pytest.approx(tm[trl_k], rel=1e-4, abs=1e-6), ours_k


def test_alphapo_shorthand_is_trls(tmp_path):
    from trl.experimental.cpo import CPOConfig as TRLConfig

    t = TRLConfig(output_dir=str(tmp_path / "trl"), loss_type="alphapo", cpo_alpha=0.7, report_to="none",
                  use_cpu=True, bf16=False)
    ours = DPOConfig(output_dir=str(tmp_path / "o"), loss_type="alphapo", cpo_alpha=0.7)
    assert (t.loss_type, t.cpo_alpha) == ("simpo", 0.0) == (ours.loss_type, ours.cpo_alpha)


def test_alphapo_reward_stays_finite_where_trls_overflows():
    """A long response's summed log-prob: TRL's exp(logp).pow(-alpha) is 0^(-alpha) = inf, ours
    e^(-alpha·logp) is finite (the one deliberate difference)."""
    c, r = torch.tensor([-150.0]), torch.tensor([-160.0])
    losses, _, _ = _trl_cpo_loss("cpo", c, r, beta=0.1, alpha=0.1)
    out = reference_free_loss(c, r, loss_type="cpo", beta=0.1, alpha=0.1)
    assert not torch.isfinite(losses).all() and torch.isfinite(out["loss"]).all()


def test_config_errors_name_the_field(tmp_path):
    for kw, needle in ((dict(alpha=0.5), r"alpha \(AlphaPO's reward shape\) applies to loss_type"),
                       (dict(loss_type="orpo", alpha=0.5), "alpha"),
                       (dict(loss_type="cpo", alpha=float("nan")), "alpha must be a finite number"),
                       (dict(loss_type="cpo_hinge", label_smoothing=0.1), "label_smoothing"),
                       (dict(loss_type="cpo_ipo", ref_model="x"), "ref_model must be left unset"),
                       (dict(loss_type=["cpo_hinge", "sft"]), "must be used alone")):
        with pytest.raises(ValueError, match=needle):
            DPOConfig(output_dir=str(tmp_path / "x"), **kw)
