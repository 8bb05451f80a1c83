"""The pairwise preference losses of ``rlhf-fast dpo``: TRL 1.16's ``DPOTrainer`` loss family,
and the reference-free SimPO / CPO (TRL's ``CPOTrainer``) and ORPO (``ORPOTrainer``).

Inputs are per pair: summed response log-probs ``[B]`` of the policy (differentiable) and, for
the reference-based losses, of the reference (constant), plus response token counts where a
loss length-normalises. With the log-ratios l = log π(y | x) − log π_ref(y | x), the f-divergence
scores s = f'(l) (:func:`f_divergence_scores`; s = l for the default ``reverse_kl``) and
δ = s_c − s_r, the reference-based ``loss_type`` values (formulas as TRL 1.16's
``DPOTrainer._compute_loss``, trl/trainer/dpo_trainer.py):

* ``sigmoid``: −(1−ε)·log σ(βδ) − ε·log σ(−βδ) (ε = ``label_smoothing``: cDPO; TRL 1.x dropped
  ε from ``sigmoid``, so TRL is ε = 0 — the one deliberate difference);
* ``robust``: (−(1−ε)·log σ(βδ) + ε·log σ(−βδ)) / (1 − 2ε);
* ``ipo``: (δ' − 1/(2β))², δ' from per-token means s / response tokens;
* ``hinge``: relu(1 − βδ);
* ``exo_pair`` (EXO): q_w·(log q_w − log(1−ε)) + q_l·(log q_l − log ε), q_w = σ(βδ), q_l = σ(−βδ);
  needs ε > 0 (log ε), refused at ε = 0 as TRL does (the paper uses ε = 1e-3);
* ``nca_pair``: −log σ(βl_c) − ½·log σ(−βl_c) − ½·log σ(−βl_r);
* ``bco_pair``: −log σ(βl_c) − log σ(−βl_r);
* ``sppo_hard``: (l_c − 1/(2β))² + (l_r + 1/(2β))²;
* ``aot`` / ``aot_unpaired`` (AOT): the cDPO form above on Δ = sort(log π_c − log π_r) −
  sort(log π_ref,c − log π_ref,r) (``aot``), or sort(l_c) − sort(l_r) (``aot_unpaired``), sorted
  ascending over the micro-batch. These are **batch-level** losses: entry i of the loss is
  no longer pair i's, and a different micro-batch split (``batch_size`` / ``grad_accum``, the
  number of ranks: each rank sorts its own share, as TRL sorts per device) gives a different
  objective; per-pair weights (``annotator_weights``) are refused with them (TRL refuses WPO
  weighting for the same reason);
* ``apo_zero``: 1 − σ(βl_c) + σ(βl_r); ``apo_down``: σ(βl_c) + 1 − σ(β(l_c − l_r));
* ``discopop``: (1 − m)·(−log σ(βδ)) + m·exp(−βδ), m = σ(βδ / τ), τ = ``discopop_tau`` (m·exp(−βδ)
  computed as exp(log σ(βδ / τ) − βδ): finite where TRL's e^(−βδ) × m is inf × 0 = NaN, βδ < −88.7);
* ``sigmoid_norm``: −log σ(βδ'), δ' the per-token-mean difference of ``ipo``;
* ``sft``: the token-mean NLL of the chosen responses (a token-level term, not a per-pair
  loss: the trainer adds it, like ``rpo_alpha``).

``f_divergence_type`` other than ``reverse_kl`` applies to ``sigmoid``, ``robust``, ``ipo``,
``hinge``, ``exo_pair``, ``discopop``, ``sigmoid_norm`` and ``sft`` only (TRL refuses the
others: their β·log Z(x) term does not cancel); the α-divergence clamps (α−1)·l at 80 before
exp, as TRL does in float32 (TRL has no float64 entry; here float64 is clamped at 80 too).
The logged rewards are β·l whatever the f-divergence, as TRL logs them.

Reference-free (no reference model, no reference forward), with ā = log π / response tokens:

* ``simpo`` (TRL ``CPOTrainer`` with ``loss_type="simpo"``): −(1−ε)·log σ(β(ā_c − ā_r) − γ)
  − ε·log σ(−β(ā_c − ā_r) + γ), γ = ``simpo_gamma``; rewards β·ā; the trainer adds
  ``cpo_alpha`` × the token-mean NLL of the chosen responses (TRL's default 1.0: CPO-SimPO;
  ``cpo_alpha: 0`` for the SimPO paper's loss);
* ``cpo`` (``CPOTrainer``, ``loss_type="sigmoid"``): the same on summed log-probs without γ,
  rewards β·log π, plus ``cpo_alpha`` × NLL;
* ``cpo_hinge`` (``CPOTrainer``, ``loss_type="hinge"``): relu(1 − β(log π_c − log π_r)) on summed
  log-probs; ``cpo_ipo`` (``loss_type="ipo"``): (ā_c − ā_r − 1/(2β))² on token means; rewards
  β·log π and β·ā; both plus ``cpo_alpha`` × NLL, no label smoothing (TRL ignores it there);
* AlphaPO (``alpha`` ≠ 0, TRL's CPOConfig ``alpha``; all four CPO losses): each response's score
  s (log π, or ā where the loss takes token means) becomes (1 − e^(−α·s)) / α, i.e. (1 − p^(−α)) / α
  with p = e^s, before the loss, and the rewards are β × it (TRL computes p^(−α) as
  ``exp(s).pow(-α)``, which is inf once e^s underflows; e^(−α·s) is the same number without
  that);
* ``orpo`` (``ORPOTrainer``): −β·log σ(log-odds), log-odds = (ā_c − ā_r) − (log(1 − e^ā_c) −
  log(1 − e^ā_r)), β being ORPO's λ; rewards β·ā; the trainer adds the NLL of the chosen rows
  over prompt *and* response tokens (TRL computes ORPO's NLL on the full sequence). One
  deliberate difference: ā is clamped to ≤ −1e-7 inside log(1 − e^ā) (TRL gives −∞ and NaN
  gradients when every token of a response has probability 1 in floating point).

* ``tpo`` / ``tpo_hinge`` / ``tpo_ipo`` / ``tpo_l`` (TRL's experimental ``TPOTrainer``,
  ``loss_type`` ``sigmoid`` / ``hinge`` / ``ipo`` / ``tpo-l``): the formulas, rewards and logged
  log-probs of ``cpo`` / ``cpo_hinge`` / ``cpo_ipo`` / ``simpo`` (``tpo_l``'s γ = ``tpo_l_gamma``,
  passed as ``simpo_gamma``); no AlphaPO; the trainer adds ``tpo_alpha`` × the token-mean NLL of
  the gold (``reference``) responses, a third row per pair (:mod:`rlhf_fast.trainers.tpo`).

The NLL terms (``sft``, ``rpo_alpha``, ``cpo_alpha``, ORPO's, ``tpo_alpha``'s of the gold rows) are
token means over every NLL token of the optimizer step (TRL: of the micro-batch; the same with one
micro-batch).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from rlhf_fast.ops._validate import finite, tensor

REFERENCE_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")
# TRL's experimental TPOTrainer (sigmoid, hinge, ipo, tpo-l): CPO's losses on chosen / rejected, tpo_l SimPO's
# with its own margin; their NLL term is on a third row, the gold response (rlhf_fast.trainers.tpo)
TPO_LOSSES = {"tpo": "cpo", "tpo_hinge": "cpo_hinge", "tpo_ipo": "cpo_ipo", "tpo_l": "simpo"}
REFERENCE_FREE_LOSSES = ("simpo", "cpo", "cpo_hinge", "cpo_ipo", "orpo") + tuple(TPO_LOSSES)
# the reference-free losses AlphaPO's reward shape (``alpha``) applies to: TRL's CPOTrainer's
ALPHA_LOSSES = frozenset({"simpo", "cpo", "cpo_hinge", "cpo_ipo"})
LOSS_TYPES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses built on the chosen − rejected score difference (TRL's f_divergence_loss_types)
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
SMOOTHED_LOSSES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo",
                             "tpo", "tpo_l"})
# sft has no βδ: a margin leaves it as is, so it may only stand beside a margin loss (DPOConfig refuses it alone)
MARGIN_LOSSES = frozenset({"sigmoid", "robust", "hinge", "sft"})
BATCH_LOSSES = frozenset({"aot", "aot_unpaired"})
LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm", "simpo", "cpo_ipo", "orpo", "tpo_ipo", "tpo_l"})

LossType = Union[str, Sequence[str]]


def loss_terms(loss_type: LossType, loss_weights: Optional[Sequence[float]] = None) -> Tuple[Tuple[str, float], ...]:
    """``((name, weight), ...)`` of ``loss_type`` — one name, a comma-separated string or a
    list of names — with ``loss_weights`` (None: 1.0 each; else one finite weight ≥ 0 per name).
    A reference-free loss (simpo, cpo, orpo) must be the only one. ValueError naming the field."""
    if isinstance(loss_type, str):
        names = [s.strip() for s in loss_type.split(",")]
    elif isinstance(loss_type, (list, tuple)) and all(isinstance(s, str) for s in loss_type):
        names = [s.strip() for s in loss_type]
    else:
        raise ValueError(f"loss_type must be a loss name or a list of them (one of {LOSS_TYPES}), got {loss_type!r}")
    if not names or any(n not in LOSS_TYPES for n in names):
        bad = [n for n in names if n not in LOSS_TYPES] or names
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (or a list of them), got {bad!r}")
    if loss_weights is None:
        weights = [1.0] * len(names)
    else:
        if not isinstance(loss_weights, (list, tuple)):
            raise ValueError(f"loss_weights must be null or a list of numbers, got {loss_weights!r}")
        if len(loss_weights) != len(names):
            raise ValueError(f"loss_weights must have one weight per loss_type entry ({len(names)}: {names}), "
                             f"got {len(loss_weights)}: {list(loss_weights)}")
        weights = [finite(f"loss_weights[{i}]", w, ">= 0") for i, w in enumerate(loss_weights)]
    free = [n for n in names if n in REFERENCE_FREE_LOSSES]
    if free and len(names) > 1:
        raise ValueError(f"loss_type: the reference-free loss {free[0]!r} must be used alone (no reference model "
                         f"is loaded for it), got {names}")
    return tuple(zip(names, (float(w) for w in weights)))


def is_reference_free(terms: Sequence[Tuple[str, float]]) -> bool:
    """Whether ``terms`` (:func:`loss_terms`) is one reference-free loss."""
    return len(terms) == 1 and terms[0][0] in REFERENCE_FREE_LOSSES


def f_divergence_scores(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, kind: str = "reverse_kl",
                        alpha: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s_c, s_r)``: f'(t) at t = π / π_ref for the log-ratios ``[B]`` (same shape and dtype):
    reverse_kl log t; forward_kl 1 − 1/t; js_divergence log 2 + log σ(log t); alpha_divergence
    (t^(α−1) − 1)/(α−1) with (α−1)·log t clamped at 80 (log t when |α − 1| < 1e-6), as TRL."""
    if kind == "reverse_kl":
        return chosen_ratio, rejected_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-chosen_ratio), 1 - torch.exp(-rejected_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen_ratio), math.log(2) + F.logsigmoid(rejected_ratio)
    if kind == "alpha_divergence":
        finite("f_alpha_divergence_coef", alpha)
        if abs(alpha - 1.0) < 1e-6:  # the limit is log t: reverse KL
            return chosen_ratio, rejected_ratio
        coef = 1.0 / (alpha - 1.0)
        # clamped so exp stays finite in float32 (TRL's bound)
        return ((torch.exp(torch.clamp((alpha - 1.0) * chosen_ratio, max=80.0)) - 1.0) * coef,
                (torch.exp(torch.clamp((alpha - 1.0) * rejected_ratio, max=80.0)) - 1.0) * coef)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {kind!r}")


