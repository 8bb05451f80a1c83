"""Online DPO: TRL 1.16's experimental ``OnlineDPOTrainer`` on the RL trainer's machinery.

Python API::

    from rlhf_fast.trainers.online_dpo import OnlineDPOTrainer
    from rlhf_fast.trainers.rl_config import OnlineDPOConfig, RLConfig, RolloutConfig
    cfg = RLConfig(estimator="online_dpo", rollout=RolloutConfig(group_size=2),
                   online_dpo=OnlineDPOConfig(beta=0.1, loss_type="sigmoid"))
    OnlineDPOTrainer(cfg, reward_fns=[my_fn]).train()     # or pairwise_judge=judge, no reward

One step, as TRL's ``training_step``: the policy answers ``rollout.prompts_per_step`` prompts
twice each with the RL trainer's rollout engine (chat templates, tools, stop strings, seeds) →
the run's reward sources score every answer (weighted, as RL; an answer that no TRL-convention
function scored counts 0, TRL's ``nansum``), ``online_dpo.missing_eos_penalty`` is subtracted
from the answers holding no eos token, and of each prompt's pair the first answer is chosen when
its score is >= the second's (:func:`first_is_chosen`, TRL's ``first_half >= second_half``) — or
a pairwise judge picks (TRL's ``rank == 0`` rule) → the pairs are laid out chosen, rejected,
chosen, … and the reference's summed log-probs of each answer taken once (no grad; with
``ppo.prefix_sharing`` each pair's prompt computed once, by the reference and in the update) → ``ppo.epochs``
passes over mini-batches of whole pairs: the policy's summed log-probs (the fused log-prob head,
micro-batched), the per-pair loss (:func:`online_dpo_losses`, sigmoid −log σ(β·Δ) or IPO
(Δ − 1/(2β))²) summed and divided by the pairs of the whole mini-batch on every rank (TRL's
``losses.mean()``; micro-batching never changes the gradient).

Log-probs are those of the plain distribution (temperature 1), as TRL's ``_forward`` takes
them whatever its sampling ``temperature``; each answer's sum runs over its own tokens up to and
including its eos (TRL's ``truncate_right`` mask; tool results are out). TRL's ``objective/kl``
and ``objective/entropy`` sum over every completion column, the padding after an eos included;
ours over the answer's tokens only (equal for answers without padding). The statistics of the
pairs (TRL's names, :func:`pair_metrics`) come from the forwards of the first epoch: TRL's own
when the update is TRL's one step (``ppo.epochs`` 1, ``ppo.mini_batch_size`` = the rollout
batch); with several mini-batches the later ones see the policy after the earlier steps.
Evaluation, checkpoints and exact resume, LoRA (the reference: the policy with its adapters
off), DDP / FSDP2 are the RL trainer's; the judge holds no state.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from rlhf_fast.trainers.rl import RLTrainer, RolloutTensors, with_estimator
from rlhf_fast.trainers.rl_config import ONLINE_DPO, RLConfig

# update statistics under TRL's names
_RENAMED = {"policy/loss": "loss", "policy/grad_norm": "grad_norm"}


def _check_pairs(name: str, t, like: Optional[torch.Tensor] = None) -> None:
    """ValueError naming ``name`` unless ``t`` is a 1-D tensor of an even number of rows (pair i
    at rows 2i, 2i + 1; an odd count would broadcast one half against the other), of ``like``'s
    shape when given."""
    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() % 2 or (like is not None
                                                                          and t.shape != like.shape):
        want = f"of shape {tuple(like.shape)}" if like is not None else "of 2N rows"
        raise ValueError(f"{name} must be a 1-D tensor {want} (pair i at rows 2i, 2i + 1), got {shape}")


def first_is_chosen(scores: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: whether each pair's first answer is the chosen one. ``scores`` ``[2N]``
    float, the two answers of pair i at rows 2i and 2i + 1. TRL's rule: the first wins ties
    (``first_half >= second_half``). ValueError for another shape."""
    _check_pairs("scores", scores)
    return scores[0::2] >= scores[1::2]


