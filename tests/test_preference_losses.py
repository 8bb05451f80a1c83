"""The preference losses of rlhf_fast.trainers.preference_losses against TRL 1.16's own code on
the same per-token log-probs: every DPOTrainer loss type (alone and weighted in lists, with the
f-divergences and LD-DPO's ld_alpha) through ``DPOTrainer._compute_loss`` run on a stub; SimPO /
CPO through ``CPOTrainer.cpo_loss`` and ORPO through ``ORPOTrainer.odds_ratio_loss`` on stubs
(the trainer-level checks, NLL terms included: tests/test_dpo.py). Values, gradients and the
logged rewards; then the argument errors and the batch-level behaviour of the aot losses."""

import collections
import types

import pytest
import torch

from rlhf_fast.trainers.preference_losses import (LOSS_TYPES, REFERENCE_FREE_LOSSES, dpo_loss, f_divergence_scores, ld_weighted_logps,
                                                  loss_terms, reference_free_loss)


def trl_dpo_loss(P, completion_mask, ref_c, ref_r, *, beta, loss_types, loss_weights, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, discopop_tau=0.05):
    """TRL 1.x's ``DPOTrainer._compute_loss`` run as an unbound function on a stub trainer whose
    model returns the per-token log-probs ``P [2B, T-1]`` (0 where TRL's label is -100), with the
    reference log-probs given as precomputed. Returns (loss, TRL's logged metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer

    class Model:
        training = True

        def __call__(self, **kw):
            assert kw["fused_lm_head"] is True
            lp = torch.where(kw["labels"][:, 1:] != -100, P, torch.zeros_like(P))
            z = torch.zeros_like(P)
            return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())

    model = Model()
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                unwrap_model=lambda x: x)
    stub = types.SimpleNamespace(
        model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=True,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    n = P.shape[0]
    inputs = {"input_ids": torch.zeros(n, P.shape[1] + 1, dtype=torch.long),
              "attention_mask": torch.ones(n, P.shape[1] + 1, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = TRLDPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def random_pairs(B=6, T=9, dtype=torch.float64, seed=3):
    """``(P [2B, T-1] per-token log-probs (leaf, requires grad), completion mask [2B, T] (holes,
    different lengths, position 0 never predicted), ref_c [B], ref_r [B])``."""
    g = torch.Generator().manual_seed(seed)
    cm = (torch.rand(2 * B, T, generator=g) > 0.35).long()
    cm[:, 0] = 0
    cm[:, 1] = 1
    P = (-3.0 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    ref_c = (P[:B].detach() * cm[:B, 1:]).sum(1) + torch.randn(B, generator=g, dtype=torch.float64).to(dtype) * 2
    ref_r = (P[B:].detach() * cm[B:, 1:]).sum(1) + torch.randn(B, generator=g, dtype=torch.float64).to(dtype) * 2
    return P, cm, ref_c, ref_r


def ours(P, cm, ref_c, ref_r, *, beta, loss_types, loss_weights, label_smoothing=0.0, ld_alpha=None, **kw):
    """The step objective as DPOTrainer builds it from per-token log-probs: (LD-weighted) sums,
    dpo_loss's pair terms averaged, + the sft weight × token-mean NLL of the chosen tokens."""
    B = P.shape[0] // 2
    mask = cm[:, 1:].bool()
    resp = P * mask
    logps = resp.sum(1) if ld_alpha is None else ld_weighted_logps(resp, mask, ld_alpha)
    tokens = mask.sum(1)
    terms = loss_terms(loss_types, loss_weights)
    pair = [(n, w) for n, w in terms if n != "sft"]
    total = 0.0
    rc = rr = None
    if pair:
        per, rc, rr = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta=beta, loss_type=[n for n, _ in pair],
                               loss_weights=[w for _, w in pair], label_smoothing=label_smoothing,
                               chosen_tokens=tokens[:B], rejected_tokens=tokens[B:], **kw)
        total = per.mean()
    sft = sum(w for n, w in terms if n == "sft")
    if sft:
        total = total + sft * (-resp[:B].sum() / tokens[:B].sum())
    return total, logps, rc, rr