def _check_tensors(required: Dict[str, object], optional: Dict[str, object]) -> None:
    """TypeError naming the first of ``required`` (name → value) that is not a tensor, or of
    ``optional`` that is neither None nor a tensor."""
    for name, t in required.items():
        tensor(name, t)
    for name, t in optional.items():
        if t is not None:
            tensor(name, t)


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    loss = -(1.0 - eps) * F.logsigmoid(logits)
    return loss - eps * F.logsigmoid(-logits) if eps > 0 else loss


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    margin: Optional[torch.Tensor] = None,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss [B], chosen_rewards [B], rejected_rewards [B])`` of B pairs, reference-based.

    The four log-prob tensors are ``[B]`` summed response log-probs (policy differentiable,
    reference constant); ``loss`` is Σ_k weight_k · loss_k per pair (float32; float64 for
    float64 input), before any averaging (for ``aot`` / ``aot_unpaired`` entry i is the i-th
    sorted term, not pair i's); the rewards β·(log π − log π_ref) are detached. ``loss_type``:
    a name or a list (with ``loss_weights``, one each) from the module docstring, without
    ``sft`` (a token-level term the caller adds) or a reference-free loss
    (:func:`reference_free_loss`). ``margin`` ``[B]`` is subtracted from βδ (sigmoid, robust,
    hinge only); ``chosen_tokens`` / ``rejected_tokens`` ``[B]`` (response token counts) are
    needed by ``ipo`` and ``sigmoid_norm``.
    """
    terms = loss_terms(loss_type, loss_weights)
    names = [n for n, _ in terms]
    if "sft" in names:
        raise ValueError("loss_type 'sft' is a token-level term (the token-mean NLL of the chosen responses), not a "
                         "per-pair loss: add weight x NLL yourself (DPOTrainer does)")
    if any(n in REFERENCE_FREE_LOSSES for n in names):
        raise ValueError(f"loss_type {names[0]!r} is reference-free: use reference_free_loss")
    finite("beta", beta, "> 0")
    if not 0.0 <= finite("label_smoothing", label_smoothing, ">= 0") < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in names and label_smoothing == 0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (its target [1-eps, eps] has log eps; "
                         "the EXO paper uses 1e-3)")
    if "discopop" in names:
        finite("discopop_tau", discopop_tau, "> 0")
    if f_divergence_type != "reverse_kl" and not set(names) <= F_DIVERGENCE_LOSSES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} applies to loss types {sorted(F_DIVERGENCE_LOSSES)} "
                         f"only, got {names}")
    _check_tensors(dict(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                        ref_rejected_logps=ref_rejected_logps),
                   dict(margin=margin, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens))
    shape = tuple(chosen_logps.shape)
    for name, t in (("rejected_logps", rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps), ("margin", margin), ("chosen_tokens", chosen_tokens),
                    ("rejected_tokens", rejected_tokens)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of chosen_logps {shape}, got {tuple(t.shape)}")
    if len(shape) != 1:
        raise ValueError(f"chosen_logps must be [B], got {shape}")
    if margin is not None and not set(names) <= MARGIN_LOSSES:
        raise ValueError(f"margin applies to loss types {sorted(MARGIN_LOSSES - {'sft'})} only, got {names}")
    if set(names) & LENGTH_NORMALISED and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"loss_type {sorted(set(names) & LENGTH_NORMALISED)} needs chosen_tokens and rejected_tokens")
    dt = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    pc, pr = chosen_logps.to(dt), rejected_logps.to(dt)
    rc, rr = ref_chosen_logps.to(dt), ref_rejected_logps.to(dt)
    cr, rj = pc - rc, pr - rr  # the log-ratios l_c, l_r
    sc, sr = f_divergence_scores(cr, rj, f_divergence_type, f_alpha_divergence_coef)
    eps = float(label_smoothing)
    logits = beta * (sc - sr)
    if margin is not None:
        logits = logits - margin.to(dt)

    def per_token_delta():
        return sc / chosen_tokens.to(dt).clamp(min=1) - sr / rejected_tokens.to(dt).clamp(min=1)

    total = torch.zeros(shape, dtype=dt, device=chosen_logps.device)
    for name, w in terms:
        if name == "sigmoid":
            loss = _smoothed(logits, eps)
        elif name == "robust":
            loss = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
        elif name == "ipo":
            loss = (per_token_delta() - 1.0 / (2.0 * beta)) ** 2
        elif name == "hinge":
            loss = torch.relu(1.0 - logits)
        elif name == "exo_pair":
            loss = (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
                    + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps)))
        elif name == "nca_pair":
            loss = -F.logsigmoid(beta * cr) - 0.5 * F.logsigmoid(-beta * cr) - 0.5 * F.logsigmoid(-beta * rj)
        elif name == "bco_pair":
            loss = -F.logsigmoid(beta * cr) - F.logsigmoid(-beta * rj)
        elif name == "sppo_hard":
            loss = (cr - 0.5 / beta) ** 2 + (rj + 0.5 / beta) ** 2
        elif name == "aot":
            delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
            loss = _smoothed(beta * delta, eps)
        elif name == "aot_unpaired":
            delta = torch.sort(cr, dim=0).values - torch.sort(rj, dim=0).values
            loss = _smoothed(beta * delta, eps)
        elif name == "apo_zero":
            loss = 1 - torch.sigmoid(beta * cr) + torch.sigmoid(beta * rj)
        elif name == "apo_down":
            loss = torch.sigmoid(beta * cr) + 1 - torch.sigmoid(beta * (cr - rj))
        elif name == "discopop":
            mod = torch.sigmoid(logits / discopop_tau)
            # e^(−x)·σ(x/τ) as exp(−x + log σ(x/τ)): TRL's e^(−x) × σ(x/τ) is inf × 0 = NaN once x < −88.7
            loss = -F.logsigmoid(logits) * (1 - mod) + torch.exp(F.logsigmoid(logits / discopop_tau) - logits)
        else:  # sigmoid_norm
            loss = -F.logsigmoid(beta * per_token_delta())
        total = total + w * loss
    return total, beta * cr.detach(), beta * rj.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, as TRL's ``log1mexp`` (branch at −log 2 against cancellation);
    x is clamped to ≤ −1e-7 first (at 0 the value is −∞ and the gradient NaN)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def reference_free_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """SimPO / CPO (sigmoid, hinge, IPO) / ORPO / TPO pair losses from the policy's summed
    response log-probs ``[B]`` (``chosen_tokens`` / ``rejected_tokens`` ``[B]``, the response
    token counts, needed by the token-mean losses). Returns ``[B]`` tensors (float32; float64
    for float64 input): ``loss`` (per pair, before averaging; without the NLL term the caller
    adds), detached ``chosen_rewards`` /
    ``rejected_rewards`` and ``chosen_logps`` / ``rejected_logps`` as TRL logs them (β· and the
    token means for simpo / orpo, the sums for cpo), and for orpo ``log_odds_chosen`` (the
    log-odds) and ``log_odds_ratio`` (log σ of it). ``alpha`` ≠ 0: AlphaPO's reward shape (not
    for orpo). Formulas: the module docstring."""
    if loss_type not in REFERENCE_FREE_LOSSES:
        raise ValueError(f"loss_type must be one of {REFERENCE_FREE_LOSSES}, got {loss_type!r}")
    finite("beta", beta, "> 0")
    finite("simpo_gamma", simpo_gamma)
    if not 0.0 <= finite("label_smoothing", label_smoothing, ">= 0") < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type in ("orpo", "cpo_hinge", "cpo_ipo", "tpo_hinge", "tpo_ipo") and label_smoothing > 0:
        raise ValueError(f"label_smoothing does not apply to loss_type {loss_type!r}")
    finite("alpha", alpha)
    if alpha != 0 and loss_type not in ALPHA_LOSSES:
        raise ValueError(f"alpha (AlphaPO) applies to loss_type {sorted(ALPHA_LOSSES)} only, not {loss_type!r}")
    _check_tensors(dict(chosen_logps=chosen_logps, rejected_logps=rejected_logps),
                   dict(chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens))
    shape = tuple(chosen_logps.shape)
    if len(shape) != 1:
        raise ValueError(f"chosen_logps must be [B], got {shape}")
    for name, t in (("rejected_logps", rejected_logps), ("chosen_tokens", chosen_tokens),
                    ("rejected_tokens", rejected_tokens)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of chosen_logps {shape}, got {tuple(t.shape)}")
    dt = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    c, r = chosen_logps.to(dt), rejected_logps.to(dt)
    if loss_type in LENGTH_NORMALISED:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_tokens and rejected_tokens")
        c, r = c / chosen_tokens.to(dt).clamp(min=1), r / rejected_tokens.to(dt).clamp(min=1)
    loss_type = TPO_LOSSES.get(loss_type, loss_type)  # TPO's formulas are CPO's / SimPO's
    out: Dict[str, torch.Tensor] = {}
    if loss_type == "orpo":
        log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
        ratio = F.logsigmoid(log_odds)
        out["loss"] = -beta * ratio
        out["log_odds_chosen"], out["log_odds_ratio"] = log_odds.detach(), ratio.detach()
    else:
        sc, sr = (c, r) if alpha == 0 else (alphapo_reward(c, alpha), alphapo_reward(r, alpha))
        logits = sc - sr
        if loss_type == "cpo_hinge":
            out["loss"] = torch.relu(1 - beta * logits)
        elif loss_type == "cpo_ipo":  # β is IPO's τ (eq. 17)
            out["loss"] = (logits - 1 / (2 * beta)) ** 2
        else:
            if loss_type == "simpo":
                logits = logits - simpo_gamma / beta
            out["loss"] = _smoothed(beta * logits, float(label_smoothing))
    rc, rr = (sc, sr) if loss_type != "orpo" else (c, r)  # TRL logs β × the (shaped) scores
    out["chosen_rewards"], out["rejected_rewards"] = beta * rc.detach(), beta * rr.detach()
    out["chosen_logps"], out["rejected_logps"] = c.detach(), r.detach()
    return out


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward (1 − p^(−α)) / α of log-probs ``logps`` (any shape, differentiable; TRL
    CPOTrainer's ``cpo_loss``), computed as (1 − e^(−α·logp)) / α, which stays finite where
    e^logp underflows."""
    return (1 - torch.exp(-alpha * logps)) / alpha


