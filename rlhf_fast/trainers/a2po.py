"""A*-PO: TRL 1.16's experimental ``A2POTrainer`` on the RL trainer's machinery.

Python API::

    from rlhf_fast.trainers.a2po import A2POTrainer
    from rlhf_fast.trainers.rl_config import A2POConfig, RLConfig, RolloutConfig
    cfg = RLConfig(estimator="a2po", rollout=RolloutConfig(prompts_per_step=8, group_size=1),
                   a2po=A2POConfig(num_value_samples=8, beta1=0.5, beta2=1e-3))
    A2POTrainer(cfg, reward_fns=[my_fn]).train()

Stage 1, once, before the first step (:meth:`A2POTrainer.estimate_values`): every training prompt
is answered ``a2po.num_value_samples`` times by the rollout engine (the run's sampling settings,
tools, environments and stop strings; seeded from the run's seed, per answer with
``rollout.per_sample_seeds``), the answers are scored by the run's reward sources (the weighted
total; an answer no TRL-convention function scored counts 0), and V*(x) = β1·log mean_i
exp(r_i/β1) (:func:`optimal_values`) is kept per prompt. TRL samples Stage 1 from its reference,
a frozen copy of the initial policy; ours from the policy before its first update, the same
distribution (``model.reference`` and ``reference=`` are refused, so the reference is that copy;
with ``model.lora`` the policy's fresh adapters add exactly 0). With ``a2po.filter_all_incorrect``
the prompts whose answers all scored 0 leave the training prompts (``num_train_epochs`` then
counts passes over the kept ones, as TRL's). Under DDP / FSDP2 each rank answers its contiguous
share of the prompts (the same number of generate calls on every rank) and the table is
all-gathered. The table is training state: checkpointed in extra.json, so a resumed run
restores it (and the filter) and never recomputes it. Stage 1 leaves the random states as they
were (:func:`~rlhf_fast.trainers.common.random_states_kept`).

Stage 2, each step: one answer per prompt (``rollout.group_size`` 1) with the rollout engine,
scored → the reference's per-token log-probs (temperature 1, as TRL's ``_get_sequence_logps``,
whatever ``rollout.temperature`` samples at) → ``ppo.epochs`` passes over mini-batches: the
policy's summed log-probs over each answer's own tokens (eos included, tool results out), the
loss (β2·(Σ log π − Σ log π_ref) − (r − V*))² (:func:`a2po_losses`) summed and divided by the
answers of the whole mini-batch on every rank (TRL's ``.mean()``; micro-batching never changes
the gradient). Checkpoints and exact resume, LoRA, DDP / FSDP2 are the RL trainer's.

Evaluation, as TRL's: Stage 1 also answers every evaluation prompt ``a2po.num_value_samples``
times (``estimate_values("eval")``, with the training prompts' Stage 1 whenever the run has
evaluation prompts; never filtered: TRL's filter drops training prompts only), its V* table
checkpointed beside the training one. Each evaluation (``eval_every`` and the final one) logs,
beside the RL trainer's ``eval/reward/*``, TRL's ``eval_loss``, ``eval_reward``, ``eval_v_star``,
``eval_advantage`` and ``eval_implicit_reward`` as ``eval/loss`` (the A*-PO squared error),
``eval/reward``, ``eval/v_star``, ``eval/advantage`` and ``eval/implicit_reward``: means over
every evaluation answer (:meth:`A2POTrainer._eval_batch_sums`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from rlhf_fast.trainers.rl import (RLTrainer, RolloutTensors, _sample_seed, restarts_from_step_zero,
                                   with_estimator)
from rlhf_fast.trainers.rl_config import A2PO, RLConfig

# update statistics under TRL's names
_RENAMED = {"policy/loss": "loss", "policy/grad_norm": "grad_norm"}
# Stage 1's answers are seeded by their index past every training rollout's and evaluation's
_VALUE_INDEX = 2**41
# and the evaluation prompts' past those
_EVAL_VALUE_INDEX = 3 * 2**40


def optimal_values(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """V* ``[P]`` float64 of ``rewards`` ``[P, N]`` (N answers to each of P prompts):
    β1·log((1/N)·Σ_i exp(r_i/β1)), through a log-sum-exp (no overflow for small β1), as TRL
    A2POTrainer._estimate_optimal_values. ValueError for another shape, no answers, or a β1 that
    is not a finite number > 0."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] < 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a [P, N] tensor (N >= 1 answers to each prompt), got {shape}")
    if isinstance(beta1, bool) or not isinstance(beta1, (int, float)) or not 0 < beta1 < math.inf:
        raise ValueError(f"beta1 must be a finite number > 0, got {beta1!r}")
    r = rewards.double()
    return beta1 * (torch.logsumexp(r / beta1, dim=1) - math.log(r.shape[1]))