# (id, loss_type list, weights, dict of the other options); float64 unless "dtype" is given
CASES = [
    ("exo_pair", ["exo_pair"], None, dict(label_smoothing=1e-3)),
    ("exo_pair_eps0.2", ["exo_pair"], None, dict(label_smoothing=0.2)),
    ("nca_pair", ["nca_pair"], None, {}),
    ("bco_pair", ["bco_pair"], None, {}),
    ("sppo_hard", ["sppo_hard"], None, {}),
    ("aot", ["aot"], None, dict(label_smoothing=0.1)),
    ("aot_unpaired", ["aot_unpaired"], None, dict(label_smoothing=0.1)),
    ("apo_zero", ["apo_zero"], None, {}),
    ("apo_down", ["apo_down"], None, {}),
    ("discopop", ["discopop"], None, {}),
    ("discopop_tau", ["discopop"], None, dict(discopop_tau=0.7)),
    ("sigmoid_norm", ["sigmoid_norm"], None, {}),
    ("sft", ["sft"], None, {}),
    ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),
    ("weighted_pair", ["hinge", "nca_pair"], [0.3, 1.7], {}),
    ("forward_kl", ["sigmoid", "sft"], [1.0, 0.5], dict(f_divergence_type="forward_kl")),
    ("js", ["sigmoid_norm", "hinge"], None, dict(f_divergence_type="js_divergence")),
    ("alpha_div", ["ipo"], None, dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
                                      dtype=torch.float32)),  # TRL's clamp table has no float64
    ("alpha_div_discopop", ["discopop", "robust"], None,
     dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.6, label_smoothing=0.2,
          dtype=torch.float32)),
    ("exo_js", ["exo_pair"], None, dict(f_divergence_type="js_divergence", label_smoothing=0.05)),
    ("ld", ["sigmoid", "sft"], None, dict(ld_alpha=0.5)),
    ("ld_ipo", ["ipo"], None, dict(ld_alpha=0.3)),
    ("ld_zero", ["bco_pair"], None, dict(ld_alpha=0.0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dpo_family_equals_trls(case):
    pytest.importorskip("trl")
    _, types_, weights, opts = case
    opts = dict(opts)
    dtype = opts.pop("dtype", torch.float64)
    tight = dtype == torch.float64
    P, cm, ref_c, ref_r = random_pairs(dtype=dtype)
    B = ref_c.shape[0]
    mine, logps, rc, rr = ours(P, cm, ref_c, ref_r, beta=0.3, loss_types=types_, loss_weights=weights, **opts)
    g_ours, = torch.autograd.grad(mine, P)
    theirs, m = trl_dpo_loss(P, cm, ref_c, ref_r, beta=0.3, loss_types=types_, loss_weights=weights, **opts)
    g_theirs, = torch.autograd.grad(theirs, P)
    # exo: TRL builds log ε in float32 (torch.tensor(ε)); the float32 cases: float32 rounding
    rel = 1e-12 if tight and "exo_pair" not in types_ else 1e-5
    assert abs(float(theirs.detach())) > 1e-3
    assert float(mine.detach()) == pytest.approx(float(theirs.detach()), rel=rel)
    torch.testing.assert_close(g_ours, g_theirs, rtol=rel * 10, atol=1e-12 if tight else 1e-6)
    assert g_ours.abs().sum() > 0
    if rc is not None:  # logged: β·log-ratio (whatever the f-divergence), accuracy, (LD-weighted) log-probs
        assert float(rc.mean()) == pytest.approx(m["rewards/chosen"], rel=1e-6)
        assert float(rr.mean()) == pytest.approx(m["rewards/rejected"], rel=1e-6)
        assert float((rc > rr).double().mean()) == pytest.approx(m["rewards/accuracies"], rel=1e-6)
        assert float(logps[:B].detach().mean()) == pytest.approx(m["logps/chosen"], rel=1e-6)
        assert float(logps[B:].detach().mean()) == pytest.approx(m["logps/rejected"], rel=1e-6)


def test_every_trl_loss_type_is_covered():
    from trl.trainer.dpo_config import DPOConfig as TRLDPOConfig

    pytest.importorskip("trl")
    trl_types = set(TRLDPOConfig.__dataclass_fields__["loss_type"].metadata["help"].split("`'")[1:])
    trl_types = {t.split("'`")[0] for t in trl_types}
    assert len(trl_types) == 15 and trl_types <= set(LOSS_TYPES)
    tested = {t for c in CASES for t in c[1]} | {"sigmoid", "robust", "ipo", "hinge"}  # + tests/test_dpo.py
    assert trl_types <= tested


def _cpo_stub(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    stub = types.SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                                 simpo_gamma=simpo_gamma, accelerator=types.SimpleNamespace(device="cpu"))
    return lambda c, r: CPOTrainer.cpo_loss(stub, c, r)


@pytest.mark.parametrize("loss_type,eps,gamma", [("simpo", 0.0, 0.5), ("simpo", 0.15, 1.3), ("cpo", 0.0, 0.5),
                                                 ("cpo", 0.2, 0.5), ("orpo", 0.0, 0.5)])
def test_reference_free_losses_equal_trls(loss_type, eps, gamma):
    """simpo / cpo: CPOTrainer.cpo_loss (TRL's loss_type "simpo" / "sigmoid") on the token-mean
    (simpo) or summed (cpo) log-probs, as its get_batch_logps gives them; orpo:
    ORPOTrainer.odds_ratio_loss on the token means."""
    pytest.importorskip("trl")
    P, cm, _, _ = random_pairs(seed=5)
    B = P.shape[0] // 2
    mask = cm[:, 1:].bool()
    sums, tokens = (P * mask).sum(1), mask.sum(1)
    out = reference_free_loss(sums[:B], sums[B:], loss_type=loss_type, beta=0.7, chosen_tokens=tokens[:B],
                              rejected_tokens=tokens[B:], label_smoothing=eps, simpo_gamma=gamma)
    g_ours, = torch.autograd.grad(out["loss"].mean(), P, retain_graph=True)
    avg = sums / tokens
    if loss_type == "orpo":
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

        stub = types.SimpleNamespace(beta=0.7, accelerator=types.SimpleNamespace(device="cpu"))
        losses, rc, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub, avg[:B], avg[B:])
        theirs = -losses.mean()  # TRL: loss = nll − mean(β·log σ(log-odds)); its NLL: tests/test_dpo.py
        rel = 1e-6  # TRL casts the log-probs to float32
        assert float(out["log_odds_ratio"].mean()) == pytest.approx(float(ratio.detach()), rel=rel)
        assert float(out["log_odds_chosen"].mean()) == pytest.approx(float(log_odds.detach()), rel=rel)
    else:
        x = avg if loss_type == "simpo" else sums
        losses, rc, rr = _cpo_stub("simpo" if loss_type == "simpo" else "sigmoid", 0.7, eps, gamma)(x[:B], x[B:])
        theirs, rel = losses.mean(), 1e-12
    g_theirs, = torch.autograd.grad(theirs, P)
    assert float(out["loss"].detach().mean()) == pytest.approx(float(theirs.detach()), rel=rel)
    torch.testing.assert_close(g_ours, g_theirs, rtol=rel * 10, atol=1e-9)
    torch.testing.assert_close(out["chosen_rewards"], rc.to(out["chosen_rewards"].dtype), rtol=rel, atol=0)
    torch.testing.assert_close(out["rejected_rewards"], rr.to(out["rejected_rewards"].dtype), rtol=rel, atol=0)
    logged = sums if loss_type == "cpo" else avg  # logps/* as TRL logs them
    torch.testing.assert_close(out["chosen_logps"], logged[:B].detach())


def test_orpo_stays_finite_where_a_response_is_certain():
    c = torch.tensor([0.0, -0.5], dtype=torch.float64, requires_grad=True)  # every token of pair 0 has p = 1
    r = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    one = torch.ones(2)
    out = reference_free_loss(c, r, loss_type="orpo", beta=0.1, chosen_tokens=one, rejected_tokens=one)
    out["loss"].sum().backward()
    assert torch.isfinite(out["loss"]).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_aot_is_batch_level_and_the_others_per_pair():
    """aot / aot_unpaired sort over the batch: the loss of a split batch is not the mean of its
    halves' (documented); every per-pair loss is."""
    P, cm, ref_c, ref_r = random_pairs(B=8, seed=7)
    B = 8
    s = (P * cm[:, 1:]).sum(1).detach()
    t = cm[:, 1:].sum(1)
    for name in [n for n in LOSS_TYPES if n not in REFERENCE_FREE_LOSSES + ("sft",)]:
        eps = 0.1 if name == "exo_pair" else 0.0
        kw = dict(beta=0.3, loss_type=name, label_smoothing=eps)
        full, *_ = dpo_loss(s[:B], s[B:], ref_c, ref_r, chosen_tokens=t[:B], rejected_tokens=t[B:], **kw)
        halves = [dpo_loss(s[:B][h], s[B:][h], ref_c[h], ref_r[h], chosen_tokens=t[:B][h], rejected_tokens=t[B:][h],
                           **kw)[0] for h in (slice(0, 4), slice(4, 8))]
        same = torch.allclose(full.mean(), torch.cat(halves).mean(), rtol=1e-12, atol=0)
        assert same == (name not in ("aot", "aot_unpaired")), name


def test_f_divergence_scores_limits():
    l = torch.linspace(-2, 2, 9, dtype=torch.float64)
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):  # each f'(t) vanishes at t = 1, rises with t
        s, _ = f_divergence_scores(l, l, kind, 0.5)
        assert abs(float(s[4])) < 1e-12 and (s.diff() > 0).all(), kind
    s, _ = f_divergence_scores(l, l, "alpha_divergence", 1.0)
    assert torch.equal(s, l)  # α → 1: reverse KL