def ld_weighted_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's summed log-probs ``[2B]`` of the rows ``[chosen × B, rejected × B]``: the
    per-token log-probs ``token_logps`` ``[2B, T]`` over the response ``mask`` ``[2B, T]`` (0/1
    or bool), the first min(len_c, len_r) response tokens of each row at weight 1 and the rest
    of the longer response at ``ld_alpha`` (TRL's ``ld_alpha``)."""
    finite("ld_alpha", ld_alpha, ">= 0")
    _check_tensors(dict(token_logps=token_logps, mask=mask), {})
    if token_logps.dim() != 2 or tuple(mask.shape) != tuple(token_logps.shape) or token_logps.shape[0] % 2:
        raise ValueError(f"token_logps and mask must be [2B, T] of one shape, got {tuple(token_logps.shape)} and "
                         f"{tuple(mask.shape)}")
    m = mask.bool()
    pos = m.long().cumsum(1)  # 1-based position inside the response
    lens = m.sum(1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2)[:, None]
    lp = token_logps * m
    return (lp * (pos <= shared)).sum(1) + ld_alpha * (lp * (pos > shared)).sum(1)


__all__ = ["LOSS_TYPES", "REFERENCE_LOSSES", "REFERENCE_FREE_LOSSES", "F_DIVERGENCES", "F_DIVERGENCE_LOSSES",
           "SMOOTHED_LOSSES", "MARGIN_LOSSES", "BATCH_LOSSES", "loss_terms", "is_reference_free",
           "f_divergence_scores", "dpo_loss", "reference_free_loss", "alphapo_reward", "ld_weighted_logps",
           "ALPHA_LOSSES", "TPO_LOSSES"]