def a2po_losses(logp_sum: torch.Tensor, ref_sum: torch.Tensor, target: torch.Tensor, beta2: float) -> torch.Tensor:
    """Per-answer squared errors ``[B]`` of TRL A2POTrainer.compute_loss: (β2·(logp_sum −
    ref_sum) − target)², from each answer's summed log-probs of the policy and the reference
    (``[B]`` float32) and its target r − V* (``[B]``). Differentiable in ``logp_sum``."""
    return (beta2 * (logp_sum - ref_sum) - target) ** 2


class A2POTrainer(RLTrainer):
    """A*-PO (TRL's experimental ``A2POTrainer``): :class:`~rlhf_fast.trainers.rl.RLTrainer` with
    ``estimator: a2po``, whose ``config.a2po`` (:class:`~rlhf_fast.trainers.rl_config.A2POConfig`)
    holds num_value_samples, β1, β2 and filter_all_incorrect.

    config / policy / tokenizer / reward_fns / reward_weights / reward_models / judge / prompts /
    eval_prompts / engine / tools / environment_factory / rollout_func: as
    :class:`~rlhf_fast.trainers.rl.RLTrainer`; a reward source is required. ``critic`` and
    ``reference`` are refused (the reference is a frozen copy of the initial policy, which also
    answers Stage 1).

    Logs per step TRL's ``loss`` (the mean over the optimizer steps of the mini-batch loss),
    ``grad_norm``, ``reward`` (mean r), ``v_star`` (mean V* of the step's prompts),
    ``advantage`` (mean r − V*) and ``implicit_reward`` (mean β2·log π/π_ref over the first
    epoch's forwards); ours: ``reward/*``, ``response_length/mean``, ``rollout/truncated_frac``,
    ``tokens_per_second``, ``step_time``, ``lr`` and, in the step that ran Stage 1,
    ``a2po/v_star_mean`` (over every training prompt), ``a2po/prompts_kept``,
    ``a2po/prompts_dropped`` and ``time/value_estimation`` (``time/eval_value_estimation`` for
    the evaluation prompts'). Each evaluation also logs ``eval/loss``, ``eval/reward``,
    ``eval/v_star``, ``eval/advantage`` and ``eval/implicit_reward`` (TRL's ``eval_*``).
    Samples hold each answer's ``v_star``."""

    _a2po = True

    def __init__(self, config: RLConfig, policy=None, tokenizer=None, **kwargs):
        config = with_estimator(config, A2PO)
        if kwargs.get("critic") is not None:
            raise ValueError("critic=...: A*-PO has no critic")
        if kwargs.get("reference") is not None:
            raise ValueError("reference=...: A*-PO's reference is a frozen copy of the initial policy, which also "
                             "answers Stage 1 (as TRL); leave it out")
        init = (config.model.lora or {}).get("init_lora_weights", True)
        if config.model.lora is not None and init not in (True, "gaussian"):
            # the reference is the policy with its adapters off: the initial policy (Stage 1's sampler)
            # only when fresh adapters add 0 (B = 0: peft's default and gaussian init)
            raise ValueError(f"model.lora.init_lora_weights {init!r}: A*-PO's reference, the policy with its adapters "
                             "disabled, must be the initial policy that answers Stage 1, so the fresh adapters must "
                             "add nothing (true or 'gaussian'; false, PiSSA, OLoRA, LoftQ, CorDA change the model)")
        super().__init__(config, policy, tokenizer, **kwargs)
        # the training prompts as given; a2po.filter_all_incorrect keeps a subset of them
        self._given = (self.prompts, self.prompt_fields, self._records["train"], self._env_names["train"])
        self.values: Optional[torch.Tensor] = None  # [given prompts] float64 V*, None before Stage 1
        self.eval_values: Optional[torch.Tensor] = None  # [eval prompts] float64 V*, None before their Stage 1
        self._all_incorrect: List[bool] = []
        self._kept: List[int] = []  # the given prompts still trained on (self.prompts[j] = given[kept[j]])
        self._stage1_metrics: Dict[str, float] = {}
        self._last_which: List[int] = []
        self._first_pass: List[torch.Tensor] = []
        self._rows_left = 0

    # ------------------------------------------------------------------ Stage 1

    @torch.no_grad()
    def estimate_values(self, split: str = "train") -> torch.Tensor:
        """Stage 1: V* ``[P]`` float64 of every prompt of ``split`` (:func:`optimal_values` of
        ``a2po.num_value_samples`` scored answers each): "train", every given training prompt,
        kept as :attr:`values`, then the filter applied; "eval", every evaluation prompt, kept
        as :attr:`eval_values` (no filter, as TRL). Runs before any update (the policy is the
        reference); the random states are left as they were."""
        from rlhf_fast.rollout import SamplingParams
        from rlhf_fast.trainers.common import random_states_kept
        from rlhf_fast.trainers.sft import local_span

        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if self.global_step != 0:
            raise RuntimeError(f"a2po: Stage 1 samples the initial policy; step {self.global_step} has updated it")
        train = split == "train"
        if train:  # (called again: the filter of the last call undone, the given prompts answered)
            prompts, fields, records, envs = self._given
            self.prompts, self.prompt_fields = prompts, fields
            self._records = {**self._records, "train": records}
            self._env_names = {**self._env_names, "train": envs}
        fields = self._given[1] if train else self.eval_fields
        if not fields:
            raise ValueError("no evaluation prompts: set data.eval_prompts, data.eval_prompts_file or "
                             "data.eval_fraction (or pass eval_prompts=[...])")
        cfg, ro, a = self.config, self.config.rollout, self.config.a2po
        t0 = self.phase_clock.now()
        n, P, W = a.num_value_samples, len(fields), self.ctx.world_size
        # (the evaluation prompts' answers drawn past the training prompts': their own seeds)
        first, salt = (_VALUE_INDEX, 0) if train else (_EVAL_VALUE_INDEX, 15_485_863)
        lo, hi = local_span(P, self.ctx) if self.ctx.distributed else (0, P)
        # prompts per generate call: about a rank's rows of a training rollout (its memory), and
        # the same number of calls on every rank (FSDP2 gathers the weights in each)
        per_call = max(1, cfg.batch_size // (W * n))
        calls = max(1, -(-(-(-P // W)) // per_call))
        local: List[tuple] = []  # (prompt index, V*, all answers scored 0)
        with random_states_kept(self.device):
            for c in range(calls):
                idx = list(range(lo + c * per_call, min(hi, lo + (c + 1) * per_call)))
                real = bool(idx)
                idx = idx or [0]  # this rank's share ran out: a call whose results count nothing
                if self.per_sample_seeds:  # by the answer's global index: any number of ranks
                    seeds = {"sample_seeds": [_sample_seed(cfg.seed, 0, first + i * n + k)
                                              for i in idx for k in range(n)]}
                else:
                    seeds = {"seed": (cfg.seed * 1_000_003 + 7919 * self.ctx.rank + 1_299_709 * (c + 1) + salt)
                             % (2**31)}
                params = SamplingParams(temperature=ro.temperature, max_new_tokens=ro.max_new_tokens, n=n,
                                        **ro.sampling_kwargs(), **seeds)
                batch, extra, _ = self._run_engine(idx, params, split)
                out = self._score(batch, [fields[i] for i in idx], extra)
                # (an answer no TRL-convention function scored has total 0: TRL's nansum)
                rewards = out.total.double().view(len(idx), n)  # [p, N], prompt-major
                if real:
                    v = optimal_values(rewards, a.beta1)
                    zero = (rewards == 0).all(dim=1)
                    local += [(i, float(v[j]), bool(zero[j])) for j, i in enumerate(idx)]
            self._reward_fn_metrics()  # what reward functions logged in Stage 1 stays out of step 1's
        table = sorted(t for part in self.ctx.all_gather_objects(local) for t in part)
        if [t[0] for t in table] != list(range(P)):  # (every prompt once, whatever the ranks)
            raise RuntimeError(f"a2po: Stage 1 gathered {len(table)} values for {P} prompts")
        if not train:
            self._apply_eval_values([t[1] for t in table])
            self._stage1_metrics["time/eval_value_estimation"] = self.phase_clock.now() - t0
            return self.eval_values
        self._apply_values([t[1] for t in table], [t[2] for t in table])
        self._stage1_metrics.update({"a2po/v_star_mean": float(self.values.mean()),
                                     "a2po/prompts_kept": len(self._kept),
                                     "a2po/prompts_dropped": P - len(self._kept),
                                     "time/value_estimation": self.phase_clock.now() - t0})
        return self.values

    def _apply_eval_values(self, values: Sequence[float]) -> None:
        """Keep the evaluation prompts' V* table (one per evaluation prompt)."""
        if len(values) != len(self.eval_prompts):
            raise ValueError(f"a2po: a V* table of {len(values)} evaluation prompts for a run of "
                             f"{len(self.eval_prompts)} (the resumed run's data.eval_prompts / eval_prompts_file / "
                             "eval_fraction / eval.max_prompts differ from the checkpoint's)")
        self.eval_values = torch.tensor([float(v) for v in values], dtype=torch.float64)

    def _apply_values(self, values: Sequence[float], all_incorrect: Sequence[bool]) -> None:
        """Keep the V* table (one per given training prompt) and, with
        ``a2po.filter_all_incorrect``, train on the prompts not all of whose Stage 1 answers
        scored 0; ``num_train_epochs`` then recomputes ``steps`` (and the LR schedule) from them."""
        P = len(self._given[0])
        if len(values) != P or len(all_incorrect) != P:
            raise ValueError(f"a2po: a V* table of {len(values)} prompts for a run of {P} training prompts (the "
                             f"resumed run's prompts differ from the checkpoint's)")
        self.values = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._all_incorrect = [bool(z) for z in all_incorrect]
        drop = self.config.a2po.filter_all_incorrect
        self._kept = [i for i in range(P) if not (drop and self._all_incorrect[i])]
        if not self._kept:
            raise ValueError(f"a2po.filter_all_incorrect: every one of the {P} training prompts had all "
                             f"{self.config.a2po.num_value_samples} Stage 1 answers scored 0, so none is left to "
                             "train on; set a2po.filter_all_incorrect false or check the reward sources")
        prompts, fields, records, envs = self._given
        self.prompts = [prompts[i] for i in self._kept]
        self.prompt_fields = [fields[i] for i in self._kept]
        self._records = {**self._records, "train": [records[i] for i in self._kept]}
        self._env_names = {**self._env_names, "train": [envs[i] for i in self._kept]}
        cfg = self.config
        if cfg.num_train_epochs is not None and len(self._kept) < P:  # TRL filters before it counts its steps
            from rlhf_fast.trainers.common import make_scheduler, warmup_steps_for

            cfg.steps = max(1, math.ceil(cfg.num_train_epochs * len(self._kept) / cfg.rollout.prompts_per_step
                                         - 1e-9))
            o = cfg.optim
            total = max(1, cfg.steps * cfg.ppo.epochs * max(1, cfg.batch_size // cfg.ppo.mini_batch_size))
            self.scheduler = make_scheduler(self.optimizer, warmup_steps=warmup_steps_for(o.warmup_steps,
                                                                                           o.warmup_ratio, total),
                                            total_steps=total, kind=o.schedule, min_ratio=o.min_lr_ratio,
                                            lr_scheduler_kwargs=o.lr_scheduler_kwargs)

    # ------------------------------------------------------------------ Stage 2: the rollout

    def _next_prompts(self) -> List[int]:
        """:meth:`RLTrainer._next_prompts`, remembered: the rollout looks up their V*."""
        self._last_which = super()._next_prompts()
        return self._last_which

    def _local_prompts(self) -> List[int]:
        """This rank's share of the step's prompts (indices into :attr:`prompts`), as
        :meth:`RLTrainer._generate` takes it."""
        which = self._last_which
        if self.ctx.distributed:
            from rlhf_fast.trainers.sft import local_span

            lo, hi = local_span(len(which), self.ctx)
            which = which[lo:hi]
        return which

    def rollout(self) -> tuple:
        """(Stage 1 first, :meth:`_stage1`, when no table is held.) Generate one answer per
        prompt, score it and take the reference's log-probs. Returns ``(RolloutTensors,
        metrics)``: ``scores`` ``[B]`` the regression target r − V*, ``ref_logp`` the
        reference's per-token log-probs; the other log-prob, value and advantage fields are
        zeros (nothing reads them)."""
        from rlhf_fast.distributed import reshard
        from rlhf_fast.models.logprobs import sequence_logprobs

        if self.values is None or self.global_step == 0:
            self._stage1()
        m: Dict[str, float] = dict(self._stage1_metrics)
        self._stage1_metrics = {}
        t0 = self.phase_clock.now()
        self._tool_counts = [0, 0, 0]
        batch, fields, extra = self._generate(0)
        m["time/generate"] = self.phase_clock.now() - t0
        ids, am, rm = self._batch_masks(batch)
        dev, B = self.device, ids.shape[0]
        which = torch.tensor([self._kept[i] for i in self._local_prompts()], dtype=torch.long)
        v_star = self.values[which[batch.group_index.cpu()]].float().to(dev)  # [B] (TRL: float32)
        out = self._score(batch, fields, extra)
        for name, v in out.per_source.items():
            fin = torch.isfinite(v)
            m[f"reward/{name}"] = float(v[fin].mean()) if fin.any() else float("nan")
        # (an answer no TRL-convention function scored has total 0 here: TRL's nansum)
        r = out.total.float().to(dev)  # [B]
        m["reward/total"] = float(r.mean())
        m.update(self._reward_fn_metrics())
        if self.tools:
            m.update(self._tool_metrics())
        t1 = self.phase_clock.now()
        with torch.no_grad(), self._autocast(), self._reference_on_device():
            # temperature 1: TRL's _get_sequence_logps takes the plain log-softmax whatever it sampled at
            ref_logp = sequence_logprobs(self.reference, ids, am, response_mask=rm, temperature=1.0)
        if self.reference_sharded:  # free the root's gathered copy (kept after its forward for the head)
            reshard(self.reference)
        m["time/logprobs"] = self.phase_clock.now() - t1
        target = r - v_star  # [B] the optimal advantage estimate
        truncated = self._truncated_rows(batch).to(dev)
        m.update({"reward": float(r.mean()), "v_star": float(v_star.mean()), "advantage": float(target.mean()),
                  "response_length/mean": float(rm.sum(1).float().mean()),
                  "rollout/truncated_frac": float(truncated.float().mean()),
                  "tokens_per_second": float(getattr(batch, "tokens_per_second", 0.0) or 0.0)})
        zeros = torch.zeros(ids.shape, dtype=torch.float32, device=dev)
        data = RolloutTensors(ids, am, rm, zeros, ref_logp, zeros, zeros, zeros, zeros, target,
                              group=torch.arange(B, device=dev))
        self._last_texts = list(zip(batch.prompt_texts, batch.response_texts, r.tolist()))
        self._last_columns = [{**{k: v[i] for k, v in out.columns.items()}, "v_star": float(v_star[i])}
                              for i in range(B)]
        self._sampled_rows = B
        return data, m

    # ------------------------------------------------------------------ Stage 2: the update

    def a2po_loss(self, d: RolloutTensors, n_rows) -> tuple:
        """``(loss, logp_sums)`` of the rows ``d``: the per-answer squared errors
        (:func:`a2po_losses`) summed and divided by ``n_rows`` (the mini-batch's answers on every
        rank), and each row's summed policy log-prob ``[b]`` float32 (temperature 1, over its
        answer's tokens)."""
        from rlhf_fast.models.logprobs import sequence_logprobs

        with self._autocast():
            logp = sequence_logprobs(self.policy, d.input_ids, d.attention_mask, response_mask=d.response_mask,
                                     temperature=1.0)
        s = (logp * d.response_mask).sum(1)  # [b]
        ref = (d.ref_logp * d.response_mask).sum(1)
        return a2po_losses(s, ref, d.scores, self.config.a2po.beta2).sum() / n_rows, s

    def policy_backward(self, data: RolloutTensors, micro_batch_size: Optional[int] = None,
                        n_micro: Optional[int] = None) -> Dict[str, float]:
        """Accumulate the A*-PO gradient of the mini-batch ``data`` over micro-batches of
        ``micro_batch_size`` rows (``n_micro``: as :meth:`RLTrainer.policy_backward`, blank
        micro-batches keep the ranks in step). Returns ``loss`` (summed over micro-batches: the
        mini-batch's mean squared error). In the first epoch it also keeps the implicit rewards."""
        n_rows = self._global_count(data.input_ids.shape[0])

        def keep(d, s):
            if self._rows_left > 0:
                ref = (d.ref_logp * d.response_mask).sum(1)
                implicit = self.config.a2po.beta2 * (s.detach().double() - ref.double())
                self._first_pass.append(torch.stack([implicit.sum(), implicit.new_tensor(float(implicit.numel()))]))
                self._rows_left -= d.input_ids.shape[0]

        return {"loss": self._loss_backward(data, micro_batch_size, n_micro, lambda d: self.a2po_loss(d, n_rows),
                                            keep)}

    def update(self, data: RolloutTensors) -> Dict[str, float]:
        """:meth:`RLTrainer.update` (epochs, mini-batches, clipping, schedule) with the A*-PO
        loss; the statistics under TRL's names, ``implicit_reward`` over every rank's answers."""
        t0 = self.phase_clock.now()
        self._first_pass, self._rows_left = [], data.input_ids.shape[0]
        out = super().update(data)
        out = {_RENAMED.get(k, k): v for k, v in out.items()}
        sums = torch.stack(self._first_pass).sum(0) if self._first_pass else torch.zeros(2, dtype=torch.float64)
        if self.ctx.distributed:
            sums = self.ctx.all_reduce_sum(sums.to(self.device)).cpu()
        if float(sums[1]) > 0:
            out["implicit_reward"] = float(sums[0] / sums[1])
        out["step_time"] = self.phase_clock.now() - t0
        return out

    # ------------------------------------------------------------------ run folder

    def train(self, steps: Optional[int] = None) -> List[Dict[str, float]]:
        """:meth:`RLTrainer.train`, Stage 1 first in a new run — and in a resumed one that starts
        again from step 0 (stopped before its first checkpoint) — before config.yaml is written
        and the step count fixed (``num_train_epochs`` counts the kept prompts); a resumed run
        restores the tables."""
        from rlhf_fast.trainers.common import check_fresh_run_dir

        cfg = self.config
        # (RLTrainer._restarts' predicate: so that, as in a new run, Stage 1 runs before the step count and
        # config.yaml are fixed)
        restart = bool(cfg.resume) and self.run_dir is None and restarts_from_step_zero(cfg.resume)
        if (not cfg.resume or restart) and (self.values is None or (self.global_step == 0 and self.eval_prompts
                                                                    and self.eval_values is None)):
            if self.run_dir is None and restart:  # refused before Stage 1's work rather than after it
                self._check_run_kind(cfg.resume, "resume")
            elif self.run_dir is None:
                self._check_run_kind(cfg.output_dir, "output_dir")  # (another kind's folder: not "continue it")
                check_fresh_run_dir(cfg.output_dir, resume_hint=f"resume: {cfg.output_dir}, or --resume "
                                                                f"{cfg.output_dir}")
            self._stage1()
        return super().train(steps)

    def _stage1(self) -> None:
        """Stage 1 over the training prompts and, when the run has them, the evaluation prompts
        (TRL estimates both datasets' V* at once); a table already held is kept."""
        if self.values is None:
            self.estimate_values()
        if self.eval_prompts and self.eval_values is None:
            self.estimate_values("eval")

    def state_dict_extra(self) -> dict:
        """The RL trainer's state and the V* tables (``a2po``: ``v_star`` and ``all_incorrect``,
        one per given training prompt, and ``eval_v_star``, one per evaluation prompt, once
        estimated)."""
        out = super().state_dict_extra()
        if self.values is not None:
            out["a2po"] = {"v_star": self.values.tolist(), "all_incorrect": list(self._all_incorrect)}
            if self.eval_values is not None:
                out["a2po"]["eval_v_star"] = self.eval_values.tolist()
        return out

    def load(self, run_dir: str) -> int:
        """:meth:`RLTrainer.load`, the V* table (and the filter) restored first, so the LR
        schedule that ``num_train_epochs`` sizes from the kept prompts is in place for its state;
        the evaluation prompts' table too when the run has evaluation prompts (a checkpoint
        without one: the evaluations log the rewards only)."""
        from rlhf_fast.trainers.checkpoint import latest_checkpoint, restoring_extra

        ck = latest_checkpoint(run_dir)
        if ck is not None and os.path.isfile(os.path.join(ck, "extra.json")):
            with restoring_extra(ck), open(os.path.join(ck, "extra.json"), encoding="utf-8") as f:
                state = json.load(f).get("a2po")
                if state is not None:
                    self._apply_values(state["v_star"], state["all_incorrect"])
                    if self.eval_prompts and "eval_v_star" in state:
                        self._apply_eval_values(state["eval_v_star"])
        return super().load(run_dir)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, float]:
        """:meth:`RLTrainer.evaluate` with TRL's A*-PO statistics (:meth:`_eval_batch_sums`).
        Called before the first update without the evaluation prompts' V* table, it estimates it
        first (TRL's first use); after one (a checkpoint written without the table), the
        evaluation logs the rewards only."""
        if self.eval_prompts and self.eval_values is None:
            if self.global_step == 0:
                self.estimate_values("eval")
            else:
                warnings.warn("a2po: no V* table for the evaluation prompts (the checkpoint was written without "
                              "one, and Stage 1 must sample the initial policy): eval/loss and TRL's other eval "
                              "statistics are not logged, only the rewards")
        return super().evaluate()

    def _eval_batch_sums(self, batch, idx: List[int], extra, group_size: int) -> Dict[str, tuple]:
        """The rewards' sums (:func:`~rlhf_fast.trainers.rl._eval_sums`) and, with the
        evaluation prompts' V* table, TRL's evaluation statistics per answer: ``loss`` (the
        squared error of :func:`a2po_losses`, TRL's prediction_step on the policy's and the
        reference's log-probs at temperature 1), ``reward`` (r), ``v_star``, ``advantage``
        (r − V*) and ``implicit_reward`` (β2·log π/π_ref)."""
        from rlhf_fast.distributed import reshard
        from rlhf_fast.models.logprobs import sequence_logprobs

        ids, am, rm = self._batch_masks(batch)
        out, res = self._scored_eval_sums(batch, idx, extra, group_size, rm)
        if self.eval_values is None:
            return res
        dev, B = self.device, ids.shape[0]
        v_star = self.eval_values[torch.tensor(idx, dtype=torch.long)[batch.group_index.cpu()]].float().to(dev)
        r = out.total.float().to(dev)  # [B] (TRL's nansum: as the training target)
        with self._autocast(), self._reference_on_device():
            ref_logp = sequence_logprobs(self.reference, ids, am, response_mask=rm, temperature=1.0)
        if self.reference_sharded:
            reshard(self.reference)
        target = r - v_star
        zeros = torch.zeros(ids.shape, dtype=torch.float32, device=dev)
        data = RolloutTensors(ids, am, rm, zeros, ref_logp, zeros, zeros, zeros, zeros, target,
                              group=torch.arange(B, device=dev))
        loss_sum, s = self.a2po_loss(data, 1)  # (n_rows 1: the sum of the squared errors)
        implicit = self.config.a2po.beta2 * (s.double() - (ref_logp * rm).sum(1).double())
        total = lambda t: float(t.double().sum())  # noqa: E731
        res.update({k: (total(v), float(B)) for k, v in (("loss", loss_sum), ("reward", r), ("v_star", v_star),
                                                         ("advantage", target), ("implicit_reward", implicit))})
        return res

    def _progress_postfix(self, m: Dict[str, float]) -> Dict[str, str]:
        nan = float("nan")
        return {"loss": f"{m.get('loss', nan):.4f}", "reward": f"{m.get('reward', nan):.3f}"}


__all__ = ["A2POTrainer", "a2po_losses", "optimal_values"]