def test_ld_weighted_logps_by_hand():
    tok = torch.tensor([[0., -1., -2., -3., 0.], [0., -4., -5., 0., 0.]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    torch.testing.assert_close(ld_weighted_logps(tok, mask, 0.25), torch.tensor([-1 - 2 - 0.25 * 3, -9.0]))
    torch.testing.assert_close(ld_weighted_logps(tok, mask, 1.0), (tok * mask).sum(1))


def test_argument_errors():
    c, r, rc, rr = (torch.randn(4) for _ in range(4))
    t = torch.full((4,), 3)
    for kw, needle in ((dict(loss_type="kto"), "loss_type must be one of"),
                       (dict(loss_type=["sigmoid", "nope"]), r"\['nope'\]"),
                       (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights must have one weight"),
                       (dict(loss_type=["sigmoid"], loss_weights=[-1.0]), r"loss_weights\[0\]"),
                       (dict(loss_type=["sigmoid", "sft"]), "'sft' is a token-level term"),
                       (dict(loss_type="simpo"), "reference-free"),
                       (dict(loss_type=["simpo", "sigmoid"]), "must be used alone"),
                       (dict(loss_type="exo_pair"), "label_smoothing must be > 0"),
                       (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
                       (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "f_divergence_type"),
                       (dict(f_divergence_type="kl"), "f_divergence_type must be one of"),
                       (dict(loss_type="nca_pair", margin=torch.zeros(4)), "margin applies"),
                       (dict(loss_type="sigmoid_norm"), "needs chosen_tokens")):
        with pytest.raises(ValueError, match=needle):
            dpo_loss(c, r, rc, rr, beta=0.1, **kw)
    for kw, needle in ((dict(loss_type="sigmoid"), "loss_type must be one of"),
                       (dict(loss_type="simpo"), "needs chosen_tokens"),
                       (dict(loss_type="orpo", label_smoothing=0.1, chosen_tokens=t, rejected_tokens=t),
                        "label_smoothing does not apply"),
                       (dict(loss_type="cpo", beta=0.0), "beta")):
        with pytest.raises(ValueError, match=needle):
            reference_free_loss(c, r, **{"beta": 0.1, **kw})
    with pytest.raises(ValueError, match="mask must be"):
        ld_weighted_logps(torch.zeros(3, 4), torch.zeros(3, 4), 0.5)