def chosen_first_rows(first: torch.Tensor) -> torch.Tensor:
    """``[2N]`` int64: the rows of a ``[2N]`` batch of pairs (rows 2i, 2i + 1) reordered to
    chosen, rejected, chosen, … — pair i's chosen answer at 2i. ``first`` ``[N]`` bool from
    :func:`first_is_chosen` (or a judge); TypeError for another dtype or shape (``~`` of an
    int mask is no negation)."""
    if not isinstance(first, torch.Tensor) or first.dtype != torch.bool or first.dim() != 1:
        got = f"{first.dtype} {tuple(first.shape)}" if isinstance(first, torch.Tensor) else type(first).__name__
        raise TypeError(f"first must be a 1-D bool tensor (one per pair), got {got}")
    base = 2 * torch.arange(first.numel(), device=first.device)
    pick = (~first).long()
    return torch.stack([base + pick, base + 1 - pick], dim=1).reshape(-1)


def online_dpo_losses(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_ref: torch.Tensor,
                      rejected_ref: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair losses ``[N]`` float32 of TRL OnlineDPOTrainer.training_step from the answers'
    summed log-probs (each ``[N]``): Δ = (chosen − rejected) − (chosen_ref − rejected_ref);
    ``sigmoid``: −log σ(β·Δ); ``ipo``: (Δ − 1/(2β))². Differentiable in the policy's sums."""
    logits = (chosen_logp - rejected_logp) - (chosen_ref - rejected_ref)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"online_dpo.loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")


def pair_metrics(logp: torch.Tensor, ref: torch.Tensor, beta: float, scores: Optional[torch.Tensor] = None
                 ) -> Dict[str, float]:
    """TRL OnlineDPOTrainer's statistics of a step from each answer's summed log-probs ``logp``
    and ``ref`` ``[2N]`` float (rows chosen, rejected, chosen, …) and, with reward sources, the
    scores ``[2N]`` (after the missing-eos penalty): ``objective/kl`` (mean over answers of
    logp − ref), ``objective/entropy`` (−mean logp), ``objective/non_score_reward`` (−β·kl),
    ``objective/rlhf_reward`` (mean of score − β·(logp − ref)), ``rewards/chosen`` /
    ``rewards/rejected`` (mean β·(logp − ref) of each side), ``rewards/margins``,
    ``rewards/accuracies`` (share of pairs whose chosen reward is strictly the larger),
    ``logps/chosen`` / ``logps/rejected`` and ``beta``. ValueError for other shapes."""
    _check_pairs("logp", logp)
    _check_pairs("ref", ref, logp)
    if scores is not None:
        _check_pairs("scores", scores, logp)
    return _metrics_from_sums(_pair_sums(logp, ref, beta, scores), beta)


def _pair_sums(logp, ref, beta: float, scores=None) -> torch.Tensor:
    """``[9]`` float64 sums over pairs (then the pair count): those :func:`_metrics_from_sums`
    divides, so that ranks add them up before (NaN-free: rlhf_reward's sum is 0 without scores)."""
    logp, ref = logp.detach().double(), ref.detach().double()
    kl = logp - ref  # [2N]
    rc, rr = beta * kl[0::2], beta * kl[1::2]
    rlhf = (scores.double() - beta * kl).sum() if scores is not None else kl.new_zeros(())
    return torch.stack([kl.sum(), logp.sum(), rlhf, rc.sum(), rr.sum(), (rc > rr).double().sum(), logp[0::2].sum(),
                        logp[1::2].sum(), kl.new_tensor(float(rc.numel()))])


def _metrics_from_sums(v: torch.Tensor, beta: float, with_scores: bool = True) -> Dict[str, float]:
    n = float(v[8])
    if n == 0:
        return {}
    kl = float(v[0]) / (2 * n)
    out = {"objective/kl": kl, "objective/entropy": -float(v[1]) / (2 * n), "objective/non_score_reward": -beta * kl,
           "rewards/chosen": float(v[3]) / n, "rewards/rejected": float(v[4]) / n,
           "rewards/margins": (float(v[3]) - float(v[4])) / n, "rewards/accuracies": float(v[5]) / n,
           "logps/chosen": float(v[6]) / n, "logps/rejected": float(v[7]) / n, "beta": beta}
    if with_scores:
        out["objective/rlhf_reward"] = float(v[2]) / (2 * n)
    return out


