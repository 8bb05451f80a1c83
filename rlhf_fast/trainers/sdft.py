"""SDFT, self-distillation fine-tuning: TRL 1.16's experimental ``SDFTTrainer`` on the on-policy
distillation trainer's machinery.

Python API::

    from rlhf_fast.trainers.rl_config import RLConfig, SDFTConfig
    from rlhf_fast.trainers.sdft import SDFTTrainer
    cfg = RLConfig(estimator="sdft", sdft=SDFTConfig(teacher_model_kind="ema"))
    SDFTTrainer(cfg, prompts=[{"prompt": "2+2=", "privileged_context": "The answer is 4."}]).train()

One step: the student (the policy) answers ``rollout.prompts_per_step`` prompts
``rollout.group_size`` times (the RL trainer's rollout engine; with ``sdft.generate_from_teacher``
it answers the teacher's prompt) → the teacher is the student itself (:class:`SelfTeacher`:
``base`` the initial policy, ``live`` the policy without gradient, ``ema`` an exponential moving
average of it) reading each answer after its teacher prompt, the record's prompt with its
``privileged_context`` (:func:`compose_teacher_prompt`, TRL's ``_compose_teacher_prompt``) →
``ppo.epochs`` passes over mini-batches: both models' last hidden states at the answer tokens go
to :func:`rlhf_fast.algorithms.self_distillation.self_distillation_loss` (``sdft.chunk_size`` rows
of logits at a time), each answer's token losses averaged, those averaged over the answers of the
mini-batch on every rank (TRL's ``_compute_self_distillation_loss``; micro-batching never changes
the gradient). When one rollout feeds several optimizer steps (``ppo.epochs`` × rows /
``ppo.mini_batch_size`` > 1: TRL's ``gradient_accumulation_steps % generate_every != 0``), the
rollout's log-probs are kept and ``sdft.distillation_is_clip`` weights each token's loss.
Evaluation, checkpoints and exact resume (the EMA teacher and its step count included), LoRA,
DDP / FSDP2 are the RL trainer's; under FSDP2 a ``base`` / ``ema`` teacher is copied from the
policy before it is sharded, then sharded like it (the EMA update moves each rank's shards).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from rlhf_fast.algorithms import self_distillation as sd
from rlhf_fast.trainers.distill import DistillationTrainer, _heads
from rlhf_fast.trainers.rl import RLTrainer, RolloutTensors, _StateDictOnly, with_estimator
from rlhf_fast.trainers.rl_config import SDFT, RLConfig

# the prompt record's field that the teacher reads after the prompt (TRL's column name)
PRIVILEGED_KEY = "privileged_context"


# ----------------------------------------------------------------------------- teacher prompts


def stringify_privileged_context(context: Any, where: str = "record") -> str:
    """The privileged context as text (TRL's ``_stringify_privileged_context``): a string as it
    is; a list of chat messages their text contents joined by newlines (list contents: their
    ``text`` parts joined by spaces; empty ones left out); anything else ``str()``. ValueError
    naming ``where`` for None (a record without the field)."""
    if context is None:
        raise ValueError(f"{where} has no {PRIVILEGED_KEY!r} field: SDFT's teacher reads each prompt with its "
                         f"privileged context; give every prompt record {{prompt, {PRIVILEGED_KEY}}}")
    if isinstance(context, str):
        return context
    if isinstance(context, list) and context and isinstance(context[0], dict):
        chunks = []
        for message in context:
            content = message.get("content", "")
            text = (" ".join(p.get("text", "") for p in content if p.get("type") == "text")
                    if isinstance(content, list) else str(content))
            if text:
                chunks.append(text)
        return "\n".join(chunks)
    return str(context)


def last_user_text(messages: List[dict], where: str) -> str:
    """The text of the last message, which must be the user's (TRL's ``_extract_last_user_text``):
    a list content's ``text`` parts joined by spaces. ValueError naming ``where`` otherwise (the
    self-distillation teachers' prompts rewrite that turn)."""
    last = messages[-1]
    if last.get("role") != "user":
        raise ValueError(f"{where}: the teacher prompt rewrites the conversation's last user turn, but it ends "
                         f"with a {last.get('role')!r} message (assistant prefills and tool turns are not supported, "
                         f"as TRL)")
    content = last.get("content", "")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content


