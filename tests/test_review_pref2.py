"""Second review pass of the offline preference losses (rlhf_fast/trainers/preference_losses.py,
dpo.py, kto.py, tpo.py) against TRL 1.16 (DPOTrainer / KTOTrainer / CPOTrainer) on awkward input.

Every loss type, f-divergence, label smoothing and loss-weight list was compared with TRL's own
``DPOTrainer._compute_loss`` / ``CPOTrainer.cpo_loss`` / ``ORPOTrainer.odds_ratio_loss`` on the same
log-probs (values, gradients, logged rewards: equal; tests/test_preference_losses.py holds those);
the tests here are the defects found beyond that."""

import math

import pytest
import torch

from rlhf_fast.trainers.preference_losses import dpo_loss, ld_weighted_logps, reference_free_loss


def test_discopop_is_finite_where_beta_delta_is_very_negative():
    """DiscoPOP's exp(−βδ)·σ(βδ/τ) overflowed to inf × 0 = NaN (value and gradient) once
    βδ < −88.7 in float32 (TRL has the same line). The loss there is −log σ(βδ) ≈ |βδ| (the
    exponential part is e^(−βδ)·σ(βδ/τ) ≈ e^(βδ(1/τ − 1)) → 0), gradient ≈ −1; DiscoPOP's own
    gradient at δ = 0 points to negative δ (its non-convex bump), so one large-β step reaches it."""
    x = torch.tensor([-1393.0, -100.0, -89.0, -20.0, 0.0, 30.0], requires_grad=True)
    z = torch.zeros_like(x)
    loss, _, _ = dpo_loss(x, z, z, z, beta=1.0, loss_type="discopop")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), (loss, x.grad)
    # the float64 reference of the same formula (finite there up to |βδ| ≈ 709)
    xd = x.detach().double()[1:].requires_grad_(True)
    mod = torch.sigmoid(xd / 0.05)
    ref = -torch.nn.functional.logsigmoid(xd) * (1 - mod) + torch.exp(-xd) * mod
    ref.sum().backward()
    torch.testing.assert_close(loss[1:].double().detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad[1:].double(), xd.grad, rtol=1e-5, atol=1e-6)
    assert loss[0].item() == pytest.approx(1393.0, rel=1e-6) and x.grad[0].item() == pytest.approx(-1.0)
    assert not math.isnan(loss[0].item())


def test_pair_loss_functions_name_a_non_tensor_input():
    """A list or None where a tensor belongs gave ``AttributeError: 'list' object has no attribute
    'shape'`` (or ``'NoneType' ... 'to'``; ld_weighted_logps: ``... 'dim'``); kto_loss already names the
    argument (TypeError)."""
    z = torch.zeros(3)
    lst = [0.0, 0.0, 0.0]
    cases = [(lambda: dpo_loss(lst, z, z, z, beta=0.1), "chosen_logps"),
             (lambda: dpo_loss(z, z, None, z, beta=0.1), "ref_chosen_logps"),
             (lambda: dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo", chosen_tokens=[1, 2, 3], rejected_tokens=z),
              "chosen_tokens"),
             (lambda: reference_free_loss(z, lst, loss_type="cpo", beta=0.1), "rejected_logps"),
             (lambda: reference_free_loss(z, z, loss_type="simpo", beta=0.1, chosen_tokens=z, rejected_tokens=lst),
              "rejected_tokens"),
             (lambda: ld_weighted_logps([[0.0, -1.0], [0.0, -2.0]], z.new_ones(2, 2), 0.5), "token_logps"),
             (lambda: ld_weighted_logps(z.new_zeros(2, 2), [[0, 1], [0, 1]], 0.5), "mask")]
    for call, needle in cases:
        with pytest.raises(TypeError, match=needle):
            call()


def test_dpo_docstring_names_every_loss_whose_logged_logps_are_token_means():
    """The logged logps/* and rewards/* of cpo_ipo, tpo_ipo and tpo_l are token means too
    (TRL's CPO ``ipo`` / TPO ``ipo`` and ``tpo-l`` average the log-probs), and AlphaPO's rewards are
    β × its shaped score; the module docstring said token means for simpo / orpo only."""
    from rlhf_fast.trainers import dpo
    from rlhf_fast.trainers.preference_losses import LENGTH_NORMALISED, REFERENCE_FREE_LOSSES

    doc = " ".join(dpo.__doc__.split())
    para = doc[doc.index("Logged per step"):doc.index("TRL's entropy")]
    for name in sorted(LENGTH_NORMALISED & set(REFERENCE_FREE_LOSSES)):
        assert name in para, name
    assert "alpha" in para
    z, n = torch.tensor([-6.0, -4.0]), torch.tensor([3, 2])
    for name in ("cpo_ipo", "tpo_ipo", "tpo_l"):
        out = reference_free_loss(z, z - 1, loss_type=name, beta=0.5, chosen_tokens=n, rejected_tokens=n)
        torch.testing.assert_close(out["chosen_logps"], z / n)