def load_pairwise_judge(spec: str) -> Callable:
    """The ``judge(prompts, pairs)`` callable of ``online_dpo.judge`` (``module:name`` or
    ``file.py:name``): the object's ``judge`` method (a class is instantiated first, without
    arguments), or the object itself when it is a plain function. ValueError naming
    ``online_dpo.judge`` where it cannot be loaded (a missing ``.py`` file: the judge's file)."""
    from rlhf_fast.algorithms import load_callable

    try:
        obj = load_callable(spec, what="judge")
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"online_dpo.judge: {e}") from None
    return _judge_callable(obj, "online_dpo.judge")


def _whole(r) -> bool:
    """An int a judge may give for a pair: a Python / numpy int or a one-element integer (or
    bool) tensor; not a float one, which int() would truncate (0.9 → 0, the first answer)."""
    return isinstance(r, numbers.Integral) or (isinstance(r, torch.Tensor) and r.numel() == 1
                                               and not (r.is_floating_point() or r.is_complex()))


def _judge_callable(obj, key: str) -> Callable:
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as e:
            raise ValueError(f"{key}: the class {obj.__name__} cannot be built without arguments ({e}); give an "
                             f"instance or a function") from None
    fn = getattr(obj, "judge", None)
    if callable(fn):
        return fn
    if callable(obj):
        return obj
    raise TypeError(f"{key} must be a pairwise judge (an object with judge(prompts, pairs), or such a function), "
                    f"got {type(obj).__name__}")


