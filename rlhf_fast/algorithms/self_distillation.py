"""Self-distillation losses (TRL 1.16's experimental SDFT and SDPO, ``trl/experimental/sdft/loss_utils.py``).

The student and the teacher score the same answer tokens, each under its own context (SDFT: the
teacher's prompt holds a privileged context). Per answer token the loss is one of three
``modes``:

* ``topk_logits`` — the divergence on the student's top-``k`` tokens: both distributions
  restricted to those ids, then renormalised over them or, with ``add_tail``, completed by one
  bucket holding the rest of each one's mass (:func:`topk_divergence`);
* ``full_logits`` — the divergence over the whole vocabulary (:func:`full_divergence`);
* ``sampled_token`` — the reverse-KL policy-gradient term of the sampled token,
  ``sg(log p_s − log p_t) · log p_s`` (:func:`sampled_token_loss`; ``alpha`` 1 only).

The divergence (:func:`divergence`) interpolates with ``alpha``: 0 forward KL(teacher ‖ student),
1 reverse KL(student ‖ teacher), in between the generalised Jensen–Shannon divergence with the
mixture (1 − α)·p_s + α·p_t. :func:`importance_clip` weights a token's loss by the detached
ratio π_now / π_rollout, clamped above at ``clip``. Each function is a transcription of TRL's
(same operations, same order), so the numbers are TRL's bit for bit on the same logits.

:func:`self_distillation_loss` is the memory-aware entry: from both models' last hidden states
and LM heads, ``chunk_size`` rows of logits at a time, each chunk recomputed in the backward, so
no ``[N, V]`` logits of the whole batch are ever held.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from rlhf_fast.models.lm_head import HeadTransform, head_logits

MODES = ("topk_logits", "full_logits", "sampled_token")

# rows of logits per chunk when no chunk_size is given: 4M logits (16 MB float32) per model
_CHUNK_ELEMS = 1 << 22


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """The divergence per position ``[...]`` between two log-distributions ``[..., K]`` (same
    support, same dtype): ``alpha`` 0 forward KL(teacher ‖ student), 1 reverse KL(student ‖
    teacher), in between the generalised JSD ``α·KL(t ‖ m) + (1 − α)·KL(s ‖ m)``, m = (1 − α)·s +
    α·t. TRL's ``compute_divergence``."""
    if alpha == 0.0:
        kl = F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True)
    elif alpha == 1.0:
        kl = F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True)
    else:
        a = torch.tensor(alpha, dtype=student_logp.dtype, device=student_logp.device)
        mixture = torch.logsumexp(torch.stack([student_logp + torch.log(1 - a), teacher_logp + torch.log(a)]), dim=0)
        kl_teacher = F.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_logp, reduction="none", log_target=True)
        kl = torch.lerp(kl_student, kl_teacher, alpha)
    return kl.sum(-1)