def compose_teacher_prompt(prompt, context: Any, template: str, where: str = "record"):
    """The teacher's prompt (TRL's ``_compose_teacher_prompt``): a text prompt → ``template``
    with ``{prompt}`` and ``{privileged_context}`` filled; a chat (list of messages) → its messages
    but the last, then one user message holding the template filled with the last user text.
    ``context``: the record's ``privileged_context`` (:func:`stringify_privileged_context`)."""
    text = stringify_privileged_context(context, where)
    if isinstance(prompt, list):
        return list(prompt[:-1]) + [{"role": "user", "content": template.format(
            prompt=last_user_text(prompt, where), privileged_context=text)}]
    return template.format(prompt=prompt, privileged_context=text)


# ----------------------------------------------------------------------------- the teacher


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """teacher ← (1 − rate)·teacher + rate·student, parameter by parameter in ``parameters()``
    order, as TRL's ``SyncRefModelCallback._sync_target_model`` (``mul_`` then ``add_``: the same
    bits); on each rank's shards when FSDP2 shards both alike."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed: nothing is sharded
        DTensor = ()
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        if isinstance(t, DTensor) and isinstance(s, DTensor):
            t, s = t.to_local(), s.to_local()
        t.mul_(1.0 - rate).add_(s.to(device=t.device, dtype=t.dtype), alpha=rate)


class SelfTeacher:
    """The teacher of a self-distillation run (SDFT's and SDPO's ``teacher_model_kind``), built
    from the policy before any step:

    * ``base``: the initial policy, frozen (a deep copy; a peft policy's adapters disabled, no copy);
    * ``live``: the policy itself, read without gradient;
    * ``ema``: a deep copy of the initial policy that :meth:`optimizer_step` moves towards the
      policy (:func:`ema_update` with ``update_rate``) after every ``sync_steps``-th optimizer step.

    :meth:`module` gives the model to run under no_grad. The ``ema`` copy and the optimizer-step
    count are state: :attr:`checkpointed` and :meth:`state_dict` (a resume restores both)."""

    def __init__(self, kind: str, policy: torch.nn.Module, *, update_rate: float = 0.05, sync_steps: int = 1):
        from rlhf_fast.models.loading import _is_peft, make_reference

        if kind not in ("base", "live", "ema"):
            raise ValueError(f"teacher_model_kind must be one of ('base', 'live', 'ema'), got {kind!r}")
        self.kind, self.update_rate, self.sync_steps = kind, float(update_rate), int(sync_steps)
        self.optimizer_steps = 0
        self.model = None
        if kind == "base":
            self.model = make_reference(policy)
        elif kind == "ema":
            if _is_peft(policy):
                raise ValueError("teacher_model_kind 'ema' of a peft (LoRA) policy is not supported")
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)

    @property
    def checkpointed(self) -> bool:
        return self.kind == "ema"

    def module(self, policy: torch.nn.Module):
        """The model that scores the teacher's side: the policy (its DDP wrapper removed) for
        ``live``, else the teacher's own."""
        if self.kind == "live":
            return policy.module if isinstance(policy, torch.nn.parallel.DistributedDataParallel) else policy
        return self.model

    def optimizer_step(self, policy: torch.nn.Module) -> bool:
        """Count one optimizer step of ``policy`` (after it) and, for ``ema`` on every
        ``sync_steps``-th, move the teacher (TRL's ``SyncTeacherModelCallback.on_step_end``).
        Returns whether it moved."""
        self.optimizer_steps += 1
        if self.kind != "ema" or self.optimizer_steps % self.sync_steps:
            return False
        from rlhf_fast.distributed import unwrap

        ema_update(unwrap(self.model), unwrap(policy), self.update_rate)
        return True

    def shard(self, ctx, dist_config) -> bool:
        """Under FSDP2 (``dist_config.strategy`` fsdp2, ``ctx`` distributed) shard the teacher's own
        copy (``base`` / ``ema``) like the policy, so :func:`ema_update` moves each rank's shards;
        its forwards must then line up on every rank. Returns whether it did."""
        if not (ctx.distributed and dist_config.strategy == "fsdp2") or self.model is None \
                or hasattr(self.model, "rlhf_wrapped"):
            return False
        from rlhf_fast.distributed import wrap_model

        self.model = wrap_model(self.model, "fsdp2", ctx, mixed_precision=dist_config.mixed_precision,
                                reshard_after_forward=dist_config.reshard_after_forward)
        return True

    def state_dict(self) -> dict:
        return {"optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.optimizer_steps = int((state or {}).get("optimizer_steps", 0))


class SelfTeacherTrainer:
    """What SDFT's and SDPO's trainers (:class:`~rlhf_fast.trainers.rl.RLTrainer` subclasses, this
    class first among their bases) share about their :class:`SelfTeacher`: it is built from the
    policy in :meth:`_before_wrap` (before DDP / FSDP2 take it: FSDP2 shards the policy in place)
    and, under FSDP2, sharded like it (``teacher_sharded``); an ``ema`` teacher's weights are a
    checkpoint part (``teacher``) and its optimizer-step count is kept in ``extra.json`` under
    ``<_teacher_section>_teacher``."""

    _teacher_section = ""  # the config section whose teacher_* keys build the teacher ("sdft" / "sdpo")
    # why a checkpoint may lack the EMA teacher, and what to resume with then
    _no_ema_teacher_hint = ""

    def _teacher_config(self):
        """The config section with ``teacher_model_kind`` / ``teacher_update_rate`` /
        ``teacher_sync_steps``, or None when the run has no teacher."""
        raise NotImplementedError

    def _before_wrap(self, policy: torch.nn.Module) -> None:
        super()._before_wrap(policy)
        self.self_teacher: Optional[SelfTeacher] = None
        self.teacher_sharded = False
        s = self._teacher_config()
        if s is None:
            return
        self.self_teacher = SelfTeacher(s.teacher_model_kind, policy, update_rate=s.teacher_update_rate,
                                        sync_steps=s.teacher_sync_steps)
        if isinstance(self.self_teacher.model, torch.nn.Module):  # (a peft policy's base: its adapters off, no copy)
            self.self_teacher.model.to(self.device)
            self.teacher_sharded = self.self_teacher.shard(self.ctx, self.config.distributed)

    @property
    def teacher(self):
        """The model that scores the teacher's side (:meth:`SelfTeacher.module`); None without a
        teacher."""
        return None if self.self_teacher is None else self.self_teacher.module(self.policy)

    def _release_teacher(self) -> None:
        """Free a sharded teacher's gathered root (FSDP2 keeps the root's parameters after its
        forward; a gathered copy would miss the next EMA update); call after each teacher use."""
        if self.teacher_sharded:
            from rlhf_fast.distributed import reshard

            reshard(self.self_teacher.model)

    def _checkpointed_teacher(self) -> bool:
        return getattr(self, "self_teacher", None) is not None and self.self_teacher.checkpointed

    def _ckpt_parts(self):
        models, opts, scheds = super()._ckpt_parts()
        if self._checkpointed_teacher():  # no longer the initial policy: its weights are state
            from rlhf_fast.distributed import unwrap

            models["teacher"] = _StateDictOnly(unwrap(self.self_teacher.model))
        return models, opts, scheds

    def _sharded_parts(self):
        parts = super()._sharded_parts()
        if self._checkpointed_teacher():
            parts.append(("teacher", self.self_teacher.model, None, None))
        return parts

    def state_dict_extra(self) -> dict:
        out = super().state_dict_extra()
        if self.self_teacher is not None:
            out[f"{self._teacher_section}_teacher"] = self.self_teacher.state_dict()
        return out

    def load(self, run_dir: str) -> int:
        """The base class's ``load`` with the EMA teacher's weights and optimizer-step count;
        ValueError when the checkpoint has no EMA teacher to restore."""
        from rlhf_fast.trainers.checkpoint import latest_checkpoint, restoring_extra

        ck = latest_checkpoint(run_dir)
        if ck is not None and self._checkpointed_teacher() and not any(
                os.path.isdir(os.path.join(ck, *sub)) for sub in (("teacher",), ("models", "teacher"))):
            raise ValueError(f"resume: {ck} has no EMA teacher ({self._no_ema_teacher_hint})")
        step = super().load(run_dir)
        if self.self_teacher is not None:
            with restoring_extra(ck), open(os.path.join(ck, "extra.json"), encoding="utf-8") as f:
                self.self_teacher.load_state_dict(json.load(f).get(f"{self._teacher_section}_teacher"))
        return step


# ----------------------------------------------------------------------------- batches


@dataclass
class SDFTRollout(RolloutTensors):
    """:class:`~rlhf_fast.trainers.rl.RolloutTensors` of the student (``response_mask``: the loss
    tokens, ``sdft.num_loss_tokens_to_skip`` out; ``old_logp``: the rollout's log-probs where the
    importance weight applies, else zeros) plus each row's teacher side: the teacher prompt
    left-padded then the same answer columns — teacher_input_ids ``[B, Lt]`` int64,
    teacher_attention_mask / teacher_response_mask ``[B, Lt]`` bool (the same loss tokens per row,
    in the same order)."""

    teacher_input_ids: Optional[torch.Tensor] = None
    teacher_attention_mask: Optional[torch.Tensor] = None
    teacher_response_mask: Optional[torch.Tensor] = None

    def select(self, idx: torch.Tensor) -> "SDFTRollout":
        return SDFTRollout(**{k: None if getattr(self, k) is None else getattr(self, k)[idx]
                              for k in self.__dataclass_fields__})


def prompt_layout(prompts: Sequence[Sequence[int]], ids: torch.Tensor, attention_mask: torch.Tensor,
                  response_mask: torch.Tensor, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``prompts`` (token id lists, left-padded with ``pad_id`` to the longest) followed
    by the answer columns ``ids`` / ``attention_mask`` / ``response_mask`` ``[B, R]``: ``(ids
    [B, P + R] int64, attention [B, P + R] bool, response [B, P + R] bool)``."""
    B, P = len(prompts), max(len(p) for p in prompts)
    dev = ids.device
    pid = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    pam = torch.zeros((B, P), dtype=torch.bool, device=dev)
    for i, p in enumerate(prompts):
        if p:
            pid[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long, device=dev)
            pam[i, P - len(p):] = True
    return (torch.cat([pid, ids], 1), torch.cat([pam, attention_mask.bool()], 1),
            torch.cat([torch.zeros_like(pam), response_mask.bool()], 1))


def _blank(data: SDFTRollout) -> SDFTRollout:
    """One row that counts nothing (no loss token, attended): a rank without rows of a
    mini-batch runs it to keep its forwards in step with the other ranks."""
    out = {}
    for k in data.__dataclass_fields__:
        v = getattr(data, k)
        out[k] = None if v is None else (v[:1].clone() if v.shape[0] else v.new_zeros((1, *v.shape[1:])))
    for k in ("response_mask", "teacher_response_mask"):
        out[k].zero_()
    for k in ("attention_mask", "teacher_attention_mask"):
        out[k].fill_(True)
    return SDFTRollout(**out)


# ----------------------------------------------------------------------------- the trainer


class SDFTTrainer(SelfTeacherTrainer, DistillationTrainer):
    """SDFT (TRL's experimental ``SDFTTrainer``): :class:`~rlhf_fast.trainers.distill.DistillationTrainer`'s
    on-policy loop with estimator ``sdft``, the teacher the student itself under a privileged
    context (``config.sdft``, :class:`~rlhf_fast.trainers.rl_config.SDFTConfig`).

    config / policy / tokenizer / prompts / eval_prompts / engine: as
    :class:`~rlhf_fast.trainers.rl.RLTrainer`; every training and evaluation prompt record needs a
    ``privileged_context`` field (ValueError naming the record otherwise). reward_fns /
    reward_models / judge (optional): scored and logged (``reward/*``), never trained on.
    ``reference``, ``critic``, ``tools``, ``environment_factory`` and ``rollout_func`` are refused.

    Logs per step, besides the rollout's: ``loss`` (TRL's: the mean over the answers of each
    answer's mean token loss, averaged over the optimizer steps), TRL's
    ``self_distillation/distillation_loss`` and ``sdft/distillation_loss`` (the token-mean loss),
    ``entropy`` (the student's, per loss token), ``grad_norm``, ``step_time``, TRL's
    ``completions/*``, ``num_tokens`` and, for an ``ema`` teacher, ``sdft/teacher_syncs`` (the EMA
    updates so far); evaluation adds ``eval/loss``, ``eval/self_distillation/distillation_loss``,
    ``eval/sdft/distillation_loss`` and ``eval/entropy``."""

    _distills = False  # (RLTrainer's flag for estimator distill)
    convert_record = None  # prompt records as they are (GKD's {messages} are no SDFT data)
    _teacher_section = "sdft"
    _no_ema_teacher_hint = ("sdft.teacher_model_kind was not 'ema' when it was written); resume with that run's "
                            "sdft.teacher_model_kind")

    def __init__(self, config: RLConfig, policy=None, tokenizer=None, **kwargs):
        config = with_estimator(config, SDFT)
        for key in ("reference", "critic", "tools", "environment_factory", "rollout_func"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}=...: not with SDFT (its teacher is the policy under a privileged context; "
                                 f"no reference, critic, tools or custom rollout)")
        if config.kl.coef != 0:  # no KL term: RLTrainer then builds no reference
            config = replace(config, kl=replace(config.kl, coef=0.0))
        s = config.sdft
        RLTrainer.__init__(self, config, policy, tokenizer, **kwargs)  # (the teacher: _before_wrap)
        self.num_tokens = 0
        self._teacher_engine, self._completions, self._vocab_rows = None, None, None
        V = _heads(self.policy, "the policy's LM head", torch.float32, None)[0].shape[0]
        if s.distillation_mode == "topk_logits" and s.distillation_topk > V:
            raise ValueError(f"sdft.distillation_topk ({s.distillation_topk}) is more than the vocabulary "
                             f"({V} LM-head rows)")
        # each record's teacher prompt (and student prompt) as the rollout engine encodes prompts
        self._teacher_text = {split: self._teacher_texts(split) for split in ("train", "eval")}
        self._teacher_ids = {k: self._encode(v) for k, v in self._teacher_text.items()}
        self._student_ids = {"train": self._encode(self.prompts), "eval": self._encode(self.eval_prompts)}
        p, B = self.config.ppo, self.config.batch_size
        # TRL keeps the rollout's log-probs (and so weights the loss) only when a rollout feeds
        # more than one optimizer step
        self._keeps_old_logp = p.epochs * (B // p.mini_batch_size) > 1 and not s.generate_from_teacher
        self._rollout_rows: Optional[tuple] = None

    def _teacher_config(self):
        return self.config.sdft

    # ------------------------------------------------------------------ prompts

    def _teacher_texts(self, split: str) -> List[str]:
        """The teacher prompt of every record of ``split``, rendered as the policy's prompts are."""
        out = []
        for i, ((prompt, fields), env) in enumerate(zip(self._records[split], self._env_names[split])):
            where = f"{'training' if split == 'train' else 'evaluation'} prompt {i}"
            tp = compose_teacher_prompt(prompt, fields.get(PRIVILEGED_KEY), self.config.sdft.teacher_prompt_template,
                                        where)
            out.append(self._render(tp, env))
        return out

    def _encode(self, texts: Sequence[str]) -> List[List[int]]:
        from rlhf_fast.feedback.formats import prompt_token_ids

        return prompt_token_ids(self.tokenizer, texts) if texts else []  # the rollout engine's ids

    def _rewards_optional(self) -> bool:
        return True

    def _build_rollout_func(self, fn):
        if fn is not None:
            raise ValueError("rollout_func=...: not with SDFT")
        return None

    # ------------------------------------------------------------------ the rollout

    def _next_prompts(self) -> List[int]:
        which = super()._next_prompts()
        self._step_prompts = which
        return which

    def _generate(self, rnd: int):
        batch, fields, extra = super()._generate(rnd)
        which = self._step_prompts
        if self.ctx.distributed:  # this rank's share, as RLTrainer._generate takes it
            from rlhf_fast.trainers.sft import local_span

            lo, hi = local_span(len(which), self.ctx)
            which = which[lo:hi]
        self._rollout_rows = (batch.prompt_length, [which[g] for g in batch.group_index.tolist()])
        return batch, fields, extra

    def _run_engine(self, which: List[int], params, split: str = "train") -> tuple:
        """RLTrainer's, except that with ``sdft.generate_from_teacher`` the policy answers the
        teacher prompts (TRL's ``select_generation_prompts``)."""
        if not self.config.sdft.generate_from_teacher:
            return super()._run_engine(which, params, split)
        batch = self.engine.generate([self._teacher_text[split][i] for i in which], params)
        recs = self._records[split]  # the data's prompts (TRL's `prompts`; what a reward model renders)
        extra = {"_prompts": [recs[which[g]][0] for g in batch.group_index.tolist()]}
        return batch, extra, [0, 0, 0]

    def rollout(self) -> tuple:
        """:meth:`DistillationTrainer.rollout` (the answers, rewards when given, TRL's completion
        metrics), its rows with their teacher side (:class:`SDFTRollout`)."""
        data, m = super().rollout()
        P, recs = self._rollout_rows
        out = self._with_teacher(data, P, recs, "train", keep_old_logp=self._keeps_old_logp)
        if self.self_teacher.kind == "ema":
            m["sdft/teacher_syncs"] = self.self_teacher.optimizer_steps // self.self_teacher.sync_steps
        return out, m

    def _with_teacher(self, data: RolloutTensors, P: int, recs: List[int], split: str,
                      keep_old_logp: bool = False) -> SDFTRollout:
        """``data`` (rows answering records ``recs`` of ``split``; answers from column ``P``) with
        the loss tokens (``num_loss_tokens_to_skip`` out), the teacher side and, with
        ``keep_old_logp``, the rollout's log-probs of the answer tokens at ``rollout.temperature``."""
        s = self.config.sdft
        ids, am, rm = data.input_ids, data.attention_mask, data.response_mask.clone()
        if s.num_loss_tokens_to_skip:
            rm[:, P:P + s.num_loss_tokens_to_skip] = False
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        seg = (ids[:, P:], am[:, P:], rm[:, P:])
        tids, tam, trm = prompt_layout([self._teacher_ids[split][i] for i in recs], *seg, pad)
        if s.generate_from_teacher:  # the student reads its own prompt before the same answer
            ids, am, rm = prompt_layout([self._student_ids[split][i] for i in recs], *seg, pad)
        old = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        if keep_old_logp:
            from rlhf_fast.models.logprobs import sequence_logprobs

            with torch.no_grad(), self._autocast():
                old = sequence_logprobs(self.policy, ids, am, response_mask=rm,
                                        temperature=self.config.rollout.temperature).float()
        fields = {k: getattr(data, k) for k in RolloutTensors.__dataclass_fields__}
        fields.update(input_ids=ids, attention_mask=am, response_mask=rm, old_logp=old, behaviour_logp=old)
        if fields["values"].shape != ids.shape:  # (zeros: nothing reads them) the student's new width
            fields.update({k: torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
                           for k in ("values", "advantages", "returns")})
        return SDFTRollout(**fields, teacher_input_ids=tids, teacher_attention_mask=tam, teacher_response_mask=trm)

    # ------------------------------------------------------------------ the loss

    def sdft_loss(self, d: SDFTRollout, rows: Optional[torch.Tensor] = None, old_logp: bool = False):
        """The SDFT loss of the rows ``d``: each row's mean token loss, summed over the rows and
        divided by ``rows`` (None: ``d``'s row count) — TRL's per-answer mean then mean over the
        answers, made a sum over micro-batches. ``old_logp``: weight by the importance ratio to
        ``d.old_logp``. Returns ``(loss 0-dim float32, stats)``, stats floats ``loss_sum`` (the
        per-token losses summed), ``entropy_sum``, ``tokens``."""
        from rlhf_fast.models.logprobs import _target_mask, hidden_states

        s, T = self.config.sdft, self.config.rollout.temperature
        teacher = self.teacher
        st_mask = _target_mask(d.attention_mask, d.response_mask)
        tt_mask = _target_mask(d.teacher_attention_mask, d.teacher_response_mask)
        per_row = st_mask.sum(1)  # [B]
        if not torch.equal(per_row, tt_mask.sum(1)):
            raise RuntimeError("SDFT: the student's and the teacher's rows hold different loss tokens")
        tr, tc = st_mask.nonzero(as_tuple=True)
        ur, uc = tt_mask.nonzero(as_tuple=True)
        n = tr.numel()
        with self._autocast():
            if n == 0:  # a zero loss that reaches every student weight; the teacher's forward in step
                h = hidden_states(self.policy, d.input_ids, d.attention_mask)
                with torch.no_grad():
                    hidden_states(teacher, d.teacher_input_ids, d.teacher_attention_mask)
                self._release_teacher()
                ws, bs, _ = _heads(self.policy, "the policy's LM head", h.dtype, None)
                loss = h.sum() * 0.0 + ws.sum() * 0.0 + (bs.sum() * 0.0 if bs is not None else 0.0)
                return loss.float(), {"loss_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0}
            lo, hi = torch.stack(torch.aminmax(tc)).tolist()
            hs = hidden_states(self.policy, d.input_ids, d.attention_mask, columns=(lo - 1, hi),
                               select=(tr, tc - lo))  # [N, H]
            ulo, uhi = torch.stack(torch.aminmax(uc)).tolist()
            with torch.no_grad():
                ht = hidden_states(teacher, d.teacher_input_ids, d.teacher_attention_mask, columns=(ulo - 1, uhi),
                                   select=(ur, uc - ulo))  # [N, H]
            ws, bs, ts = _heads(self.policy, "the policy's LM head", hs.dtype, None)
            wt, bt, tt = _heads(teacher, "the teacher's LM head", ht.dtype, None)
            if self.teacher_sharded:  # the loss recomputes its chunks in backward, after reshard frees the head
                wt, bt = (None if t is None else t.clone() for t in (wt, bt))
            B = d.input_ids.shape[0]
            den = torch.tensor(float(B), device=hs.device) if rows is None else rows
            weights = 1.0 / (per_row[tr].clamp(min=1).to(torch.float32) * den)  # [N]
            old = d.old_logp[tr, tc] if old_logp and s.distillation_is_clip is not None else None
            total, tok_loss, ent = sd.self_distillation_loss(
                hs, ws, ht, wt, d.input_ids[tr, tc], weights, student_bias=bs, teacher_bias=bt,
                student_transform=ts, teacher_transform=tt, temperature=T, mode=s.distillation_mode,
                alpha=s.distillation_alpha, topk=s.distillation_topk, add_tail=s.distillation_add_tail, old_logp=old,
                is_clip=s.distillation_is_clip, chunk_size=s.chunk_size)
        self._release_teacher()  # (after the loss's forward: it read the gathered head)
        return total, {"loss_sum": float(tok_loss.sum()), "entropy_sum": float(ent.sum()), "tokens": float(n)}

    def policy_backward(self, data: SDFTRollout, micro_batch_size: Optional[int] = None,
                        n_micro: Optional[int] = None) -> Dict[str, float]:
        """Accumulate the gradient of the mini-batch ``data`` over micro-batches of
        ``micro_batch_size`` rows (``n_micro``: as :meth:`RLTrainer.policy_backward`, blank
        micro-batches past this rank's rows), each micro-batch's loss divided by the mini-batch's
        rows on every rank; then counts the optimizer step that follows for the teacher. Returns
        ``loss`` (TRL's), this rank's token-mean ``distillation_loss`` and ``entropy``."""
        if getattr(self, "_teacher_due", False):  # the previous optimizer step's teacher update
            self._sync_teacher()
        mb = micro_batch_size or self.config.ppo.micro_batch_size
        B = data.input_ids.shape[0]
        rows = self._global_count(B)
        n = -(-B // mb) if n_micro is None else max(n_micro, -(-B // mb))
        acc = {"loss": 0.0, "distillation_loss": 0.0, "entropy": 0.0}
        ntok = max(float(data.response_mask.sum()), 1.0)
        for j in range(n):
            real = j * mb < B
            d = data.select(torch.arange(j * mb, min(B, (j + 1) * mb), device=data.input_ids.device)) if real \
                else _blank(data)
            with self._no_sync(self.policy, j + 1 < n):
                loss, st = self.sdft_loss(d, rows, old_logp=self._keeps_old_logp)
                # DDP averages gradients over ranks; grad_scale turns that into the global sum
                self.scaler.scale(loss * self.ctx.grad_scale).backward()  # fp16: the loss scale (else as it is)
            acc["loss"] += float(loss.detach())
            acc["distillation_loss"] += st["loss_sum"] / ntok
            acc["entropy"] += st["entropy_sum"] / ntok
        self._teacher_due = True  # update() takes the optimizer step after this
        return acc

    def _sync_teacher(self) -> None:
        self._teacher_due = False
        self.self_teacher.optimizer_step(self.policy)

    def update(self, data: SDFTRollout) -> Dict[str, float]:
        """:meth:`DistillationTrainer.update`, the teacher moved after each optimizer step
        (``ema``); TRL's metric names."""
        out = super().update(data)
        if getattr(self, "_teacher_due", False):
            self._sync_teacher()
        v = out.pop("policy/distillation_loss", None)
        if v is not None:
            out["self_distillation/distillation_loss"] = out["sdft/distillation_loss"] = v
        return out

    # ------------------------------------------------------------------ evaluation

    def _eval_batch_sums(self, batch, idx: List[int], extra, group_size: int) -> Dict[str, tuple]:
        """The rewards' sums (when the run has sources) and the SDFT loss on the evaluation
        answers: ``loss`` per answer (TRL's eval_loss), the distillation loss and ``entropy``
        per loss token."""
        ids, am, rm = self._batch_masks(batch)
        if self.reward is not None:
            res = RLTrainer._eval_batch_sums(self, batch, idx, extra, group_size)
        else:
            res = {"response_length": (float(rm.sum()), float(rm.shape[0]))}
        z = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        data = RolloutTensors(ids, am, rm, z, None, z, z, z, z, torch.zeros(ids.shape[0], device=ids.device))
        recs = [idx[g] for g in batch.group_index.tolist()]
        d = self._with_teacher(data, batch.prompt_length, recs, "eval")
        B = float(ids.shape[0])
        loss, st = self.sdft_loss(d, torch.tensor(1.0, device=ids.device))  # the sum of the rows' means
        n = st["tokens"]
        res.update({"loss": (float(loss), B), "self_distillation/distillation_loss": (st["loss_sum"], n),
                    "sdft/distillation_loss": (st["loss_sum"], n), "entropy": (st["entropy_sum"], n)})
        return res

    # ------------------------------------------------------------------ checkpoints

    def _progress_postfix(self, m: Dict[str, float]) -> Dict[str, str]:
        return {"loss": f"{m.get('loss', float('nan')):.4f}",
                "distill": f"{m.get('sdft/distillation_loss', float('nan')):.4f}"}


__all__ = ["PRIVILEGED_KEY", "SDFTRollout", "SDFTTrainer", "SelfTeacher", "SelfTeacherTrainer", "compose_teacher_prompt",
           "ema_update", "last_user_text", "prompt_layout", "stringify_privileged_context"]