class OnlineDPOTrainer(RLTrainer):
    """Online DPO (TRL's experimental ``OnlineDPOTrainer``): :class:`~rlhf_fast.trainers.rl.RLTrainer`
    with ``estimator: online_dpo``, whose ``config.online_dpo``
    (:class:`~rlhf_fast.trainers.rl_config.OnlineDPOConfig`) holds β, the loss type, the
    missing-eos penalty and the judge.

    config / policy / tokenizer / reward_fns / reward_weights / reward_models / judge / prompts /
    eval_prompts / reference / engine / tools / environment_factory: as
    :class:`~rlhf_fast.trainers.rl.RLTrainer` (``judge`` there is a pointwise AI judge, one of the
    reward sources). pairwise_judge: a pairwise judge (an object with ``judge(prompts, pairs)``, or
    that function) in place of ``online_dpo.judge``. ``critic`` is refused.

    Logs per step TRL's ``loss`` (the mean over the optimizer steps of the mini-batch loss),
    ``grad_norm``, ``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected``, ``val/contain_eos_token``, ``beta`` and, with reward
    sources, ``objective/rlhf_reward``, ``objective/scores`` (the mean score after the penalty) and
    ``objective/scores_margin`` (chosen − rejected); ours: ``reward/*`` (each source and the raw
    total, as RL), ``response_length/mean``, ``rollout/truncated_frac``, ``tokens_per_second``,
    ``step_time``, ``lr``. Samples hold each answer's score and whether it was ``chosen``."""

    _online_dpo = True

    def __init__(self, config: RLConfig, policy=None, tokenizer=None, *, pairwise_judge=None, **kwargs):
        config = with_estimator(config, ONLINE_DPO)
        if kwargs.get("critic") is not None:
            raise ValueError("critic=...: online DPO has no critic")
        spec = config.online_dpo.judge
        if pairwise_judge is not None and spec is not None:
            raise ValueError(f"pairwise_judge=... and online_dpo.judge ({spec!r}) are both set; give one")
        if pairwise_judge is not None and config.online_dpo.missing_eos_penalty is not None:
            raise ValueError("online_dpo.missing_eos_penalty applies to reward scores; with pairwise_judge=... the "
                             "judge alone picks the chosen answer (as TRL); remove one of them")
        self._pairwise_judge = (_judge_callable(pairwise_judge, "pairwise_judge") if pairwise_judge is not None
                                else load_pairwise_judge(spec) if spec is not None else None)
        super().__init__(config, policy, tokenizer, **kwargs)
        self._beta = self.config.online_dpo.beta_at(0)
        self._first_pass: List[torch.Tensor] = []  # per micro-batch [9] sums of the first epoch
        self._pairs_left = 0

    def _rewards_optional(self) -> bool:
        return self._pairwise_judge is not None

    def _no_reward_message(self) -> str:
        # RL's `judge` is a pointwise scorer; the pairwise judge that picks a pair on its own is ours alone
        return ("no reward source: online DPO picks each pair's chosen answer with a pairwise judge "
                "(pairwise_judge=... or online_dpo.judge in the config) or by the scores of reward sources "
                "(reward_fns / reward_models / judge, a pointwise AI judge, or reward.functions, reward.reward_model "
                "or reward.process_model in the config, or an environment with get_reward); give one")

    # ------------------------------------------------------------------ β

    def beta_of_step(self, step: int) -> float:
        """β of step ``step`` (0-based): ``online_dpo.beta``, or with a list its entry for the
        epoch ⌊step × prompts_per_step / training prompts⌋ (TRL indexes with ``state.epoch``)."""
        epoch = step * self.config.rollout.prompts_per_step // len(self.prompts)
        return self.config.online_dpo.beta_at(epoch)

    # ------------------------------------------------------------------ the rollout

    def _eos_ids(self) -> List[int]:
        """The ids that end an answer (TRL's ``eos_token_ids``): the tokenizer's eos and every id
        of the policy's ``generation_config.eos_token_id``."""
        from rlhf_fast.distributed import unwrap

        ids = [] if self.tokenizer.eos_token_id is None else [int(self.tokenizer.eos_token_id)]
        gen = getattr(getattr(unwrap(self.policy), "generation_config", None), "eos_token_id", None)
        if isinstance(gen, torch.Tensor):
            gen = gen.flatten().tolist()
        if isinstance(gen, int) and not isinstance(gen, bool):
            gen = [gen]
        return sorted(set(ids) | {int(t) for t in (gen or []) if isinstance(t, int) and t >= 0})

    def contains_eos(self, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the answers with an eos token among their own tokens (``response_mask``
        ``[B, T]`` bool; TRL's ``contain_eos_token``)."""
        eos = torch.tensor(self._eos_ids(), dtype=input_ids.dtype, device=input_ids.device)
        return (torch.isin(input_ids, eos) & response_mask).any(dim=1)

    def judge_pairs(self, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """``[N]`` bool from the pairwise judge: ``judge(prompts [N], [[a_2i, a_2i+1], ...])``
        (the prompt texts as the policy reads them, the answer texts) → one int per pair; 0 keeps
        the first answer, anything else the second (TRL's ``rank == 0``; its judges' −1 for a
        failed judgement so picks the second)."""
        n = len(answers) // 2
        pairs = [[answers[2 * i], answers[2 * i + 1]] for i in range(n)]
        ranks = self._pairwise_judge([prompts[2 * i] for i in range(n)], pairs)
        try:
            ranks = list(ranks)
        except TypeError:
            raise ValueError(f"the pairwise judge must return a list of {n} ints, got {type(ranks).__name__}") from None
        if len(ranks) != n or not all(_whole(r) for r in ranks):
            raise ValueError(f"the pairwise judge must return one int per pair ({n}), got {ranks!r}")
        return torch.tensor([int(r) == 0 for r in ranks], dtype=torch.bool)

    def rollout(self) -> tuple:
        """Generate, score, choose and take the reference's log-probs. Returns
        ``(RolloutTensors, metrics)``: rows chosen, rejected, chosen, … (pair i at 2i, 2i + 1),
        ``ref_logp`` the reference's per-token log-probs, ``scores`` the answers' scores after
        the penalty (zeros without reward sources); the other log-prob, value and advantage
        fields are zeros (nothing reads them)."""
        from rlhf_fast.distributed import reshard
        from rlhf_fast.models.logprobs import sequence_logprobs

        od = self.config.online_dpo
        self._beta = self.beta_of_step(self.global_step)
        m: Dict[str, float] = {}
        t0 = self.phase_clock.now()
        self._tool_counts = [0, 0, 0]
        batch, fields, extra = self._generate(0)
        m["time/generate"] = self.phase_clock.now() - t0
        ids, am, rm = self._batch_masks(batch)
        dev, B = self.device, ids.shape[0]
        has_eos = self.contains_eos(ids, rm)  # [B]
        scores = None
        if self.reward is not None:
            out = self._score(batch, fields, extra)
            for name, v in out.per_source.items():
                fin = torch.isfinite(v)
                m[f"reward/{name}"] = float(v[fin].mean()) if fin.any() else float("nan")
            # (an answer no TRL-convention function scored has total 0 here: TRL's nansum)
            total = out.total.float()
            m["reward/total"] = float(total.mean())
            scores = total.to(dev)
            if od.missing_eos_penalty is not None:  # TRL: rewards[~contain_eos_token] -= penalty
                scores = scores - od.missing_eos_penalty * (~has_eos).float()
        m.update(self._reward_fn_metrics())
        if self.tools:
            m.update(self._tool_metrics())
        if self._pairwise_judge is not None:
            first = self.judge_pairs(list(batch.prompt_texts), list(batch.response_texts)).to(dev)
        else:
            first = first_is_chosen(scores)
        rows = chosen_first_rows(first)  # [B]
        ids, am, rm, has_eos = ids[rows], am[rows], rm[rows], has_eos[rows]
        if scores is not None:
            scores = scores[rows]
            m["objective/scores"] = float(scores.mean())
            m["objective/scores_margin"] = float((scores[0::2] - scores[1::2]).mean())
        m["val/contain_eos_token"] = float(has_eos.float().mean())
        t1 = self.phase_clock.now()
        pair = torch.arange(B, device=dev) // 2  # each pair's two rows share its prompt (ppo.prefix_sharing)
        with torch.no_grad(), self._autocast(), self._reference_on_device():
            # temperature 1: TRL's _forward takes the plain log-softmax whatever it sampled at
            ref_logp = sequence_logprobs(self.reference, ids, am, response_mask=rm, temperature=1.0,
                                         **self._share_kwargs(pair, B))
        if self.reference_sharded:  # free the root's gathered copy (kept after its forward for the head)
            reshard(self.reference)
        m["time/logprobs"] = self.phase_clock.now() - t1
        truncated = self._truncated_rows(batch).to(dev)[rows]
        n_own = rm.sum(1).float()
        m.update({"response_length/mean": float(n_own.mean()),
                  "rollout/truncated_frac": float(truncated.float().mean()),
                  "tokens_per_second": float(getattr(batch, "tokens_per_second", 0.0) or 0.0)})
        zeros = torch.zeros(ids.shape, dtype=torch.float32, device=dev)
        sc = scores if scores is not None else torch.zeros(B, device=dev)
        data = RolloutTensors(ids, am, rm, zeros, ref_logp, zeros, zeros, zeros, zeros, sc, group=pair)
        chosen = torch.zeros(B, dtype=torch.bool)
        chosen[rows[0::2].cpu()] = True
        raw = scores[torch.argsort(rows)].tolist() if scores is not None else [None] * B  # generation order
        self._last_texts = list(zip(batch.prompt_texts, batch.response_texts, raw))
        self._last_columns = [{"chosen": bool(c)} for c in chosen.tolist()]
        self._sampled_rows = B
        return data, m

    # ------------------------------------------------------------------ the update

    def _minibatches(self, perm: torch.Tensor, counts: Sequence[int]) -> list:
        """:meth:`RLTrainer._minibatches` over whole pairs: the pairs in the order in which
        ``perm`` first reaches their chosen rows (a seeded permutation of the pairs), each pair's
        two rows together, chosen first. Every rank holds whole pairs (its rows are even in
        number), and the mini- and micro-batch sizes are even, so no pair is split."""
        pairs = perm[perm % 2 == 0] // 2
        rows = torch.stack([2 * pairs, 2 * pairs + 1], dim=1).reshape(-1)
        return super()._minibatches(rows, counts)

    def _shuffle_units(self, data: RolloutTensors):
        """Rows, with ``ppo.prefix_sharing`` too: :meth:`_minibatches` already keeps whole pairs
        (each pair one group), so the shuffle is the padded run's."""
        return None

    def dpo_loss(self, d: RolloutTensors, n_pairs) -> tuple:
        """``(loss, logp_sums)`` of the rows ``d`` (whole pairs, chosen first): the per-pair
        losses summed and divided by ``n_pairs`` (the mini-batch's pairs on every rank), and each
        row's summed policy log-prob ``[b]`` float32 (temperature 1, over its answer's tokens)."""
        from rlhf_fast.models.logprobs import sequence_logprobs

        od = self.config.online_dpo
        with self._autocast():
            logp = sequence_logprobs(self.policy, d.input_ids, d.attention_mask, response_mask=d.response_mask,
                                     temperature=1.0, **self._share_kwargs(d.group, d.input_ids.shape[0]))
        s = (logp * d.response_mask).sum(1)  # [b]
        ref = (d.ref_logp * d.response_mask).sum(1)
        losses = online_dpo_losses(s[0::2], s[1::2], ref[0::2], ref[1::2], self._beta, od.loss_type)
        return losses.sum() / n_pairs, s

    def policy_backward(self, data: RolloutTensors, micro_batch_size: Optional[int] = None,
                        n_micro: Optional[int] = None) -> Dict[str, float]:
        """Accumulate the DPO gradient of the mini-batch ``data`` (whole pairs, chosen first)
        over micro-batches of ``micro_batch_size`` rows (``n_micro``: as
        :meth:`RLTrainer.policy_backward`, blank micro-batches keep the ranks in step). Returns
        ``loss`` (summed over micro-batches: the mini-batch's mean pair loss). In the first epoch
        it also keeps the pairs' statistics (:func:`pair_metrics`)."""
        n_pairs = self._global_count(data.input_ids.shape[0] // 2)

        def keep(d, s):
            if self._pairs_left > 0:
                ref = (d.ref_logp * d.response_mask).sum(1)
                self._first_pass.append(_pair_sums(s, ref, self._beta, d.scores if self.reward is not None else None))
                self._pairs_left -= d.input_ids.shape[0] // 2

        return {"loss": self._loss_backward(data, micro_batch_size, n_micro, lambda d: self.dpo_loss(d, n_pairs),
                                            keep)}

    def update(self, data: RolloutTensors) -> Dict[str, float]:
        """:meth:`RLTrainer.update` (epochs, mini-batches of pairs, clipping, schedule) with the
        DPO loss; the statistics under TRL's names, the pairs' (:func:`pair_metrics`) over every
        rank's pairs."""
        t0 = self.phase_clock.now()
        self._first_pass, self._pairs_left = [], data.input_ids.shape[0] // 2
        out = super().update(data)
        out = {_RENAMED.get(k, k): v for k, v in out.items()}
        sums = torch.stack(self._first_pass).sum(0) if self._first_pass else torch.zeros(9, dtype=torch.float64)
        if self.ctx.distributed:
            sums = self.ctx.all_reduce_sum(sums.to(self.device)).cpu()
        out.update(_metrics_from_sums(sums, self._beta, with_scores=self.reward is not None))
        out["step_time"] = self.phase_clock.now() - t0
        return out

    # ------------------------------------------------------------------ evaluation and progress

    def _eval_batch_sums(self, batch, idx: List[int], extra, group_size: int) -> Dict[str, tuple]:
        """The rewards' sums as RL's; a judged run without reward sources: the lengths only."""
        if self.reward is not None:
            return super()._eval_batch_sums(batch, idx, extra, group_size)
        rm = self._batch_masks(batch)[2]
        return {"response_length": (float(rm.sum()), float(rm.shape[0]))}

    def _progress_postfix(self, m: Dict[str, float]) -> Dict[str, str]:
        nan = float("nan")
        return {"loss": f"{m.get('loss', nan):.4f}", "acc": f"{m.get('rewards/accuracies', nan):.2f}"}


__all__ = ["OnlineDPOTrainer", "chosen_first_rows", "first_is_chosen", "load_pairwise_judge", "online_dpo_losses",
           "pair_metrics"]
