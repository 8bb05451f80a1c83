"""Noise-aware reward losses against independent definitions (probabilities, brute force)."""

import itertools
import math

import pytest
import torch

from rlhf_fast.feedback.losses import bradley_terry_loss, plackett_luce_loss, score_regression_loss


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_matches_formula():
    torch.manual_seed(0)
    c, r = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    m = torch.rand(7, dtype=torch.float64)
    w = torch.rand(7, dtype=torch.float64)
    eps = 0.1
    expected = sum(wi * (-(1 - eps) * math.log(_sig(ci - ri - mi)) - eps * math.log(_sig(-(ci - ri - mi))))
                   for ci, ri, mi, wi in zip(c.tolist(), r.tolist(), m.tolist(), w.tolist())) / w.sum().item()
    got = bradley_terry_loss(c, r, margin=m, label_smoothing=eps, weights=w)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected, rel=1e-12)
    plain = bradley_terry_loss(c.float(), r.float())
    assert plain.dtype == torch.float32
    assert plain.item() == pytest.approx(sum(-math.log(_sig(a - b)) for a, b in zip(c.tolist(), r.tolist())) / 7, rel=1e-5)
    # smoothing bounds the gradient of a badly wrong (flipped) pair: it pushes back toward 0
    d = torch.tensor([-20.0, 20.0], requires_grad=True)
    bradley_terry_loss(d, torch.zeros(2), label_smoothing=0.2).backward()
    assert d.grad[1] > 0  # a confident pair is pulled back (minimum at logit(0.8))
    assert torch.autograd.gradcheck(lambda x: bradley_terry_loss(x, r, margin=m, label_smoothing=eps, weights=w), (c.requires_grad_(),))


def test_plackett_luce_against_brute_force():
    torch.manual_seed(1)
    s = torch.randn(3, 4, dtype=torch.float64)
    ranking = torch.stack([torch.randperm(4) for _ in range(3)])
    # independent definition: sequential choice probabilities
    exp_loss = 0.0
    for b in range(3):
        remaining = list(range(4))
        lp = 0.0
        for idx in ranking[b].tolist():
            z = sum(math.exp(s[b, j].item()) for j in remaining)
            lp += s[b, idx].item() - math.log(z)
            remaining.remove(idx)
        exp_loss += -lp
    assert plackett_luce_loss(s, ranking).item() == pytest.approx(exp_loss / 3, rel=1e-12)
    # the rankings' probabilities sum to one
    total = sum(math.exp(-plackett_luce_loss(s[:1], torch.tensor([list(p)])).item())
                for p in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0, rel=1e-9)
    # K = 2 is Bradley-Terry; padding with -1 ignores the missing responses
    s2 = torch.randn(5, 2, dtype=torch.float64)
    assert plackett_luce_loss(s2, torch.tensor([[0, 1]] * 5)).item() == pytest.approx(
        bradley_terry_loss(s2[:, 0], s2[:, 1]).item(), rel=1e-12)
    padded = torch.cat([s2, torch.randn(5, 1, dtype=torch.float64)], 1)
    assert plackett_luce_loss(padded, torch.tensor([[0, 1, -1]] * 5)).item() == pytest.approx(
        bradley_terry_loss(s2[:, 0], s2[:, 1]).item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: plackett_luce_loss(x, ranking), (s.clone().requires_grad_(),))


def test_regression_and_errors():
    p, t = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 5.0])
    assert score_regression_loss(p, t).item() == pytest.approx(8 / 3)
    assert score_regression_loss(p, t, weights=torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        bradley_terry_loss(p, t, label_smoothing=0.5)
    with pytest.raises(ValueError, match="chosen and rejected"):
        bradley_terry_loss(p, t[:2])
    with pytest.raises(ValueError, match="weights"):
        score_regression_loss(p, t, weights=torch.ones(2))
    with pytest.raises(ValueError, match="scores and ranking"):
        plackett_luce_loss(p, torch.tensor([0, 1, 2]))