def add_tail_bucket(logp: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` log-probs of a top-k subset (summing to the captured mass ≤ 1) → ``[..., K + 1]``,
    the last entry log(1 − captured mass), so the result sums to 1 (the captured mass clamped below
    1 by 1e-7 relative, as TRL's ``add_tail_bucket``)."""
    log_s = torch.clamp(torch.logsumexp(logp, dim=-1, keepdim=True), max=-1e-7)
    return torch.cat([logp, torch.log(-torch.expm1(log_s))], dim=-1)


def topk_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, topk: int, alpha: float,
                    add_tail: bool) -> torch.Tensor:
    """:func:`divergence` ``[N]`` on the student's top-``topk`` ids of logits ``[N, V]`` (the
    teacher's log-probs gathered at the same ids), renormalised over them or, with ``add_tail``,
    with one tail bucket each. TRL's ``compute_topk_self_distillation_loss``."""
    student_lse = torch.logsumexp(student_logits, dim=-1, keepdim=True)
    top_s, idx = torch.topk(student_logits, k=topk, dim=-1)
    s = top_s - student_lse
    t = torch.gather(teacher_logits, dim=-1, index=idx) - torch.logsumexp(teacher_logits, dim=-1, keepdim=True)
    if add_tail:
        s, t = add_tail_bucket(s), add_tail_bucket(t)
    else:
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)
    return divergence(s, t, alpha)


def full_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """:func:`divergence` ``[N]`` over the whole vocabulary of logits ``[N, V]``. TRL's
    ``compute_full_logit_self_distillation_loss``."""
    return divergence(torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1), alpha)


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits ``[N, V]``) at ``tokens`` ``[N]`` int64 → ``[N]`` (TRL's
    ``selective_log_softmax`` for float32/float64: logit − logsumexp)."""
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sampled_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, *,
                       alpha: float) -> torch.Tensor:
    """``sg(log p_s(y) − log p_t(y)) · log p_s(y)`` ``[N]`` at the sampled ``tokens`` ``[N]``: its
    gradient is the reverse KL's single-sample estimate. ValueError for ``alpha`` ≠ 1, as TRL's
    ``compute_sampled_token_self_distillation_loss``."""
    if alpha != 1.0:
        raise ValueError(f"sampled_token distillation is reverse KL only: alpha must be 1.0, got {alpha}")
    s = token_logp(student_logits, tokens)
    t = token_logp(teacher_logits, tokens)
    return (s - t).detach() * s


def importance_clip(per_token_loss: torch.Tensor, student_logp: torch.Tensor, old_logp: torch.Tensor,
                    clip: float) -> torch.Tensor:
    """``per_token_loss`` times the detached ratio exp(student_logp − old_logp) (log-ratio clamped
    to ±20), clamped above at ``clip``; all ``[N]``. TRL's ``apply_importance_sampling_clipping``."""
    log_ratio = torch.clamp((student_logp - old_logp).detach(), min=-20.0, max=20.0)
    return per_token_loss * torch.exp(log_ratio).clamp(max=clip)


def token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, *,
                 mode: str = "topk_logits", alpha: float = 0.5, topk: Optional[int] = 100, add_tail: bool = False,
                 old_logp: Optional[torch.Tensor] = None, is_clip: Optional[float] = None) -> torch.Tensor:
    """The per-token loss ``[N]`` of ``mode`` (:data:`MODES`) from logits ``[N, V]`` already at the
    sampling temperature and the answer ``tokens`` ``[N]``; with ``is_clip`` and ``old_logp``
    ``[N]`` (the rollout's log-probs) the importance weight of :func:`importance_clip` — TRL's
    ``_compute_self_distillation_loss`` before its masking and averaging."""
    if mode == "topk_logits":
        if topk is None:
            raise ValueError("mode 'topk_logits' needs topk (an int >= 1)")
        loss = topk_divergence(student_logits, teacher_logits, topk=topk, alpha=alpha, add_tail=add_tail)
    elif mode == "full_logits":
        loss = full_divergence(student_logits, teacher_logits, alpha=alpha)
    elif mode == "sampled_token":
        loss = sampled_token_loss(student_logits, teacher_logits, tokens, alpha=alpha)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if is_clip is not None and old_logp is not None:
        loss = importance_clip(loss, token_logp(student_logits, tokens), old_logp, is_clip)
    return loss


def _chunk(hs, ws, bs, ts, ht, wt, bt, tt, tokens, weights, old, temperature, kw):
    """(Σ weights·loss 0-dim, loss [n] detached, student entropy [n] detached) of one chunk of rows."""
    dt = torch.float64 if hs.dtype == torch.float64 else torch.float32
    zs = head_logits(hs, ws, bs, ts, temperature, dt)
    with torch.no_grad():
        zt = head_logits(ht, wt, bt, tt, temperature, dt)
    loss = token_losses(zs, zt, tokens, old_logp=old, **kw)
    with torch.no_grad():
        lp = torch.log_softmax(zs, dim=-1)
        ent = -(lp.exp() * lp).sum(-1)
    return (loss * weights.to(loss.dtype)).sum(), loss.detach(), ent


def self_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, tokens: torch.Tensor,
                           weights: torch.Tensor, *, student_bias: Optional[torch.Tensor] = None,
                           teacher_bias: Optional[torch.Tensor] = None,
                           student_transform: Optional[HeadTransform] = None,
                           teacher_transform: Optional[HeadTransform] = None, temperature: float = 1.0,
                           mode: str = "topk_logits", alpha: float = 0.5, topk: Optional[int] = 100,
                           add_tail: bool = False, old_logp: Optional[torch.Tensor] = None,
                           is_clip: Optional[float] = None,
                           chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted self-distillation loss of ``N`` answer tokens from hidden states.

    student_hidden ``[N, H]`` (differentiable), teacher_hidden ``[N, Ht]`` (the same tokens, each
    under the teacher's context), heads ``[V, H]`` / ``[V, Ht]`` (biases ``[V]``, transforms: a
    scale or softcap after the head, :class:`~rlhf_fast.models.lm_head.HeadTransform`); tokens
    ``[N]`` int64 (the answer tokens these states predict); weights ``[N]`` float (the token's
    share in the loss: TRL's per-answer mean over the answers is 1 / (answer tokens · answers));
    old_logp ``[N]`` float32 or None. Logits are ``head(h) / temperature`` in float32 (float64
    for float64 states), ``chunk_size`` rows at a time (None: 4M logits per model); with grad,
    each chunk's logits are recomputed in the backward. Returns ``(Σ weights·loss`` 0-dim,
    differentiable in the student only; the per-token loss ``[N]`` and the student's entropy
    ``[N]``, both detached``)``."""
    N, V = student_hidden.shape[0], student_weight.shape[0]
    if teacher_hidden.shape[0] != N or tokens.shape != (N,) or weights.shape != (N,):
        raise ValueError(f"student_hidden [N, H], teacher_hidden [N, Ht], tokens [N] and weights [N] must agree on "
                         f"N, got {tuple(student_hidden.shape)}, {tuple(teacher_hidden.shape)}, "
                         f"{tuple(tokens.shape)}, {tuple(weights.shape)}")
    if teacher_weight.shape[0] != V:
        raise ValueError(f"the heads must have the same rows (vocabulary), got {V} and {teacher_weight.shape[0]}")
    if mode == "topk_logits" and (topk is None or not 1 <= topk <= V):
        raise ValueError(f"topk must be an int in [1, {V}] (the vocabulary) for mode 'topk_logits', got {topk!r}")
    kw = dict(mode=mode, alpha=alpha, topk=topk, add_tail=add_tail, is_clip=is_clip)
    ts, tt = student_transform or HeadTransform(), teacher_transform or HeadTransform()
    rows = chunk_size or max(1, _CHUNK_ELEMS // max(V, 1))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (student_hidden, student_weight, student_bias))
    sums, losses, ents = [], [], []
    for s in range(0, N, rows):
        old = None if old_logp is None else old_logp[s:s + rows]
        args = (student_hidden[s:s + rows], student_weight, student_bias, ts, teacher_hidden[s:s + rows],
                teacher_weight, teacher_bias, tt, tokens[s:s + rows], weights[s:s + rows], old, temperature, kw)
        if grad:  # keep the chunk's inputs, not its [rows, V] logits and softmaxes
            total, loss, ent = torch.utils.checkpoint.checkpoint(_chunk, *args, use_reentrant=False)
        else:
            total, loss, ent = _chunk(*args)
        sums.append(total)
        losses.append(loss)
        ents.append(ent)
    if not sums:
        z = student_hidden.sum() * 0.0
        return z.float(), student_hidden.new_zeros(0, dtype=torch.float32), student_hidden.new_zeros(0)
    return torch.stack(sums).sum(), torch.cat(losses), torch.cat(ents)


__all__ = ["MODES", "add_tail_bucket", "divergence", "full_divergence", "importance_clip", "sampled_token_loss",
           "self_distillation_loss", "token_logp", "token_losses", "topk_divergence"]
