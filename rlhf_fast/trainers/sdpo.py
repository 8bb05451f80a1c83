"""SDPO: TRL 1.16's experimental ``SDPOTrainer`` (Self-Distillation Policy Optimization) on the RL
trainer's machinery.

Python API::

    from rlhf_fast.trainers.sdpo import SDPOTrainer
    from rlhf_fast.trainers.rl_config import RLConfig, SDPOConfig
    cfg = RLConfig(estimator="sdpo", sdpo=SDPOConfig(distillation_weight=0.5))
    SDPOTrainer(cfg, reward_fns=[my_fn]).train()

One step: GRPO's rollout (``rollout.group_size`` answers per prompt, rewards, group-relative
advantages: the RL trainer's ``grpo`` estimator) → each answer's teacher context
(:func:`teacher_contexts`, TRL's ``SuccessfulRolloutTeacherContextBuilder.build``): the prompt
reprompted with the first *other* answer of its group whose total reward is >=
``sdpo.success_reward_threshold`` (and/or the prompt record's ``privileged_context`` feedback),
tokenized as the rollout encodes prompts, its last ``sdpo.max_reprompt_len`` tokens kept, followed
by the answer's own tokens; an answer with neither keeps its prompt and no distillation term →
``ppo.epochs`` passes over mini-batches: loss = (1 − w)·(the GRPO policy loss the RL trainer takes,
``ppo.*`` and ``kl.*`` as for ``estimator: grpo``) + w·(the self-distillation loss, :func:`sdpo_token_loss`,
each answer's mean over its answer tokens, summed and divided by the answers of the whole
mini-batch on every rank: TRL's per-row mean then ``.mean()``), w = ``sdpo.distillation_weight``.
The teacher scores the answer after its teacher context with no gradient (``sdpo.teacher_model_kind``:
``ema``, a copy of the initial policy moved towards the policy by ``teacher_update_rate`` after every
``teacher_sync_steps``-th optimizer step, checkpointed; ``base``, the initial policy — a peft
policy's base weights, not checkpointed: a resume builds it again from ``model.policy``, or from the
``policy=`` given, which must then be the initial policy; ``live``, the policy itself; all
:class:`~rlhf_fast.trainers.sdft.SelfTeacher`, SDFT's). w = 0 is the plain GRPO step (nothing of the
teacher runs); w = 1 runs no policy-gradient forward (TRL's branches): the policy-loss and KL keys are
refused then, the default KL dropped.

Differences from TRL: its ``dapo`` / ``bnpo`` policy losses divide by each micro-batch's tokens
(ours by the mini-batch's: ``ppo.agg``, micro-batching never changes the gradient); its
``old_per_token_logps`` exist only when a generation batch spans several optimizer steps, ours
always (``ppo.old_logp``), so the distillation's importance clip min(π/π_old, ``distillation_is_clip``)
is always applied (1 on the first pass over a rollout, as TRL's absent ratio); its ``beta`` is
unused by its loss (ours: ``kl.*`` as GRPO's, on by default: ``kl.coef: 0`` for TRL's). Not supported: vLLM and the teacher
server, an EMA teacher adapter for LoRA (``teacher_model_kind: ema`` with ``model.lora``), tools,
environments, custom rollout functions, dynamic sampling, ``ppo.trpo`` (its line search would
measure the GRPO surrogate alone) and the critic's keys (all refused by the config). DDP and FSDP2
give one process's numbers; under FSDP2 a ``base`` / ``ema`` teacher is copied from the policy before
it is sharded, then sharded like it (the EMA update moves each rank's shards), as SDFT's.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from rlhf_fast.trainers.rl import RLTrainer, RolloutTensors, with_estimator
from rlhf_fast.trainers.rl_config import SDPO, RLConfig, SDPOConfig
from rlhf_fast.trainers.sdft import SelfTeacherTrainer, last_user_text, prompt_layout

_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


# ----------------------------------------------------------------------------- teacher contexts


@dataclass
class TeacherContexts:
    """What :func:`teacher_contexts` builds for B answers: ``prompts`` the teacher prompt of
    each (a text, or a list of chat messages as the data gives them), ``mask`` ``[B]`` bool
    whether the answer has a distillation term, ``metrics`` TRL's five builder fractions
    (``self_distillation/...``), ``feedback_ignored`` whether some answer had feedback that
    ``include_environment_feedback`` false left out."""

    prompts: List[Any]
    mask: List[bool]
    metrics: Dict[str, float]
    feedback_ignored: bool


def teacher_contexts(prompts: Sequence[Any], answers: Sequence[str], rewards: Sequence[float],
                     feedbacks: Sequence[Any], group_size: int, sd: SDPOConfig) -> TeacherContexts:
    """TRL's ``SuccessfulRolloutTeacherContextBuilder.build`` (trl/experimental/sdpo/sdpo_trainer.py)
    on B = groups × ``group_size`` answers, each group's rows consecutive.

    prompts: each answer's prompt as the data gives it (text, or chat messages ending with the
    user's turn); answers: each answer decoded without special tokens (the demonstration text);
    rewards: each answer's total reward (floats); feedbacks: each prompt record's
    ``privileged_context`` (a str counts when it is not blank) or None. Answer i's solution is
    the first answer j of its group (j ≠ i under ``dont_reprompt_on_self_success``) with
    reward >= ``success_reward_threshold``, none unless ``use_successful_as_teacher``; its
    feedback is used under ``include_environment_feedback`` (and, with
    ``environment_feedback_only_without_solution``, only where it has no solution). With
    neither its teacher prompt is its prompt and ``mask`` False; otherwise
    ``reprompt_template`` of the prompt (a chat's last user text, the earlier messages kept),
    the solution (``solution_template``; ``<think>…</think>`` removed first with
    ``remove_thinking_from_demonstration``) and the feedback (``feedback_template``)."""
    B, G = len(prompts), group_size
    if not (len(answers) == len(rewards) == len(feedbacks) == B) or B % G:
        raise ValueError(f"teacher_contexts needs as many answers, rewards and feedbacks as prompts ({B}), a whole "
                         f"number of groups of {G}; got {len(answers)}, {len(rewards)}, {len(feedbacks)}")
    thr = sd.success_reward_threshold
    ok = [float(r) >= thr for r in rewards]  # (NaN is never a success)
    demo: List[Optional[int]] = [None] * B
    use_fb = [False] * B
    mask = [False] * B
    n_success_groups = n_solution = n_fb_available = n_fb_used = 0
    for i in range(B):
        start = (i // G) * G
        if i == start and any(ok[start:start + G]):  # (self-exclusion aside: whether the group succeeded)
            n_success_groups += 1
        if sd.use_successful_as_teacher:
            demo[i] = next((j for j in range(start, start + G)
                            if ok[j] and not (sd.dont_reprompt_on_self_success and j == i)), None)
        fb = feedbacks[i]
        has_fb = isinstance(fb, str) and fb.strip() != ""
        n_fb_available += has_fb
        has_solution = demo[i] is not None
        use_fb[i] = sd.include_environment_feedback and has_fb and (
            not sd.environment_feedback_only_without_solution or not has_solution)
        n_fb_used += use_fb[i]
        n_solution += has_solution
        mask[i] = has_solution or use_fb[i]
    out = []
    for i in range(B):
        if not mask[i]:
            out.append(prompts[i])
            continue
        solution = ""
        if demo[i] is not None:
            text = answers[demo[i]]
            if sd.remove_thinking_from_demonstration:
                text = _THINK.sub("", text).strip()
            solution = sd.solution_template.format(successful_previous_attempt=text)
        feedback = sd.feedback_template.format(feedback_raw=feedbacks[i]) if use_fb[i] else ""
        p = prompts[i]
        if isinstance(p, list):
            text = sd.reprompt_template.format(prompt=last_user_text(p, f"answer {i}'s prompt"), solution=solution,
                                               feedback=feedback)
            out.append(list(p[:-1]) + [{"role": "user", "content": text}])
        else:
            out.append(sd.reprompt_template.format(prompt=p, solution=solution, feedback=feedback))
    n = max(B, 1)
    metrics = {"self_distillation/success_group_fraction": n_success_groups / max(1, B // max(1, G)),
               "self_distillation/success_sample_fraction": n_solution / n,
               "self_distillation/feedback_available_fraction": n_fb_available / n,
               "self_distillation/feedback_used_fraction": n_fb_used / n,
               "self_distillation/reprompt_sample_fraction": sum(mask) / n}
    return TeacherContexts(out, mask, metrics, n_fb_available > 0 and not sd.include_environment_feedback)


# ----------------------------------------------------------------------------- the loss


def sdpo_token_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, old_logp: torch.Tensor,
                    sd: SDPOConfig) -> torch.Tensor:
    """The per-token self-distillation loss ``[B, C]`` float32 over the answer tokens.

    student_logp ``[B, C]`` (differentiable) / teacher_logp / old_logp: log-probs of the sampled
    tokens under the policy, the teacher and the rollout (old) policy: ``sampled_token``'s
    (student − teacher).detach()·student (TRL's ``compute_sampled_token_self_distillation_loss``),
    then, with ``distillation_is_clip``, times exp(student − old) (clamped to ±20, at most the
    clip), detached (:func:`rlhf_fast.algorithms.self_distillation.importance_clip`). The logit
    modes take :func:`rlhf_fast.algorithms.self_distillation.self_distillation_loss`."""
    from rlhf_fast.algorithms.self_distillation import importance_clip

    per_token = (student_logp - teacher_logp).detach() * student_logp
    if sd.distillation_is_clip is not None:
        per_token = importance_clip(per_token, student_logp, old_logp, sd.distillation_is_clip)
    return per_token


def sdpo_row_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each answer's mean ``[B]`` of ``per_token`` ``[B, C]`` over its ``loss_mask`` tokens (0 for
    an answer with none): TRL's ``(l·m).sum(-1) / m.sum(-1).clamp(min=1)``."""
    m = loss_mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class SDPORollout(RolloutTensors):
    """A step's :class:`RolloutTensors` with each answer's teacher input: teacher_input_ids /
    teacher_attention_mask ``[B, Pt + C]`` (the teacher prompt, left-padded, then the answer's C
    columns as in ``input_ids[:, -C:]``); sd_mask ``[B]`` float32 (1: the answer has a teacher
    context, so a distillation term); answer_width ``[B]`` int64: C, the same in every row."""

    teacher_input_ids: Optional[torch.Tensor] = None
    teacher_attention_mask: Optional[torch.Tensor] = None
    sd_mask: Optional[torch.Tensor] = None
    answer_width: Optional[torch.Tensor] = None

    def select(self, idx: torch.Tensor) -> "SDPORollout":
        return SDPORollout(**{k: None if getattr(self, k) is None else getattr(self, k)[idx]
                              for k in self.__dataclass_fields__})


class SDPOTrainer(SelfTeacherTrainer, RLTrainer):
    """SDPO (``estimator: sdpo``): GRPO with self-distillation from the policy reprompted with a
    successful sibling answer (see the module docstring and
    :class:`~rlhf_fast.trainers.rl_config.SDPOConfig`). Arguments as :class:`RLTrainer`'s, without
    ``tools`` / ``environment_factory`` / ``rollout_func`` / ``critic``. Prompt records may carry
    ``privileged_context`` (TRL's column), the feedback ``sdpo.include_environment_feedback`` uses."""

    _sdpo = True  # (RLTrainer's flag: it refuses estimator sdpo in any other class)
    _teacher_section = "sdpo"
    _no_ema_teacher_hint = ("sdpo.teacher_model_kind was not 'ema', or sdpo.distillation_weight was 0, when it was "
                            "written); resume with that run's sdpo keys")

    def __init__(self, config: RLConfig, policy=None, tokenizer=None, **kwargs):
        config = with_estimator(config, SDPO)
        for key in ("tools", "environment_factory", "rollout_func", "critic"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}=...: not supported by SDPOTrainer (TRL's SDPOTrainer has none)")
        if config.sdpo.distillation_weight == 1 and config.kl.coef != 0:  # (default coef) no KL term: no reference
            config = replace(config, kl=replace(config.kl, coef=0.0))
        # the RL trainer runs GRPO's rollout and advantages: it sees the run as estimator grpo
        self._grpo_config = replace(config, estimator="grpo", sdpo=SDPOConfig())
        self.sd = config.sdpo  # (read by _before_wrap, inside RLTrainer.__init__)
        super().__init__(self._grpo_config, policy, tokenizer, **kwargs)
        config.steps = self._grpo_config.steps  # (num_train_epochs resolved)
        self.config = config
        if self.self_teacher is not None:  # (w = 0: none, nothing of the teacher runs)
            # TRL's SyncTeacherModelCallback.on_step_end: after every optimizer step (one fp16 skips is none)
            self.optimizer.register_step_post_hook(lambda *_: self.self_teacher.optimizer_step(self.policy))
        self._diag = {"flat_rewards": 0, "inactive_self_distillation": 0, "no_successful_rollouts": 0}
        self._sd_sums: Dict[str, float] = {}
        self._last_engine = None
        self._last_out = None

    def _teacher_config(self):
        return self.sd if self.sd.distillation_weight != 0 else None

    # ------------------------------------------------------------------ rollout

    @contextlib.contextmanager
    def _as_grpo(self):
        sdpo_config, self.config = self.config, self._grpo_config
        try:
            yield
        finally:
            self.config = sdpo_config

    def _run_engine(self, which: List[int], params, split: str = "train") -> tuple:
        out = super()._run_engine(which, params, split)
        if split == "train":
            self._last_engine = (list(which), out[0])
        return out

    def _score(self, batch, fields: List[dict], extra: Optional[dict] = None):
        out = super()._score(batch, fields, extra)
        self._last_out = out
        return out

    def rollout(self) -> tuple:
        """GRPO's rollout (:meth:`RLTrainer.rollout`), then each kept answer's teacher input
        (:func:`teacher_contexts`) and TRL's reward diagnostics and builder metrics."""
        self._grpo_config.steps = self.config.steps  # (a resumed run may train further)
        with self._as_grpo():
            data, m = super().rollout()
        which, batch = self._last_engine
        out, G = self._last_out, self.config.rollout.group_size
        # groups leave whole (a bad reward drops its group): the kept rows are whole groups, in order
        g = data.group.tolist()
        rows = [g[r] * G + (r - g.index(g[r])) for r in range(len(g))]
        rewards = out.total[rows].float()  # the weighted total, 0 where unscored (TRL's nansum)
        m.update(self._reward_diagnostics(rewards, {k: v[rows] for k, v in out.per_source.items()}))
        C = data.input_ids.shape[1] - batch.prompt_length
        prompt_idx = [which[i // G] for i in rows]
        t_ids, t_am, sd_mask, metrics = self.teacher_inputs(
            [self._records["train"][i][0] for i in prompt_idx], data.input_ids[:, -C:], data.attention_mask[:, -C:],
            rewards.tolist(), [(self.prompt_fields[i] or {}).get("privileged_context") for i in prompt_idx])
        m.update(metrics)
        self._warn_inactive(metrics)
        fields = {k: getattr(data, k) for k in RolloutTensors.__dataclass_fields__}
        data = SDPORollout(**fields, teacher_input_ids=t_ids, teacher_attention_mask=t_am, sd_mask=sd_mask,
                           answer_width=torch.full((len(rows),), C, dtype=torch.long, device=self.device))
        return data, m

    def teacher_inputs(self, prompts: Sequence[Any], answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                       rewards: Sequence[float], feedbacks: Sequence[Any]) -> tuple:
        """The teacher's input for B answers (whole groups, in order): ``(input_ids [B, Pt + C]
        int64, attention_mask [B, Pt + C] bool, sd_mask [B] float32, builder metrics)`` — each
        teacher prompt of :func:`teacher_contexts` rendered and encoded as the rollout encodes
        prompts, its last ``max_reprompt_len`` tokens, left-padded, then the answer's columns
        ``answer_ids`` / ``answer_mask`` ``[B, C]`` (right-padded; the demonstrations are their
        attended tokens decoded without special tokens). TRL's ``build`` output."""
        answers = [self.tokenizer.decode(r[a.bool()].tolist(), skip_special_tokens=True)
                   for r, a in zip(answer_ids.cpu(), answer_mask.cpu())]
        ctx = teacher_contexts(list(prompts), answers, list(rewards), list(feedbacks),
                               self.config.rollout.group_size, self.sd)
        if ctx.feedback_ignored:
            warnings.warn("SDPO: prompt records carry privileged_context feedback, but sdpo.include_environment_feedback "
                          "is false, so it is ignored (no reprompting from feedback)", stacklevel=2)
        texts = [self._render(p) for p in ctx.prompts]
        answer_mask = answer_mask.to(self.device)
        # TRL's _tokenize_teacher_messages: each teacher prompt's last max_reprompt_len tokens, left-padded
        from rlhf_fast.feedback.formats import prompt_token_ids

        kept = [r[-self.sd.max_reprompt_len:] for r in prompt_token_ids(self.tokenizer, texts)]
        t_ids, t_am, _ = prompt_layout(kept, answer_ids.to(self.device), answer_mask, answer_mask, self.engine.pad_id)
        sd_mask = torch.tensor(ctx.mask, dtype=torch.float32, device=self.device)
        return t_ids, t_am, sd_mask, ctx.metrics

    def _reward_diagnostics(self, rewards: torch.Tensor, per_source: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """TRL's ``_record_reward_diagnostics`` of the rewards ``[B]`` (float32) of every rank:
        ``self_distillation/reward_{mean,std,min,max}``, ``group_reward_std_mean`` and
        ``flat_group_fraction`` (groups whose std is within ``diagnostics_flat_tolerance``; their
        std per ``scale_rewards``: none counts 1), each source's mean ``self_distillation/rewards/NAME``;
        warns on flat rewards."""
        tol, G = self.sd.diagnostics_flat_tolerance, self.config.rollout.group_size
        if self.ctx.distributed:  # TRL's are of the whole batch (its rewards gathered from every process)
            parts = self.ctx.all_gather_objects((rewards.cpu(), {k: v.cpu() for k, v in per_source.items()}))
            rewards = torch.cat([p[0] for p in parts])
            per_source = {k: torch.cat([p[1][k] for p in parts]) for k in per_source}
        n = rewards.numel()
        std = rewards.std() if n > 1 else torch.tensor(0.0)
        if self.config.scale_rewards == "none":
            group_std = torch.ones(n // G)
        else:
            group_std = rewards.view(-1, G).std(dim=1)
        flat = (group_std <= tol).float().mean() if group_std.numel() else torch.tensor(1.0)
        m = {"self_distillation/reward_mean": float(rewards.mean()) if n else 0.0,
             "self_distillation/reward_std": float(std),
             "self_distillation/reward_min": float(rewards.min()) if n else 0.0,
             "self_distillation/reward_max": float(rewards.max()) if n else 0.0,
             "self_distillation/group_reward_std_mean": float(group_std.mean()) if group_std.numel() else float(std),
             "self_distillation/flat_group_fraction": float(flat)}
        for name, v in per_source.items():
            m[f"self_distillation/rewards/{name}"] = float(torch.nanmean(v.float()))
        if float(std) <= tol and float(flat) >= 1.0 - tol:
            self._degenerate("flat_rewards", "Observed flat SDPO rewards across all sampled generations. Policy "
                             "advantages will collapse to zero, and SDPO will not learn. Check reward density, reward "
                             "shaping, or `success_reward_threshold`.")
        else:
            self._diag["flat_rewards"] = 0
        return m

    def _warn_inactive(self, metrics: Dict[str, float]) -> None:
        """TRL's ``_warn_on_inactive_self_distillation``."""
        tol = self.sd.diagnostics_flat_tolerance
        if metrics["self_distillation/reprompt_sample_fraction"] <= tol:
            self._degenerate("inactive_self_distillation", "SDPO self-distillation is inactive because no reprompted "
                             "samples were constructed. This usually means no rollout exceeded "
                             "`success_reward_threshold` and no usable privileged feedback was available.")
        else:
            self._diag["inactive_self_distillation"] = 0
        if metrics["self_distillation/success_group_fraction"] <= tol:
            self._degenerate("no_successful_rollouts", "SDPO did not find any successful rollouts in the current "
                             "generation groups. If this persists, reduce task difficulty, adjust reward shaping, or "
                             "lower `success_reward_threshold`.")
        else:
            self._diag["no_successful_rollouts"] = 0

    def _degenerate(self, key: str, message: str) -> None:
        """TRL's ``_warn_on_degenerate_diagnostics``: warn on the 1st and every
        ``diagnostics_warning_interval``-th consecutive degenerate step (0: never)."""
        every = self.sd.diagnostics_warning_interval
        if every == 0:
            return
        self._diag[key] += 1
        count = self._diag[key]
        if count == 1 or count % every == 0:
            warnings.warn(f"{message} Consecutive degenerate steps: {count}.", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the loss

    def policy_backward(self, data: RolloutTensors, micro_batch_size: Optional[int] = None,
                        n_micro: Optional[int] = None) -> Dict[str, float]:
        """:meth:`RLTrainer.policy_backward` with each micro-batch's loss (1 − w)·policy +
        w·distillation (:meth:`_policy_loss`); the distillation divided by the answers of the
        whole mini-batch ``data`` on every rank."""
        if self.self_teacher is not None:
            self._sd_rows = self._global_count(data.input_ids.shape[0])
        return super().policy_backward(data, micro_batch_size, n_micro)

    def _policy_loss(self, d: RolloutTensors, norm, kw: dict):
        w = self.sd.distillation_weight
        if self.self_teacher is None:  # w = 0: GRPO's step, nothing more
            return super()._policy_loss(d, norm, kw)
        with self._autocast():
            dist, logp, tok = self.distillation_loss(d, kw["temperature"])
        if w == 1.0:  # TRL runs no policy-gradient loss then; the update's statistics from the same forward
            # (the logit modes give none: ratio statistics 0)
            loss, st = dist, (_ratio_stats(logp, d.old_logp, tok) if logp is not None else
                              {"approx_kl": 0.0, "ratio_mean": 0.0, "ratio_max": 0.0})
        else:
            pol, st = super()._policy_loss(d, norm, kw)
            self._acc("policy_loss", float(pol.detach()))
            loss = (1 - w) * pol + w * dist
        return loss, st

    def distillation_loss(self, d: RolloutTensors, temperature: float) -> tuple:
        """``(loss, student logp [b, C], answer-token mask [b, C])`` of the micro-batch ``d``: the
        per-answer means of :func:`sdpo_token_loss` over the answer tokens of answers with a
        teacher context, summed and divided by the mini-batch's answers (set by
        :meth:`policy_backward`). A blank row (a rank short of rows) runs the same forwards
        with loss 0."""
        from rlhf_fast.models.logprobs import sequence_logprobs

        real = isinstance(d, SDPORollout) and d.teacher_input_ids is not None
        t_ids = d.teacher_input_ids if real else d.input_ids
        t_am = d.teacher_attention_mask if real else d.attention_mask
        # the answer columns: the last C of both inputs (a blank row: all but the first, none in the loss)
        C = int(d.answer_width[0]) if real else d.input_ids.shape[1] - 1
        rm = d.response_mask[:, -C:]  # [b, C] the answer tokens in the loss
        sd_mask = d.sd_mask if real else torch.zeros(d.input_ids.shape[0], device=d.input_ids.device)
        loss_mask = rm & (sd_mask[:, None] > 0)
        teacher = self.teacher
        if self.sd.distillation_mode == "sampled_token":
            s_full = sequence_logprobs(self.policy, d.input_ids, d.attention_mask, response_mask=d.response_mask,
                                       temperature=temperature)
            t_rm = torch.cat([torch.zeros_like(t_am[:, :-C]), rm], 1)
            with torch.no_grad():
                t_full = sequence_logprobs(teacher, t_ids, t_am, response_mask=t_rm, temperature=temperature)
            self._release_teacher()
            s, t = s_full[:, -C:], t_full[:, -C:]
            per_token = sdpo_token_loss(s, t, d.old_logp[:, -C:], self.sd)
        else:
            return self._logits_loss(d, teacher, t_ids, t_am, C, loss_mask, temperature), None, rm
        rows = sdpo_row_loss(per_token, loss_mask)
        loss = rows.sum() / self._sd_rows
        lm = loss_mask.float()
        self._acc("distill_sum", float((per_token.detach() * lm).sum()))
        self._acc("distill_tokens", float(lm.sum()))
        return loss, s.detach(), rm

    def _logits_loss(self, d, teacher, t_ids, t_am, C: int, loss_mask: torch.Tensor, temperature: float):
        """``full_logits`` / ``topk_logits``: the loss of :meth:`distillation_loss` through
        :func:`rlhf_fast.algorithms.self_distillation.self_distillation_loss` on the last hidden
        states that predict the loss tokens (both heads chunked, never the batch's ``[N, V]`` logits),
        each token weighted 1 / (its answer's loss tokens · the mini-batch's answers)."""
        from rlhf_fast.algorithms.self_distillation import self_distillation_loss
        from rlhf_fast.models.logprobs import hidden_states, lm_head_params
        from rlhf_fast.trainers.distill import head_transform

        r, c = loss_mask.nonzero(as_tuple=True)  # [N] the loss tokens, in answer columns
        if r.numel() == 0:  # still through the student's forward (every rank runs the same ones)
            r = c = torch.zeros(1, dtype=torch.long, device=loss_mask.device)
            weights = torch.zeros(1, device=loss_mask.device)
        else:
            weights = (1.0 / loss_mask.float().sum(-1).clamp(min=1.0))[r] / self._sd_rows
        L, Lt = d.input_ids.shape[1], t_ids.shape[1]
        hs = hidden_states(self.policy, d.input_ids, d.attention_mask, select=(r, L - C - 1 + c))
        with torch.no_grad():
            ht = hidden_states(teacher, t_ids, t_am, select=(r, Lt - C - 1 + c))
        ws, bs = lm_head_params(self.policy)
        wt, bt = (None if t is None else t.detach() for t in lm_head_params(teacher))
        if self.teacher_sharded:  # the loss recomputes its chunks in backward, after reshard frees the head
            wt, bt = (None if t is None else t.clone() for t in (wt, bt))
        sd = self.sd
        loss, per_tok, _ = self_distillation_loss(
            hs, ws, ht, wt, d.input_ids[r, L - C + c], weights, student_bias=bs, teacher_bias=bt,
            student_transform=head_transform(self.policy), teacher_transform=head_transform(teacher),
            temperature=temperature, mode=sd.distillation_mode, alpha=sd.distillation_alpha,
            topk=sd.distillation_topk, add_tail=sd.distillation_add_tail, old_logp=d.old_logp[r, L - C + c],
            is_clip=sd.distillation_is_clip)
        self._release_teacher()  # (after the loss's forward: it read the gathered head)
        keep = weights > 0
        self._acc("distill_sum", float(per_tok[keep].sum()))
        self._acc("distill_tokens", float(keep.sum()))
        return loss

    def _acc(self, key: str, v: float) -> None:
        self._sd_sums[key] = self._sd_sums.get(key, 0.0) + v

    # ------------------------------------------------------------------ update, EMA, metrics

    def update(self, data: RolloutTensors) -> Dict[str, float]:
        """:meth:`RLTrainer.update`, then TRL's ``self_distillation/distillation_loss`` (and
        ``sdpo/distillation_loss``: its mean over the distilled answer tokens of the step, every
        rank) and ``self_distillation/policy_loss``."""
        self._sd_sums = {}
        out = super().update(data)
        if self.self_teacher is None:
            out["self_distillation/policy_loss"] = out["policy/loss"]
            return out
        s = self._sd_sums
        vec = torch.tensor([s.get("distill_sum", 0.0), s.get("distill_tokens", 0.0), s.get("policy_loss", 0.0)],
                           dtype=torch.float64, device=self.device)
        if self.ctx.distributed:
            vec = self.ctx.all_reduce_sum(vec)
        out["self_distillation/distillation_loss"] = out["sdpo/distillation_loss"] = float(vec[0] / vec[1].clamp(min=1))
        if self.sd.distillation_weight < 1.0:
            out["self_distillation/policy_loss"] = float(vec[2]) / max(out["policy/updates"], 1)
        return out

    def _progress_postfix(self, m: Dict[str, float]) -> Dict[str, str]:
        return {"reward": f"{m['reward/total']:.3f}",
                "distill": f"{m.get('self_distillation/distillation_loss', float('nan')):.3f}"}


def _ratio_stats(logp: torch.Tensor, old_logp_full: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """The update's ratio statistics (as the policy loss gives them) of log-probs ``[b, C]``."""
    from rlhf_fast import ops

    C = logp.shape[1]
    dlt = (logp - old_logp_full[:, -C:]) * mask
    ratio = torch.exp(dlt)
    m = mask.bool()
    return {"approx_kl": float(ops.masked_mean(0.5 * dlt * dlt, m)), "ratio_mean": float(ops.masked_mean(ratio, m)),
            "ratio_max": float(ratio[m].max()) if m.any() else 0.0}


__all__ = ["SDPOTrainer", "SDPORollout", "TeacherContexts", "teacher_contexts", "sdpo_token_loss", "sdpo_row_loss"]
