"""End-to-end step benchmark: one PPO step, one GRPO step and one DPO step (and KTO / SimPO / distillation /
online DPO / SFT / reward model), rlhf_fast against TRL.

Both sides get the same tiny Llama-family policy (built from a config with the same seed,
tokenizer trained locally), the same prompts, the same reward function and the same
step configuration (prompts × group size, new tokens, epochs, mini-batch, learning rate,
KL coefficient, clip ranges). A step = generation → per-token log-probs of the policy and
the reference (and critic values for PPO) → rewards and advantages → the update.

What "TRL" is here. TRL 1.x (1.16 in this venv) ships GRPOTrainer but no longer PPOTrainer,
and its trainers run a whole ``train()`` loop through accelerate/datasets that cannot be
split into phases. So the TRL side is the step those trainers perform, written with TRL's
own utilities where TRL has them:

* generation: ``model.generate`` with a ``GenerationConfig``, as GRPOTrainer does without
  vLLM; the completion mask stops after the first EOS, as in GRPOTrainer;
* log-probs, GRPO (``E2EConfig.trl_logprobs``; by default on CUDA, see there): TRL 1.x's own path, ``trl.trainer.utils.add_fused_lm_head`` on the policy
  (log-probs and entropy) and the reference, then ``model(..., labels=..., fused_lm_head=True)``
  (GRPOTrainer._get_per_token_logps_and_entropies: chunked log-probs without the ``[B, T, V]``
  logits; on the CPU TRL scores every position, on CUDA only the completion's); the loss
  forward computes the entropy, as GRPOTrainer._compute_loss does for its metric;
* log-probs, PPO, and GRPO on the CPU: ``trl.trainer.utils.selective_log_softmax`` on a
  ``logits_to_keep`` forward (TRL <= 0.2x GRPOTrainer._get_per_token_logps; the last PPOTrainer
  kept the logits of every position, so ``logits_to_keep`` is a saving given to the TRL side, as
  is leaving out the no-grad entropy TRL 0.2x computed from the loss forward's logits);
* optimiser: what transformers' Trainer gives TRL's trainers by default (TrainingArguments:
  ``adamw_torch_fused`` with torch >= 2.8, weight decay 0), the same fused AdamW as rlhf_fast;
* GRPO: group mean / std advantages and the clipped loss with the k3 KL term in the loss,
  token-mean aggregation (GRPOTrainer._compute_loss, loss_type "bnpo"); with one epoch and
  one mini-batch the old-policy forward is skipped and the current log-probs, detached,
  stand in (as GRPOTrainer does when num_iterations is 1);
* PPO: the algorithm of TRL's last PPOTrainer (0.2x): the policy's rollout log-probs from
  the generation scores (``output_scores``, no second forward), k1 KL in the per-token
  reward, score at the last token, GAE as a Python loop over time, whitened advantages,
  clipped policy and value losses in one backward through a policy+value optimiser.

rlhf_fast runs with ``ppo.old_logp="behaviour"`` (the sampler's log-probs, no second
forward), the same saving on both sides.

DPO (``algo="dpo"``, its own table): one optimizer step over ``dpo_pairs`` fixed pairs
(:func:`dpo_pairs`: prompts from PROMPTS padded to ``dpo_prompt_tokens`` tokens, responses of
fixed lengths in [dpo_min_response, dpo_max_response], the same token ids on both sides), the
reference forward every step on both sides (TRL's default ``precompute_ref_log_probs=False``).
Phases: ``reference`` (the reference model's log-probs of the pairs) and ``update`` (the rest:
policy forward + backward on chosen + rejected rows in one batch, loss, optimizer step). The TRL
side is TRL's own ``trl.DPOTrainer`` built on an in-memory ``datasets.Dataset`` and driven for
one optimizer step (:class:`TRLDPOStep` says what is TRL's code and what is written out); on
the CPU its fused LM head is swapped for TRL <= 0.2x's logits + ``selective_log_softmax`` (the
stronger of the two there, same log-probs; ``trl_logprobs``). rlhf_fast's side is
``DPOTrainer.train_step`` (:class:`RLHFFastDPOStep`).

KTO and SimPO (``algo="kto"`` / ``"simpo"``, not in the default selection: ``--algos kto,simpo``;
a table each), on the same pairs. KTO: TRL's own ``trl.KTOTrainer`` (loss_type "kto",
:class:`TRLKTOStep`) against rlhf_fast's ``KTOTrainer.train_step`` (:class:`RLHFFastKTOStep`),
one optimizer step over the ``2 · dpo_pairs`` examples the pairs unpair into, each with its KL row
(its prompt with the previous example's completion: TRL's rotation, run by both sides over the
same order, :func:`kto_step_order`); phases ``reference`` (the reference model's forwards of the
rows and KL rows) and ``update``; TRL's fused head swapped on the CPU as for DPO. SimPO,
reference-free: TRL's ``trl.experimental.cpo.CPOTrainer`` with loss_type "simpo" and its defaults
(simpo_gamma 0.5, cpo_alpha 1.0; :class:`TRLSimPOStep`, its own full-logits path kept as is)
against ``DPOTrainer`` with ``loss_type: simpo`` (:class:`RLHFFastDPOStep`), no reference model on
either side, the step alone timed.

On-policy distillation and online DPO (``algo="distill"`` / ``"online_dpo"``, ``--algos``; a table
each) drive TRL's own trainers (``DistillationTrainer``, :class:`TRLDistillStep`; the experimental
``OnlineDPOTrainer``, :class:`TRLOnlineDPOStep`) one optimizer step, generation included, against
rlhf_fast's ``DistillationTrainer.step()`` / ``OnlineDPOTrainer.step()``. Online DPO: each prompt
answered twice, the digit reward picks the chosen answer, the sigmoid DPO loss on the answers' summed
log-probs; phases ``generate``, ``logprobs`` (the reference's log-probs) and ``update`` (the rest).

TRL's experimental SDFT, SDPO and IW-OPD trainers (``algo="sdft"`` / ``"sdpo"`` / ``"iw_opd"``, ``--algos``; a
table each) are driven one optimizer step as the distillation one (:class:`TRLSDFTStep`, :class:`TRLSDPOStep`,
:class:`TRLIWOPDStep`), generation included, against rlhf_fast's ``SDFTTrainer.step()`` / ``SDPOTrainer.step()``
/ ``DistillationTrainer.step()`` with ``distill.objective: iw_opd``; phases ``generate`` and ``update``. SDFT:
the policy distils itself, its teacher the initial policy reading each prompt with a privileged context
(:func:`self_distill_records`); SDPO: GRPO's rollout with the digit reward, each answer distilled from an EMA
teacher reading the prompt reprompted with another answer of its group; IW-OPD: the distillation table's
student and teacher, the sampled-token importance-weighted objective.

SFT and the reward model (``algo="sft"`` / ``"reward"``, ``--algos``; a table each) drive TRL's own
``SFTTrainer`` (:class:`TRLSFTStep`: prompt–completion records, completion-only loss, the token mean over
the batch's completion tokens) and ``RewardTrainer`` (:class:`TRLRewardStep`: pairwise Bradley–Terry on a
sequence-classification model built from the policy's config) one optimizer step, against rlhf_fast's
``SFTTrainer.train_step`` / ``RewardTrainer.train_step``, on the DPO pairs (SFT: every prompt with its chosen
and with its rejected response); the step alone is timed. The SFT table has a second, padding-free row (TRL's
``padding_free``, rlhf_fast's ``packing``). Each table first runs :func:`check_same_step` on its
configuration (same rows and weights, the same loss over two steps, close weights after them) and reports
the result in its notes.

Configurations: on the CPU the tiny model with a 256-token vocabulary (the framework-overhead
regime) and the same model with a 32768-token vocabulary (the LM head dominates, as in real
models); on a GPU (``--device cuda``) a Qwen2-0.5B-shaped model built from a config.

Each (framework, algorithm) runs in a fresh subprocess: one warm-up step, then ``steps``
timed steps (median per phase) on the default allocator, then one more step for the extra
peak RSS (VmHWM after ``/proc/self/clear_refs``, glibc made to return freed memory at once).
If rlhf_fast's trainer cannot run, its rows say so; no number is made up.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .common import (Table, _status_kb, fmt_bytes, profiler_extra_peak_bytes, rss_extra_peak_bytes_here,
                     tighten_malloc)

PROMPTS = ["count: 1 2 3", "list the digits:", "numbers please:", "go on: 4 5", "write 7 8 9:", "digits:",
           "say 0 1:", "more numbers:"]
PHASES = ("generate", "logprobs", "reward_adv", "update")
DPO_PHASES = ("reference", "update")
RL_ALGOS = ("ppo", "grpo")
ALGOS = RL_ALGOS + ("dpo",)  # the default selection
# also accepted by --algos: KTO (TRL's KTOTrainer) and SimPO (TRL's CPOTrainer, loss_type "simpo"), on-policy
# distillation and online DPO (TRL's experimental OnlineDPOTrainer), SFT (TRL's SFTTrainer) and the reward model
# (TRL's RewardTrainer), each its own table; then TRL's experimental self-distillation (SDFT, SDPO) and
# importance-weighted on-policy distillation (IW-OPD) trainers
ALL_ALGOS = ALGOS + ("kto", "simpo", "distill", "online_dpo", "sft", "reward", "sdft", "sdpo", "iw_opd")
# each algorithm's phase columns (SimPO, reference-free, has only the step)
DISTILL_PHASES = ("generate", "update")
# online DPO: logprobs = the reference's log-probs of the answers; update = the rest of the step
ONLINE_DPO_PHASES = ("generate", "logprobs", "update")
ALGO_PHASES = {"ppo": PHASES, "grpo": PHASES, "dpo": DPO_PHASES, "kto": DPO_PHASES, "simpo": (),
               "distill": DISTILL_PHASES, "online_dpo": ONLINE_DPO_PHASES, "sft": (), "reward": (),
               "sdft": DISTILL_PHASES, "sdpo": DISTILL_PHASES, "iw_opd": DISTILL_PHASES}


def digit_reward(prompts: List[str], completions: List[str]) -> List[float]:
    """The shared, checkable reward: the fraction of non-space characters that are digits."""
    out = []
    for c in completions:
        chars = [ch for ch in c if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / max(1, len(chars)))
    return out


# The step options of `rlhf-fast bench e2e` and of this module's command line: (flag, E2EConfig
# field, type — None for a switch —, help). They change the rlhf_fast side only.
STEP_OPTIONS = (
    ("--rl-prompt-tokens", "rl_prompt_tokens", int,
     "the PPO / GRPO prompts' length in tokens (default: the prompts as they are, 2-5 tokens)"),
    ("--rl-prefix-sharing", "rl_prefix_sharing", None,
     "our PPO / GRPO step with ppo.prefix_sharing (each prompt computed once per group)"),
    ("--rl-padding-free", "rl_padding_free", None, "our PPO / GRPO step with ppo.padding_free (every forward one "
     "packed row)"),
    ("--dpo-prompt-tokens", "dpo_prompt_tokens", int, "the DPO pairs' prompt length in tokens"),
    ("--dpo-prefix-sharing", "dpo_prefix_sharing", None,
     "our DPO step with prefix_sharing (each pair's prompt scored once)"),
)


def add_step_arguments(parser, note: str = "") -> None:
    """Add :data:`STEP_OPTIONS` to the argparse ``parser`` (``note`` prefixed to each help)."""
    for flag, _, tp, text in STEP_OPTIONS:
        if tp is None:
            parser.add_argument(flag, action="store_true", help=note + text)
        else:
            parser.add_argument(flag, type=tp, default=None, help=note + text)


def step_overrides(args) -> Dict[str, object]:
    """``{E2EConfig field: value}`` of the :data:`STEP_OPTIONS` given in the parsed ``args`` (a
    switch on, a number given), in :data:`STEP_OPTIONS`' order."""
    out = {}
    for _, name, _, _ in STEP_OPTIONS:
        v = getattr(args, name, None)
        if v is not None and v is not False:
            out[name] = v
    return out


@dataclass
class E2EConfig:
    """One step's configuration, shared by both frameworks.

    The batch is ``prompts_per_step × group_size`` sequences of at most ``max_new_tokens``
    new tokens; ``steps`` timed steps follow one warm-up step.
    """

    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 32
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    epochs: int = 1
    mini_batch_size: int = 16
    lr: float = 1e-4
    kl_coef: float = 0.05
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    steps: int = 5
    seed: int = 0
    family: str = "llama"
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    device: str = "cpu"
    # a tokenizer saved by build_tokenizer (run_table trains it once and hands it to every
    # subprocess: 7 s per subprocess at V=151936 on 2 cores); None: train it in build_model
    tokenizer_dir: Optional[str] = None
    # the TRL side's log-prob path (GRPO, DPO, KTO; not SimPO: CPOTrainer has one path, full logits):
    # "fused_head" = TRL 1.x GRPOTrainer's / DPOTrainer's / KTOTrainer's own (add_fused_lm_head);
    # "selective" = logits + selective_log_softmax (TRL <= 0.2x GRPO, the last PPOTrainer);
    # "auto": fused_head for GRPO / DPO / KTO on CUDA (Triton, completion tokens only), selective elsewhere —
    # on the CPU TRL's fused head falls back to torch tiles over every position and was slower
    # and heavier than selective (GRPO, V=32768: 2.16 s / 625 MiB vs 1.48 s / 198 MiB), so the
    # CPU tables compare against the stronger of the two
    trl_logprobs: str = "auto"
    # DPO (algo "dpo"): ``dpo_pairs`` pairs per optimizer step, each a prompt of ``dpo_prompt_tokens``
    # tokens and two responses of fixed lengths spread over [dpo_min_response, dpo_max_response]
    # tokens (+ eos), the same every step (:func:`dpo_pairs`); beta and loss_type "sigmoid" on both sides
    dpo_pairs: int = 8
    dpo_prompt_tokens: int = 64
    dpo_min_response: int = 64
    dpo_max_response: int = 128
    dpo_beta: float = 0.1
    # rlhf_fast's DPO side with DPOConfig.prefix_sharing (each pair's prompt scored once, in one packed row;
    # TRL has no such option, its side is unchanged)
    dpo_prefix_sharing: bool = False
    # rlhf_fast's PPO / GRPO side with ppo.prefix_sharing (each prompt computed once per group of answers, by
    # the reference's scoring, the PPO critic and in the update; TRL has no such option, its side is unchanged)
    rl_prefix_sharing: bool = False
    # rlhf_fast's PPO / GRPO side with ppo.padding_free (every forward one packed row without padding: the
    # scoring, the critic, the update; TRL has no such option in its GRPO step, its side is unchanged)
    rl_padding_free: bool = False
    # the PPO / GRPO prompts' length in tokens (both sides): 0, PROMPTS as they are (2-5 tokens); else
    # each padded with single-token words to this length (rl_prompts), the regime of rl_prefix_sharing
    rl_prompt_tokens: int = 0
    # on-policy distillation (algo "distill"): a teacher of the student's vocabulary, wider
    # (``teacher_hidden_size``, ``teacher_layers``, its own seed), the generalised JSD's ``distill_beta``
    # (TRL DistillationConfig's default 1.0: the reverse KL); the batch is the RL steps' prompts_per_step ×
    # group_size sequences of at most max_new_tokens new tokens
    teacher_hidden_size: int = 128
    teacher_layers: int = 2
    distill_beta: float = 1.0
    # SFT (algo "sft"): the step padding-free on both sides (TRL's padding_free, rlhf_fast's packing: true); the
    # SFT table runs it as its second row
    sft_packing: bool = False

    def __post_init__(self):
        for f in ("prompts_per_step", "group_size", "max_new_tokens", "vocab_size", "hidden_size", "num_layers",
                  "num_heads", "epochs", "mini_batch_size", "steps", "dpo_pairs", "dpo_prompt_tokens",
                  "dpo_min_response", "dpo_max_response", "teacher_hidden_size", "teacher_layers"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be an int >= 1, got {v!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO needs a group), got {self.group_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads, got {self.hidden_size}, {self.num_heads}")
        if not (self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.trl_logprobs not in ("auto", "fused_head", "selective"):
            raise ValueError(f"trl_logprobs must be 'auto', 'fused_head' or 'selective', got {self.trl_logprobs!r}")
        if self.dpo_min_response > self.dpo_max_response:
            raise ValueError(f"dpo_min_response ({self.dpo_min_response}) must be <= dpo_max_response "
                             f"({self.dpo_max_response})")
        if not (isinstance(self.dpo_beta, (int, float)) and not isinstance(self.dpo_beta, bool) and self.dpo_beta > 0):
            raise ValueError(f"dpo_beta must be a number > 0, got {self.dpo_beta!r}")
        if not isinstance(self.dpo_prefix_sharing, bool):
            raise ValueError(f"dpo_prefix_sharing must be true or false, got {self.dpo_prefix_sharing!r}")
        for f in ("rl_prefix_sharing", "rl_padding_free"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be true or false, got {getattr(self, f)!r}")
        if not isinstance(self.sft_packing, bool):
            raise ValueError(f"sft_packing must be true or false, got {self.sft_packing!r}")
        if isinstance(self.rl_prompt_tokens, bool) or not isinstance(self.rl_prompt_tokens, int) or \
                self.rl_prompt_tokens < 0:
            raise ValueError(f"rl_prompt_tokens must be an int >= 0 (0: the prompts as they are), "
                             f"got {self.rl_prompt_tokens!r}")
        if not (isinstance(self.distill_beta, (int, float)) and not isinstance(self.distill_beta, bool)
                and 0.0 <= self.distill_beta <= 1.0):
            raise ValueError(f"distill_beta must be a number in [0, 1], got {self.distill_beta!r}")
        head_dim = self.hidden_size // self.num_heads
        if self.teacher_hidden_size % head_dim or (self.num_kv_heads
                                                   and (self.teacher_hidden_size // head_dim) % self.num_kv_heads):
            raise ValueError(f"teacher_hidden_size must be a multiple of the student's head size ({head_dim}) whose "
                             f"head count num_kv_heads ({self.num_kv_heads}) divides, got {self.teacher_hidden_size}")

    def trl_fused_head(self, algo: str) -> bool:
        """Whether the TRL side of ``algo`` takes its log-probs through TRL's fused LM head
        (never for SimPO: TRL's CPOTrainer has none, it always takes the full logits)."""
        if algo == "simpo":
            return False
        if self.trl_logprobs == "auto":
            return algo in ("grpo", "dpo", "kto", "sft") and self.device == "cuda"
        return self.trl_logprobs == "fused_head"

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def dpo_max_len(self) -> int:
        """Both sides' maximum row length (prompt + longest response + eos): nothing is truncated."""
        return self.dpo_prompt_tokens + self.dpo_max_response + 1

    @classmethod
    def quick(cls) -> "E2EConfig":
        return cls(max_new_tokens=8, hidden_size=32, steps=1, dpo_pairs=2, dpo_prompt_tokens=8, dpo_min_response=4,
                   dpo_max_response=8)

    @classmethod
    def large_vocab(cls) -> "E2EConfig":
        """The same tiny transformer with a real-sized vocabulary (32768 BPE tokens, as
        Llama-2 / Mistral), where the LM head and its [B, T, V] logits dominate."""
        return cls(vocab_size=32768)

    @classmethod
    def gpu_0p5b(cls, quick: bool = False) -> "E2EConfig":
        """A Qwen2-0.5B-shaped model (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
        vocabulary 151936; 0.63B parameters with an untied head) built from a config on the GPU:
        64 sequences (8 prompts × 8) of up to 256 new tokens, fp32 weights with TF32 matmuls.
        ``quick``: 4 layers, 16 sequences of 32 tokens."""
        # the distillation teacher Qwen2-1.5B-shaped in width (1536, 24 heads of the student's size 64)
        big = dict(family="qwen2", vocab_size=151936, hidden_size=896, num_heads=14, num_kv_heads=2,
                   intermediate_size=4864, device="cuda", teacher_hidden_size=1536,
                   teacher_layers=4 if quick else 28)
        if quick:
            return cls(num_layers=4, prompts_per_step=4, group_size=4, max_new_tokens=32, mini_batch_size=16, steps=2,
                       **big)
        return cls(num_layers=24, prompts_per_step=8, group_size=8, max_new_tokens=256, mini_batch_size=64, steps=3,
                   **big)


def build_tokenizer(cfg: E2EConfig):
    """The BPE tokenizer both sides use, trained locally on sample texts (and, for a
    real-sized vocabulary, enough random words to fill it); deterministic in ``cfg.seed``."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    texts = sample_texts(256, seed=cfg.seed) + PROMPTS + ["0 1 2 3 4 5 6 7 8 9"]
    if cfg.vocab_size > 1024:  # enough distinct words for BPE to fill a real-sized vocabulary
        rng = random.Random(cfg.seed)
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))) for _ in range(3 * cfg.vocab_size)]
        texts += [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    return train_tokenizer(texts, cfg.vocab_size)


def build_model(cfg: E2EConfig):
    """The tiny policy and tokenizer both sides start from (same seed, same weights); the
    tokenizer is loaded from ``cfg.tokenizer_dir`` when set."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    if cfg.tokenizer_dir is not None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(cfg.tokenizer_dir)
    else:
        tok = build_tokenizer(cfg)
    model = tiny_causal_lm(len(tok), family=cfg.family, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                           num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                           intermediate_size=cfg.intermediate_size, seed=cfg.seed, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return model.to(cfg.device), tok


def build_teacher(cfg: E2EConfig, tok):
    """The distillation teacher: the student's family, vocabulary and head size, ``teacher_hidden_size``
    wide and ``teacher_layers`` deep, from its own seed (``seed + 1``), frozen."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    heads = cfg.teacher_hidden_size // (cfg.hidden_size // cfg.num_heads)  # the student's head size
    teacher = tiny_causal_lm(len(tok), family=cfg.family, hidden_size=cfg.teacher_hidden_size,
                             num_layers=cfg.teacher_layers, num_heads=heads, num_kv_heads=cfg.num_kv_heads,
                             seed=cfg.seed + 1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    return teacher.to(cfg.device).requires_grad_(False)


def distill_prompts(cfg: E2EConfig) -> List[str]:
    """The distillation step's prompts: ``prompts_per_step`` of PROMPTS, each ``group_size`` times
    (the RL steps' batch), in rlhf_fast's rollout order."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(cfg.prompts_per_step) for _ in range(cfg.group_size)]


def _sync(device: str) -> None:
    """Wait for queued GPU work, so a phase's wall time includes its kernels."""
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_step(trainer, device: str) -> Tuple[Dict[str, float], float]:
    """``(metrics, wall seconds)`` of one ``trainer.step()`` of an rlhf_fast RL-family trainer,
    its GPU work included. The trainer's phase timers (``time/generate``, ``time/logprobs``,
    ``time/update``) synchronise too, through its own switch (``trainer.phase_clock``, the
    config's ``sync_phase_timers``; a no-op on the CPU), so they end where the TRL side's
    synchronised ones do instead of leaving a phase's kernels to the next one."""
    trainer.phase_clock.synchronize = True
    _sync(device)
    t0 = time.perf_counter()
    m = trainer.step()
    _sync(device)
    return m, time.perf_counter() - t0


# --------------------------------------------------------------------------- TRL side


class TRLStep:
    """The TRL-equivalent PPO or GRPO step (see the module docstring for what is TRL's own)."""

    def __init__(self, cfg: E2EConfig, algo: str):
        from transformers import GenerationConfig

        self.cfg, self.algo = cfg, algo
        self.model, self.tok = build_model(cfg)
        self.model.train(False)
        self.ref = copy.deepcopy(self.model).requires_grad_(False)
        params = list(self.model.parameters())
        self.critic = None
        if algo == "ppo":
            # TRL's PPO value model: the policy's backbone with a scalar score head
            H = self.model.config.hidden_size
            self.critic = torch.nn.ModuleDict({"backbone": copy.deepcopy(self.model.model),
                                               "head": torch.nn.Linear(H, 1)}).to(cfg.device)
            params += list(self.critic.parameters())
        # The optimiser TRL's trainers get from transformers' Trainer: TrainingArguments' defaults
        # (optim "adamw_torch_fused" with torch >= 2.8, weight_decay 0), as rlhf_fast's fused AdamW
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0,
                                     **({"fused": True} if cfg.device in ("cpu", "cuda") else {}))
        self.fused_head = cfg.trl_fused_head(algo)
        if self.fused_head:
            # TRL 1.x GRPOTrainer.__init__: the policy and the reference get TRL's fused, chunked LM
            # head (log-probs without the [B, T, V] logits; the policy's also returns the entropy).
            # (Its buffer is [min(N, 4096), 32768] whatever the vocabulary: at V=256 on the CPU an
            # untouched 80 MiB that the allocator peak counts and the RSS does not.)
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(self.model, temperature=cfg.temperature, outputs=("log_probs", "entropy"))
            add_fused_lm_head(self.ref, temperature=cfg.temperature)
        self.gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                                        max_new_tokens=cfg.max_new_tokens, pad_token_id=self.tok.pad_token_id,
                                        eos_token_id=self.tok.eos_token_id)
        self.pos = 0
        self.prompts = rl_prompts(cfg, self.tok)

    def _prompts(self) -> List[str]:
        k = self.cfg.prompts_per_step
        ps = [self.prompts[(self.pos + i) % len(self.prompts)] for i in range(k)]
        self.pos += k
        return [p for p in ps for _ in range(self.cfg.group_size)]  # RepeatSampler order

    def _logps(self, model, ids, am, keep, entropy=False):
        if self.fused_head:
            # GRPOTrainer._get_per_token_logps_and_entropies (TRL 1.x): labels -100 outside the
            # completion, ``fused_lm_head=True`` forward
            labels = ids.masked_fill(am == 0, -100)
            labels[:, :-keep] = -100
            out = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
            logp = out.log_probs[:, -keep:]
            return (logp, out.entropy[:, -keep:]) if entropy else logp
        from trl.trainer.utils import selective_log_softmax

        # the last PPOTrainer's forward + selective_log_softmax (it kept every position's logits;
        # logits_to_keep, from GRPOTrainer, is a saving given to the TRL side here)
        logits = model(input_ids=ids, attention_mask=am, logits_to_keep=keep + 1).logits
        logits = logits[:, :-1, :][:, -keep:, :] / self.cfg.temperature
        logp = selective_log_softmax(logits, ids[:, -keep:])  # [B, C]
        return (logp, None) if entropy else logp

    def _values(self, ids, am, keep):
        h = self.critic["backbone"](input_ids=ids, attention_mask=am).last_hidden_state
        return self.critic["head"](h).squeeze(-1)[:, -keep - 1:-1]  # value of the state before each token

    def step(self) -> Dict[str, float]:
        cfg, tok, dev = self.cfg, self.tok, self.cfg.device
        _sync(dev)
        t0 = time.perf_counter()
        prompts = self._prompts()
        enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
        ppo = self.algo == "ppo"
        with torch.no_grad():
            # TRL's last PPOTrainer (batch_generation) keeps the sampler's scores [B, C, V] and
            # takes the policy's rollout log-probs from them instead of a second forward
            gen = self.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                      generation_config=self.gen_cfg, output_scores=ppo,
                                      return_dict_in_generate=True)
        out = gen.sequences
        P = enc.input_ids.shape[1]
        comp = out[:, P:]
        is_eos = comp == tok.eos_token_id
        eos_idx = torch.full((comp.shape[0],), comp.shape[1], dtype=torch.long, device=dev)
        has = is_eos.any(1)
        eos_idx[has] = is_eos.int().argmax(1)[has]
        cmask = (torch.arange(comp.shape[1], device=dev).unsqueeze(0) <= eos_idx.unsqueeze(1)).long()  # [B, C]
        am = torch.cat([enc.attention_mask, cmask], 1)
        C = comp.shape[1]
        _sync(dev)
        t1 = time.perf_counter()
        # GRPOTrainer skips the old-policy forward when each generation gets exactly one
        # optimiser step (num_iterations 1, one mini-batch): old log-probs = current, detached
        on_policy = self.algo == "grpo" and cfg.epochs == 1 and out.shape[0] <= cfg.mini_batch_size
        with torch.no_grad():
            if ppo:
                from trl.trainer.utils import selective_log_softmax

                old = selective_log_softmax(torch.stack(gen.scores, 1), comp)
            else:
                old = None if on_policy else self._logps(self.model, out, am, C)
            del gen
            ref = self._logps(self.ref, out, am, C)
            values = self._values(out, am, C) if self.critic is not None else None
        _sync(dev)
        t2 = time.perf_counter()
        texts = tok.batch_decode(comp, skip_special_tokens=True)
        scores = torch.tensor(digit_reward(prompts, texts), dtype=torch.float32, device=dev)
        m = cmask.float()
        if self.algo == "grpo":
            G = cfg.group_size
            mean = scores.view(-1, G).mean(1).repeat_interleave(G)
            std = scores.view(-1, G).std(1).repeat_interleave(G)
            adv = ((scores - mean) / (std + 1e-4)).unsqueeze(1).expand_as(m)
            returns = None
        else:
            kl = old - ref
            rewards = -cfg.kl_coef * kl * m
            last = (m.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(scores), device=dev), last] += scores
            values = values * m
            lastgaelam = torch.zeros(len(scores), device=dev)
            rev = []
            for t in reversed(range(C)):  # TRL's PPO GAE loop
                nextvalues = values[:, t + 1] if t < C - 1 else 0.0
                delta = rewards[:, t] + cfg.gamma * nextvalues - values[:, t]
                lastgaelam = delta + cfg.gamma * cfg.lam * lastgaelam
                rev.append(lastgaelam)
            adv = torch.stack(rev[::-1], 1)
            returns = adv + values
            mu = (adv * m).sum() / m.sum()
            var = (((adv - mu) ** 2) * m).sum() / (m.sum() - 1).clamp(min=1)
            adv = (adv - mu) * torch.rsqrt(var + 1e-8) * m  # masked_whiten
        _sync(dev)
        t3 = time.perf_counter()
        B = out.shape[0]
        for _ in range(cfg.epochs):
            perm = torch.randperm(B).to(dev)
            for s in range(0, B, cfg.mini_batch_size):
                i = perm[s:s + cfg.mini_batch_size]
                # GRPOTrainer._compute_loss asks for the entropy too (its "entropy" metric)
                logp, ent = self._logps(self.model, out[i], am[i], C, entropy=True)
                mi = m[i]
                ratio = torch.exp(logp - (logp.detach() if old is None else old[i]))
                l1 = -adv[i] * ratio
                l2 = -adv[i] * torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip)
                tok_loss = torch.maximum(l1, l2)
                if self.algo == "grpo":
                    d = ref[i] - logp
                    tok_loss = tok_loss + cfg.kl_coef * (torch.exp(d) - d - 1)
                loss = (tok_loss * mi).sum() / mi.sum().clamp(min=1)
                if self.algo == "ppo":
                    v = self._values(out[i], am[i], C)
                    vc = torch.clamp(v, values[i] - cfg.value_clip, values[i] + cfg.value_clip)
                    vf = 0.5 * (torch.maximum((v - returns[i]) ** 2, (vc - returns[i]) ** 2) * mi).sum() / mi.sum()
                    loss = loss + cfg.value_coef * vf
                loss.backward()
                if ent is not None:  # the logged entropy metric (masked mean, read back to the host)
                    float((ent.detach() * mi).sum() / mi.sum().clamp(min=1))
                torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        _sync(dev)
        t4 = time.perf_counter()
        return dict(generate=t1 - t0, logprobs=t2 - t1, reward_adv=t3 - t2, update=t4 - t3, step=t4 - t0,
                    tokens=float(m.sum()), reward=float(scores.mean()))


# --------------------------------------------------------------------------- rlhf_fast side


class RLHFFastStep:
    """rlhf_fast's RLTrainer.step() on the same model, prompts, reward and configuration."""

    def __init__(self, cfg: E2EConfig, algo: str):
        from rlhf_fast.trainers.rl import RLTrainer
        from rlhf_fast.trainers.rl_config import (DataConfig, KLConfig, OptimConfig, PPOConfig, RLConfig,
                                                  RolloutConfig)

        self.cfg = cfg
        model, tok = build_model(cfg)
        ppo = algo == "ppo"
        prompts = rl_prompts(cfg, tok)
        rl_cfg = RLConfig(
            estimator="gae" if ppo else "grpo", steps=cfg.steps + 1, seed=cfg.seed, device=cfg.device, progress=False,
            sample_every=0,
            data=DataConfig(prompts=list(prompts), shuffle=False),
            rollout=RolloutConfig(prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
            kl=KLConfig(coef=cfg.kl_coef, placement="reward" if ppo else "loss", kind="k1" if ppo else "k3"),
            ppo=PPOConfig(epochs=cfg.epochs, mini_batch_size=cfg.mini_batch_size, micro_batch_size=cfg.mini_batch_size,
                          clip_low=cfg.clip, value_clip=cfg.value_clip, value_coef=cfg.value_coef, gamma=cfg.gamma,
                          lam=cfg.lam, whiten_advantages=ppo, max_grad_norm=1.0,
                          # as the TRL side: PPO's log-probs from generation, GRPO's on-policy shortcut
                          old_logp="behaviour", prefix_sharing=cfg.rl_prefix_sharing,
                          padding_free=cfg.rl_padding_free),
            optim=OptimConfig(lr=cfg.lr, critic_lr=cfg.lr),
        )
        self.trainer = RLTrainer(rl_cfg, model, tok, reward_fns=[digit_reward], prompts=list(prompts))

    def step(self) -> Dict[str, float]:
        m, step = _timed_step(self.trainer, self.cfg.device)
        gen, lp, upd = m.get("time/generate", 0.0), m.get("time/logprobs", 0.0), m.get("time/update", 0.0)
        n = self.cfg.batch_size - m.get("reward/dropped", 0)
        return dict(generate=gen, logprobs=lp, reward_adv=max(0.0, step - gen - lp - upd), update=upd, step=step,
                    tokens=float(m.get("response_length/mean", 0.0)) * n, reward=float(m.get("reward/total", 0.0)))


# --------------------------------------------------------------------------- DPO


def _single_token_words(tok) -> List[str]:
    """Vocabulary words that ``tok`` encodes, after a space, as exactly one token (sorted)."""
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("Ġ") and len(w) > 1 and w[1:].isalnum())
    return [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def rl_prompts(cfg: E2EConfig, tok) -> List[str]:
    """The PPO / GRPO steps' prompts (both sides, in this order): PROMPTS, or with
    ``cfg.rl_prompt_tokens`` each PROMPTS[i] followed by random single-token words up to that many
    tokens (every word boundary a token boundary, so both sides encode the same ids); deterministic
    in ``cfg.seed``."""
    if not cfg.rl_prompt_tokens:
        return list(PROMPTS)
    words, rng = _single_token_words(tok), random.Random(cfg.seed + 1)
    if not words:
        raise ValueError("the tokenizer has no single-token words to lengthen the RL prompts with")
    out = []
    for p in PROMPTS:
        room = cfg.rl_prompt_tokens - len(tok(p)["input_ids"])
        if room < 0:
            raise ValueError(f"rl_prompt_tokens ({cfg.rl_prompt_tokens}) is shorter than the prompt {p!r}, "
                             f"{len(tok(p)['input_ids'])} tokens with the V={cfg.vocab_size} tokenizer (give 0, the "
                             f"prompts as they are, or at least the longest prompt's length)")
        out.append(p + "".join(" " + rng.choice(words) for _ in range(room)))
    return out


def dpo_pairs(cfg: E2EConfig, tok, bos: bool = False) -> List[Dict[str, str]]:
    """The DPO step's pairs as text, ``{"prompt", "chosen", "rejected"}`` × ``cfg.dpo_pairs``.

    Prompt i is ``PROMPTS[i]`` followed by random single-token words up to ``cfg.dpo_prompt_tokens``
    tokens; its chosen and rejected responses are ``n`` single-token words each (with a leading
    space), ``n`` spread over [dpo_min_response, dpo_max_response] (chosen rising, rejected
    falling with i). Every word boundary is a token boundary, so each side's own tokenisation
    (TRL: prompt + response + eos as one text, split at the common prefix; rlhf_fast: prompt and
    response apart, eos appended) gives the same token ids: both runners check the lengths
    (:func:`_check_dpo_rows`), the test the ids. Deterministic in ``cfg.seed``.

    ``bos``: every prompt starts with the tokenizer's bos token (its text, which both sides
    encode as the one special token; it counts in the ``dpo_prompt_tokens``) — for TRL's
    CPOTrainer, which puts a bos in front of every prompt that lacks one, as a tokenizer that adds
    bos itself (Llama's) would give both sides; the tiny tokenizer adds none."""
    words = _single_token_words(tok)
    if not words:
        raise ValueError("the tokenizer has no single-token words to build DPO pairs from")
    rng = random.Random(cfg.seed)
    n, lo, hi = cfg.dpo_pairs, cfg.dpo_min_response, cfg.dpo_max_response

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    out = []
    first = tok.bos_token if bos else ""
    for i in range(n):
        head = first + PROMPTS[i % len(PROMPTS)]
        room = cfg.dpo_prompt_tokens - len(tok(head)["input_ids"])
        prompt = head + text(room) if room >= 0 else first + text(cfg.dpo_prompt_tokens - int(bos))
        lc = lo + round((hi - lo) * i / max(1, n - 1))
        lr = hi - round((hi - lo) * i / max(1, n - 1))
        out.append({"prompt": prompt, "chosen": text(lc), "rejected": text(lr)})
    return out


def _check_dpo_rows(cfg: E2EConfig, rows: List[tuple], eos: int, side: str) -> None:
    """RuntimeError unless ``rows`` — ``(prompt, chosen, rejected)`` token ids — are the pairs
    :func:`dpo_pairs` describes: every pair kept, prompts of ``dpo_prompt_tokens`` tokens,
    responses of their configured lengths ending in eos."""
    n, lo, hi = cfg.dpo_pairs, cfg.dpo_min_response, cfg.dpo_max_response
    want = [(cfg.dpo_prompt_tokens, lo + round((hi - lo) * i / max(1, n - 1)) + 1,
             hi - round((hi - lo) * i / max(1, n - 1)) + 1) for i in range(n)]
    got = [(len(p), len(c), len(r)) for p, c, r in rows]
    if sorted(got) != sorted(want) or any(c[-1] != eos or r[-1] != eos for _, c, r in rows):
        raise RuntimeError(f"{side}: the DPO pairs tokenised to (prompt, chosen, rejected) lengths {got}, "
                           f"expected {want} with eos last")


def _timed_calls(fn: Callable, acc: List[float], device: str) -> Callable:
    """``fn`` that adds each call's wall time (GPU work included) to ``acc[0]``."""
    def wrapper(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        acc[0] += time.perf_counter() - t0
        return out
    return wrapper


def _trl_selective_head(model, metrics: bool, outputs: tuple = ("entropy", "mean_logits", "is_top1")) -> None:
    """Replace TRL 1.x's fused LM head on ``model`` (set by ``DPOTrainer.__init__``) with TRL
    <= 0.2x DPOTrainer's log-prob path, keeping the output contract ``_compute_loss`` reads: a
    ``logits_to_keep`` forward from the first completion label of the batch on (0.2x's
    ``use_logits_to_keep``), the ``[B, k, V]`` logits, ``trl.trainer.utils.selective_log_softmax``
    (with ``metrics``: ``selective_log_softmax_and_entropy`` and, without gradients, the mean
    logit and top-1 flags TRL 1.x's metrics read — those of ``outputs``, the fields the trainer
    asks TRL's head for: DPOTrainer all three, KTOTrainer entropy and mean logit), zeros before
    that column. The CPU rendering (``E2EConfig.trl_logprobs``): TRL 1.x's chunked head falls back
    to torch tiles over every position there, which was much slower (see :class:`TRLDPOStep`) and
    allocates a ``[min(N, 4096), 32768]`` buffer whatever the vocabulary."""
    from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax, selective_log_softmax_and_entropy

    patched = model.forward  # TRL's: without fused_lm_head=True it is the model's own forward

    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return patched(*args, **({} if labels is None else {"labels": labels}), **kwargs)
        shifted = labels[:, 1:]
        mask = shifted != -100
        first = int(mask.any(0).int().argmax()) if bool(mask.any()) else 0
        keep = shifted.shape[1] - first
        logits = patched(*args, logits_to_keep=keep + 1, **kwargs).logits[:, :-1]  # predicts shifted[:, first:]
        target, m = shifted[:, first:].clamp(min=0), mask[:, first:]
        ent = mean_logits = top1 = None
        if metrics:
            if "entropy" in outputs:
                logp, ent = selective_log_softmax_and_entropy(logits, target, entropy_requires_grad=False)
            else:
                logp = selective_log_softmax(logits, target)
            with torch.no_grad():
                mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
                top1 = logits.argmax(-1) == target if "is_top1" in outputs else None
        else:
            logp = selective_log_softmax(logits, target)

        def full(x):  # back to [B, T - 1], zero outside the completion
            if x is None:
                return None
            x = x.masked_fill(~m, 0)
            return torch.cat([x.new_zeros(x.shape[0], first), x], 1)

        return FusedCausalLMOutput(log_probs=full(logp), entropy=full(ent), mean_logits=full(mean_logits),
                                   is_top1=full(top1), label_mask=mask)

    model.forward = forward


def _trl_optimizer_step(runner, metrics_attr: str, split: Optional[str] = "train",
                        num_items_in_batch: bool = False) -> Tuple[float, float]:
    """One optimizer step of ``runner.trainer`` (a TRL trainer built on transformers' Trainer) on
    ``runner.examples``, written out as ``Trainer._inner_training_loop`` does it per step with
    gradient accumulation 1: collate, ``training_step``, clip, optimizer and scheduler step,
    ``zero_grad``. The step's metrics (``trainer.<metrics_attr>[split]``, or with ``split`` None
    ``trainer.<metrics_attr>`` itself — OnlineDPOTrainer's ``stats`` —, lists of values which TRL's
    log() would average and clear every logging_steps) go to ``runner.last_metrics`` and are
    cleared. ``num_items_in_batch``: pass ``training_step`` the count Trainer's loop gives a loss that
    normalises by it (``Trainer._get_num_items_in_batch``: the batch's labelled tokens; SFTTrainer's), else
    None. Returns (wall seconds, synchronised on the device; the loss)."""
    t, dev = runner.trainer, runner.cfg.device
    _sync(dev)
    t0 = time.perf_counter()
    inputs = t.data_collator(runner.examples)
    n_items = t._get_num_items_in_batch([inputs], t.args.device) if num_items_in_batch else None
    loss = t.training_step(t.model, inputs, n_items)
    if t.args.max_grad_norm > 0:
        t._clip_grad_norm(t.model)
    t.optimizer.step()
    t.lr_scheduler.step()
    t.model.zero_grad()
    t.state.global_step += 1
    store = getattr(t, metrics_attr)
    store = store[split] if split is not None else store
    runner.last_metrics = {k: v[-1] for k, v in store.items() if v}
    for v in store.values():  # (the lists, not the keys: OnlineDPOTrainer appends to fixed keys)
        v.clear()
    _sync(dev)
    return time.perf_counter() - t0, float(loss)


class TRLDPOStep:
    """One optimizer step of TRL 1.16's own ``trl.DPOTrainer``, built on an in-memory
    ``datasets.Dataset`` of the benchmark's pairs with the benchmark's model, a copy of it as
    ``ref_model`` (TRL would load the reference from the model's hub id, which a model built from a
    config does not have) and ``precompute_ref_log_probs=False`` (TRL's default: the reference
    forward runs every step).

    TRL's code: the dataset preparation (EOS appended, tokenisation, prompt / completion split),
    ``DataCollatorForPreference`` (chosen rows then rejected rows, right padding), the fused LM head
    TRL patches onto both models (``add_fused_lm_head``, with the outputs its metrics read),
    ``DPOTrainer.training_step`` → ``_compute_loss`` (policy forward on the concatenated rows,
    reference forward under no_grad, the sigmoid loss, every logged metric, the backward), and
    the optimizer and scheduler ``Trainer.create_optimizer_and_scheduler`` builds
    (``adamw_torch_fused``, weight decay 0: TrainingArguments' defaults). Written out, as
    ``Trainer._inner_training_loop`` does it per optimizer step with gradient accumulation 1:
    collate the step's examples, ``training_step``, ``_clip_grad_norm`` (max_grad_norm 1),
    ``optimizer.step()``, ``lr_scheduler.step()``, ``model.zero_grad()``; left out of that loop:
    callbacks, the flop / token counters and the every-``logging_steps`` log call (its metric
    lists are cleared each step instead). Config differences from TRL's defaults, the same on
    both sides: ``gradient_checkpointing=False`` (TRL's default is True; rlhf_fast's is off),
    fp32 (``bf16=False``), learning rate ``cfg.lr`` with a constant schedule, max_length =
    prompt + longest response + eos (no truncation on either side).

    Log-probs (``cfg.trl_fused_head("dpo")``): on CUDA, and with ``trl_logprobs="fused_head"``,
    the fused LM head DPOTrainer patches on (TRL 1.x's own path, Triton on CUDA over the completion
    tokens only); otherwise (the CPU default) :func:`_trl_selective_head` puts TRL <= 0.2x's path
    in its place — logits of the completion columns, ``selective_log_softmax`` and, for the
    metrics, the entropy / mean logit / top-1 from the same logits — because on the CPU the fused
    head's torch fallback scores every position (prompt and padding too) in
    ``[min(N, 4096), 32768]`` tiles: 15.7 s against 2.07 s a step at V=32768 (3.2 GiB against
    810 MiB extra peak) and 0.112 against 0.086 s at V=256, where its buffer is an untouched
    ~400 MiB the allocator peak counts (438 against 44 MiB; RSS 82 against 62 MiB), quiet machine,
    1 thread, 2026-12-06. Both paths give the same log-probs and metrics.

    The ``reference`` phase is the reference model's forward, timed by a wrapper around its
    ``forward``; ``update`` is the rest of the step.
    """

    def __init__(self, cfg: E2EConfig):
        import warnings

        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        self.cfg = cfg
        model, tok = build_model(cfg)
        ref = copy.deepcopy(model).requires_grad_(False)
        pairs = dpo_pairs(cfg, tok)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_dpo_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gradient_checkpointing's rename, bf16 / tokenizer notices
            args = DPOConfig(output_dir=self._tmp.name, per_device_train_batch_size=cfg.dpo_pairs, learning_rate=cfg.lr,
                             lr_scheduler_type="constant", beta=cfg.dpo_beta, loss_type=["sigmoid"],
                             max_length=cfg.dpo_max_len, gradient_checkpointing=False, bf16=False,
                             use_cpu=cfg.device == "cpu", report_to="none", save_strategy="no", seed=cfg.seed,
                             disable_tqdm=True, max_grad_norm=1.0)
            self.trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                                      train_dataset=Dataset.from_list(pairs))
        t = self.trainer
        self.fused_head = cfg.trl_fused_head("dpo")
        if not self.fused_head:
            _trl_selective_head(t.model, metrics=True)
            _trl_selective_head(t.ref_model, metrics=False)
        t.create_optimizer_and_scheduler(num_training_steps=cfg.steps + 3)
        t.current_gradient_accumulation_steps = 1
        # the columns Trainer's dataloader keeps (its signature columns), in dataset order
        keep = ("prompt_ids", "chosen_ids", "rejected_ids")
        self.examples = [{k: t.train_dataset[i][k] for k in keep} for i in range(len(t.train_dataset))]
        _check_dpo_rows(cfg, self.rows(), tok.eos_token_id, "TRL")
        self.tokens = float(sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                for e in self.examples))
        self._ref_s = [0.0]
        t.ref_model.forward = _timed_calls(t.ref_model.forward, self._ref_s, cfg.device)

    def rows(self) -> List[tuple]:
        """The step's pairs as token ids ``(prompt, chosen, rejected)``, in TRL's dataset order."""
        return [(tuple(e["prompt_ids"]), tuple(e["chosen_ids"]), tuple(e["rejected_ids"])) for e in self.examples]

    def step(self) -> Dict[str, float]:
        self._ref_s[0] = 0.0
        step, loss = _trl_optimizer_step(self, "_metrics")
        ref = self._ref_s[0]
        return dict(reference=ref, update=step - ref, step=step, tokens=self.tokens, loss=loss)


class RLHFFastDPOStep:
    """One optimizer step of ``rlhf_fast.trainers.dpo.DPOTrainer.train_step`` on the same model,
    pairs and settings: built with ``model=``, ``tokenizer=``, ``train_records=`` (the pairs, no
    eval split), ``batch_size`` = the number of pairs (every step trains on all of them, in the
    order of its seeded permutation), the reference a frozen copy of the initial policy, scored
    every step (``precompute_ref_logps`` false), fp32, grad_clip 1, loss_type sigmoid, the same
    beta, learning rate (constant) and max length; its own optimizer, the fused AdamW (weight
    decay 0) the other sides use too (``rlhf_fast.trainers.common.make_adamw``).

    ``loss_type="simpo"`` (the SimPO table's side, against :class:`TRLSimPOStep`): the same,
    reference-free — no reference model is built or run — with CPOConfig's defaults
    ``simpo_gamma`` 0.5 and ``cpo_alpha`` 1.0 (the chosen rows' token-mean NLL), on the pairs with
    a bos in front of each prompt (``dpo_pairs(bos=True)``). ``cfg.dpo_prefix_sharing``: with
    ``prefix_sharing`` (policy and reference score each pair's prompt once).

    The ``reference`` phase is the trainer's ``response_logps`` calls on its reference model
    (timed by a wrapper around ``rlhf_fast.trainers.dpo.response_logps``, set for the step only);
    ``update`` is the rest of ``train_step``.
    """

    def __init__(self, cfg: E2EConfig, loss_type: str = "sigmoid"):
        from rlhf_fast.feedback.formats import PairRecord
        from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer

        if loss_type not in ("sigmoid", "simpo"):
            raise ValueError(f"loss_type must be 'sigmoid' or 'simpo', got {loss_type!r}")
        self.cfg = cfg
        model, tok = build_model(cfg)
        pairs = dpo_pairs(cfg, tok, bos=loss_type == "simpo")
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_dpo_")
        # simpo: TRL's CPOConfig defaults (simpo_gamma 0.5, cpo_alpha 1.0), spelt out
        extra = dict(simpo_gamma=0.5, cpo_alpha=1.0) if loss_type == "simpo" else {}
        dcfg = DPOConfig(output_dir=self._tmp.name, max_len=cfg.dpo_max_len, batch_size=cfg.dpo_pairs, lr=cfg.lr,
                         weight_decay=0.0, warmup_steps=0, lr_schedule="constant", max_steps=cfg.steps + 3,
                         grad_clip=1.0, bf16=False, beta=cfg.dpo_beta, loss_type=loss_type, seed=cfg.seed,
                         device=cfg.device, prefix_sharing=cfg.dpo_prefix_sharing, **extra)
        self.trainer = DPOTrainer(dcfg, model=model, tokenizer=tok,
                                  train_records=[PairRecord(p["prompt"], p["chosen"], p["rejected"]) for p in pairs])
        tr = self.trainer
        _check_dpo_rows(cfg, self.rows(), tok.eos_token_id, "rlhf_fast")
        assert tr.optimizer.defaults.get("fused"), "DPOTrainer's optimizer is the fused AdamW"
        self.tokens = float(sum(2 * len(it["prompt"]) + len(it["chosen"]) + len(it["rejected"])
                                for it in tr.train_items))
        self._ref_s = [0.0]

    def rows(self) -> List[tuple]:
        """The step's pairs as token ids ``(prompt, chosen, rejected)``, in the trainer's order."""
        return [(tuple(it["prompt"]), tuple(it["chosen"]), tuple(it["rejected"])) for it in self.trainer.train_items]

    def step(self) -> Dict[str, float]:
        from rlhf_fast.trainers import dpo as dpo_mod

        tr, dev = self.trainer, self.cfg.device
        real = dpo_mod.response_logps
        timed = _timed_calls(real, self._ref_s, dev)
        self._ref_s[0] = 0.0
        if tr.reference is not None:  # reference-free (simpo): no reference call to time
            # (keywords: prefix_sharing's reference call passes one)
            dpo_mod.response_logps = lambda model, batch, **kw: (timed if model is tr.reference else real)(model, batch,
                                                                                                           **kw)
        try:
            _sync(dev)
            t0 = time.perf_counter()
            m = tr.train_step()
            _sync(dev)
            step = time.perf_counter() - t0
        finally:
            dpo_mod.response_logps = real
        ref = self._ref_s[0]
        self.last_metrics = m
        return dict(reference=ref, update=step - ref, step=step, tokens=self.tokens, loss=float(m["loss"]))


# --------------------------------------------------------------------------- KTO


def kto_examples(cfg: E2EConfig, tok) -> List[Dict[str, object]]:
    """The KTO step's examples, ``{"prompt", "completion", "label"}`` × ``2 · cfg.dpo_pairs``: the
    pairs of :func:`dpo_pairs` unpaired as TRL's ``unpair_preference_dataset`` and rlhf_fast's
    ``to_binary`` do it — every chosen response (desirable), then every rejected one (undesirable)."""
    pairs = dpo_pairs(cfg, tok)
    return ([{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
            + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs])


def kto_step_order(cfg: E2EConfig) -> List[int]:
    """The order in which rlhf_fast's KTOTrainer reads the :func:`kto_examples` in its step batch
    of all of them: its one seeded shuffle (``_StepBatches``, the same every epoch). TRL reads its
    dataset in order (KTO requires the sequential sampler), so the TRL side gets the examples in
    this order: the rotation by one that makes the KL rows then pairs the same partners on both."""
    from rlhf_fast.trainers.kto import _StepBatches

    n = 2 * cfg.dpo_pairs
    return list(_StepBatches(n, n, cfg.seed)._perm)


def _check_kto_rows(cfg: E2EConfig, rows: List[tuple], eos: int, side: str) -> None:
    """RuntimeError unless ``rows`` — ``(prompt, completion, KL completion, label)`` token ids in the
    step's order — are the :func:`kto_examples`: prompts of ``dpo_prompt_tokens`` tokens, the
    completions of the pairs' lengths ending in eos, half desirable, and each KL completion the
    previous example's completion (the first one the last one's: TRL's rotation)."""
    n, lo, hi = cfg.dpo_pairs, cfg.dpo_min_response, cfg.dpo_max_response
    want = sorted([lo + round((hi - lo) * i / max(1, n - 1)) + 1 for i in range(n)]
                  + [hi - round((hi - lo) * i / max(1, n - 1)) + 1 for i in range(n)])
    got = sorted(len(c) for _, c, _, _ in rows)
    ok = (got == want and all(len(p) == cfg.dpo_prompt_tokens and c[-1] == eos for p, c, _, _ in rows)
          and sum(bool(lab) for *_, lab in rows) == n
          and [k for _, _, k, _ in rows] == [rows[-1][1]] + [c for _, c, _, _ in rows[:-1]])
    if not ok:
        raise RuntimeError(f"{side}: the KTO examples tokenised to completion lengths {got} (expected {want}) or "
                           f"their KL completions are not the previous example's")


class TRLKTOStep:
    """One optimizer step of TRL 1.16's own ``trl.KTOTrainer`` (``loss_type="kto"``), built on an
    in-memory ``datasets.Dataset`` of :func:`kto_examples` (already unpaired, in
    :func:`kto_step_order`) with the benchmark's model, a copy of it as ``ref_model`` (TRL would
    load the reference from the model's hub id) and ``precompute_ref_log_probs=False`` (TRL's
    default: the reference forwards run every step); ``per_device_train_batch_size`` = every
    example, so one step trains on all of them and TRL's rotation of the completions runs over
    the whole step batch, as rlhf_fast's does.

    TRL's code: the dataset preparation (EOS appended, tokenisation, prompt / completion split,
    the KL completions: each example's KL row is its prompt with the previous example's completion,
    rotated by one within blocks of the per-device batch), ``DataCollatorForUnpairedPreference``
    (rows and KL rows, right padding), the fused LM head it patches onto both models (with the
    entropy and mean logit its metrics read), ``KTOTrainer.training_step`` → ``_compute_loss`` (the
    policy's no-grad forward on the KL rows, its forward on the example rows, the reference's
    forwards on both under no_grad, z0 = max(0, mean KL-row log-ratio), the KTO loss with
    ``desirable_weight`` = ``undesirable_weight`` = 1, every logged metric, the backward) and the
    optimizer and scheduler ``Trainer.create_optimizer_and_scheduler`` builds (``adamw_torch_fused``,
    weight decay 0). Written out, as for :class:`TRLDPOStep`: collate the step's examples,
    ``training_step``, ``_clip_grad_norm`` (max_grad_norm 1), optimizer / scheduler step,
    ``zero_grad``; left out: callbacks, the flop counters and the log call (its metric lists are
    cleared each step instead). Config differences from TRL's defaults, the same on both sides:
    ``gradient_checkpointing=False`` (TRL's default is True), fp32 (``bf16=False``), learning rate
    ``cfg.lr`` with a constant schedule, max_length = prompt + longest response + eos (nothing is
    truncated, KL rows included).

    Log-probs (``cfg.trl_fused_head("kto")``): on CUDA, and with ``trl_logprobs="fused_head"``,
    the fused LM head KTOTrainer patches on; otherwise (the CPU default) :func:`_trl_selective_head`
    with the entropy and mean logit, for the reason :class:`TRLDPOStep` gives. Both paths give the
    same log-probs and metrics.

    The ``reference`` phase is the reference model's forwards (example rows and KL rows), timed by
    a wrapper around its ``forward``; ``update`` is the rest of the step (the policy's KL-row
    forward included).
    """

    def __init__(self, cfg: E2EConfig):
        import warnings

        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        self.cfg = cfg
        model, tok = build_model(cfg)
        ref = copy.deepcopy(model).requires_grad_(False)
        examples = kto_examples(cfg, tok)
        data = [examples[i] for i in kto_step_order(cfg)]
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_kto_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = KTOConfig(output_dir=self._tmp.name, per_device_train_batch_size=len(data), learning_rate=cfg.lr,
                             lr_scheduler_type="constant", beta=cfg.dpo_beta, loss_type="kto",
                             desirable_weight=1.0, undesirable_weight=1.0, max_length=cfg.dpo_max_len,
                             gradient_checkpointing=False, bf16=False, use_cpu=cfg.device == "cpu",
                             report_to="none", save_strategy="no", seed=cfg.seed, disable_tqdm=True,
                             max_grad_norm=1.0)
            self.trainer = KTOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                                      train_dataset=Dataset.from_list(data))
        t = self.trainer
        self.fused_head = cfg.trl_fused_head("kto")
        if not self.fused_head:
            _trl_selective_head(t.model, metrics=True, outputs=("entropy", "mean_logits"))
            _trl_selective_head(t.ref_model, metrics=False)
        t.create_optimizer_and_scheduler(num_training_steps=cfg.steps + 3)
        t.current_gradient_accumulation_steps = 1
        # the columns Trainer's dataloader keeps (its signature columns), in dataset order
        keep = ("prompt_ids", "completion_ids", "KL_completion_ids", "label")
        self.examples = [{k: t.train_dataset[i][k] for k in keep} for i in range(len(t.train_dataset))]
        _check_kto_rows(cfg, self.rows(), tok.eos_token_id, "TRL")
        self.tokens = float(sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in self.examples))
        self._ref_s = [0.0]
        t.ref_model.forward = _timed_calls(t.ref_model.forward, self._ref_s, cfg.device)

    def rows(self) -> List[tuple]:
        """The step's examples as ``(prompt, completion, KL completion, label)`` token ids, in TRL's order."""
        return [(tuple(e["prompt_ids"]), tuple(e["completion_ids"]), tuple(e["KL_completion_ids"]), bool(e["label"]))
                for e in self.examples]

    def step(self) -> Dict[str, float]:
        self._ref_s[0] = 0.0
        step, loss = _trl_optimizer_step(self, "_metrics")
        ref = self._ref_s[0]
        return dict(reference=ref, update=step - ref, step=step, tokens=self.tokens, loss=loss)


class RLHFFastKTOStep:
    """One optimizer step of ``rlhf_fast.trainers.kto.KTOTrainer.train_step`` (``loss_type="kto"``)
    on the same model, examples and settings: built with ``model=``, ``tokenizer=``,
    ``train_records=`` (the :func:`kto_examples` as BinaryRecords, no eval split), ``batch_size`` =
    every example and ``grad_accum`` 1 (one step batch of all of them, in its seeded order, each
    example's KL row the previous one's completion after its prompt — what the TRL side is given),
    the reference a frozen copy of the initial policy scored every step (``precompute_ref_logps``
    false), λ_D = λ_U = 1, no annotator weights, fp32, grad_clip 1, the same beta, learning rate
    (constant) and max length; its own fused AdamW (weight decay 0).

    The ``reference`` phase is the reference model's ``response_logps`` call (its example rows and
    KL rows in one forward), timed as in :class:`RLHFFastDPOStep`; ``update`` is the rest of
    ``train_step`` (the policy's no-grad KL-row forward included).
    """

    def __init__(self, cfg: E2EConfig):
        from rlhf_fast.trainers.kto import BinaryRecord, KTOConfig, KTOTrainer

        self.cfg = cfg
        model, tok = build_model(cfg)
        examples = kto_examples(cfg, tok)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_kto_")
        kcfg = KTOConfig(output_dir=self._tmp.name, max_len=cfg.dpo_max_len, batch_size=len(examples), grad_accum=1,
                         lr=cfg.lr, weight_decay=0.0, warmup_steps=0, lr_schedule="constant",
                         max_steps=cfg.steps + 3, grad_clip=1.0, bf16=False, beta=cfg.dpo_beta, loss_type="kto",
                         desirable_weight=1.0, undesirable_weight=1.0, seed=cfg.seed, device=cfg.device)
        self.trainer = KTOTrainer(kcfg, model=model, tokenizer=tok,
                                  train_records=[BinaryRecord(e["prompt"], e["completion"], e["label"])
                                                 for e in examples])
        tr = self.trainer
        _check_kto_rows(cfg, self.rows(), tok.eos_token_id, "rlhf_fast")
        assert tr.optimizer.defaults.get("fused"), "KTOTrainer's optimizer is the fused AdamW"
        self.tokens = float(sum(len(it["prompt"]) + len(it["completion"]) for it in tr.train_items))
        self._ref_s = [0.0]

    def rows(self) -> List[tuple]:
        """The step's examples as ``(prompt, completion, KL completion, label)`` token ids, in the
        order of the trainer's step batch."""
        items = self.trainer.train_items
        return [(tuple(items[i]["prompt"]), tuple(items[i]["completion"]), tuple(items[i]["kl"]),
                 bool(items[i]["label"])) for i in self.trainer.batches._perm]

    def step(self) -> Dict[str, float]:
        from rlhf_fast.trainers import dpo as dpo_mod

        tr, dev = self.trainer, self.cfg.device
        # the reference's forward goes through dpo.reference_logps → dpo.response_logps; the
        # policy's (KL rows, example rows) through the name kto imported, which stays as it is
        real = dpo_mod.response_logps
        timed = _timed_calls(real, self._ref_s, dev)
        self._ref_s[0] = 0.0
        dpo_mod.response_logps = lambda model, batch: (timed if model is tr.reference else real)(model, batch)
        try:
            _sync(dev)
            t0 = time.perf_counter()
            m = tr.train_step()
            _sync(dev)
            step = time.perf_counter() - t0
        finally:
            dpo_mod.response_logps = real
        ref = self._ref_s[0]
        self.last_metrics = m
        return dict(reference=ref, update=step - ref, step=step, tokens=self.tokens, loss=float(m["loss"]))


# --------------------------------------------------------------------------- SimPO (reference-free)


class TRLSimPOStep:
    """One optimizer step of TRL 1.16's own ``trl.experimental.cpo.CPOTrainer`` with
    ``loss_type="simpo"`` (its defaults ``simpo_gamma`` 0.5 and ``cpo_alpha`` 1.0: CPO-SimPO, the
    SimPO loss on length-normalised log-probs plus the chosen rows' NLL), built on an in-memory
    ``datasets.Dataset`` of the :func:`dpo_pairs` with a bos in front of each prompt (CPOTrainer
    adds one to a prompt without; rlhf_fast reads it from the text), with the benchmark's model;
    reference-free, no reference model on either side.

    TRL's code: the dataset preparation (``tokenize_row``: prompt and answers tokenised, bos / eos
    added when missing, labels -100 over the prompt), ``DPODataCollatorWithPadding``,
    ``training_step`` → ``compute_loss`` → ``get_batch_loss_metrics`` (``concatenated_forward``: one
    forward on the chosen + rejected rows that returns the full ``[2B, T, V]`` logits of every
    position, the NLL as ``nn.CrossEntropyLoss`` on the chosen rows' logits, the token-mean
    log-probs by ``selective_log_softmax``; ``cpo_loss``; every stored metric; the backward) and
    the optimizer and scheduler ``Trainer.create_optimizer_and_scheduler`` builds
    (``adamw_torch_fused``, weight decay 0). CPOTrainer has no fused LM head and no
    ``logits_to_keep``: that is its only log-prob path, on the CPU and on CUDA, and it is kept as is
    (``trl_logprobs`` does not apply). Written out as for :class:`TRLDPOStep` (collate,
    ``training_step``, clip at 1, optimizer / scheduler step, ``zero_grad``; callbacks and the log
    call left out, its stored metrics cleared each step). Config differences from CPOConfig's
    defaults, the same on both sides: ``gradient_checkpointing=False`` (CPOConfig's default is
    True), fp32 (``bf16=False``; CPOConfig's default is True), learning rate ``cfg.lr`` (CPOConfig's
    is 1e-6) with a constant schedule, ``max_length`` = prompt + longest response + eos.

    The whole step is the update (no reference forward): the table has only the step column.
    """

    def __init__(self, cfg: E2EConfig):
        import warnings

        from datasets import Dataset

        self.cfg = cfg
        model, tok = build_model(cfg)
        pairs = dpo_pairs(cfg, tok, bos=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_simpo_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-module, gradient_checkpointing, bf16 notices
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            args = CPOConfig(output_dir=self._tmp.name, per_device_train_batch_size=cfg.dpo_pairs, learning_rate=cfg.lr,
                             lr_scheduler_type="constant", beta=cfg.dpo_beta, loss_type="simpo", simpo_gamma=0.5,
                             cpo_alpha=1.0, max_length=cfg.dpo_max_len, gradient_checkpointing=False, bf16=False,
                             use_cpu=cfg.device == "cpu", report_to="none", save_strategy="no", seed=cfg.seed,
                             disable_tqdm=True, max_grad_norm=1.0)
            self.trainer = CPOTrainer(model=model, args=args, processing_class=tok,
                                      train_dataset=Dataset.from_list(pairs))
        t = self.trainer
        t.create_optimizer_and_scheduler(num_training_steps=cfg.steps + 3)
        t.current_gradient_accumulation_steps = 1
        # every column: CPOTrainer turns remove_unused_columns off for its collator
        self.examples = [dict(t.train_dataset[i]) for i in range(len(t.train_dataset))]
        _check_dpo_rows(cfg, self.rows(), tok.eos_token_id, "TRL")
        self.tokens = float(sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in self.examples))

    def rows(self) -> List[tuple]:
        """The step's pairs as token ids ``(prompt, chosen, rejected)``, in TRL's dataset order."""
        out = []
        for e in self.examples:
            p = list(e["prompt_input_ids"])
            c, r = list(e["chosen_input_ids"]), list(e["rejected_input_ids"])
            if c[:len(p)] != p or r[:len(p)] != p:
                raise RuntimeError("TRL: a chosen or rejected row does not start with its prompt")
            out.append((tuple(p), tuple(c[len(p):]), tuple(r[len(p):])))
        return out

    def step(self) -> Dict[str, float]:
        step, loss = _trl_optimizer_step(self, "_stored_metrics")
        return dict(step=step, tokens=self.tokens, loss=loss)


# --------------------------------------------------------------------------- on-policy distillation


def _trl_ready_to_step(trainer, cfg: E2EConfig) -> List[float]:
    """Ready a TRL trainer built on transformers' Trainer for :func:`_trl_optimizer_step`: its optimizer and
    scheduler (``create_optimizer_and_scheduler``, for the run's steps), gradient accumulation 1, train mode;
    its model's ``generate`` timed. Returns the one-element list the generate calls' seconds add to."""
    trainer.create_optimizer_and_scheduler(num_training_steps=cfg.steps + 3)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    gen_s = [0.0]
    trainer.model.generate = _timed_calls(trainer.model.generate, gen_s, cfg.device)
    return gen_s


class TRLDistillStep:
    """One optimizer step of TRL 1.16's own ``trl.DistillationTrainer`` (on-policy distillation:
    the student generates, the teacher scores the same tokens, generalised JSD with ``beta``),
    built on an in-memory ``datasets.Dataset`` of :func:`distill_prompts` with the benchmark's
    student and :func:`build_teacher`'s teacher.

    TRL's code: ``training_step`` → ``_prepare_inputs`` → ``_generate_and_score_completions``
    (tokenisation, ``model.generate`` with its GenerationConfig: ``temperature``, ``top_p`` 1,
    ``max_completion_length``; padding; the completion-length metrics) → ``compute_loss``
    (student and teacher backbones on the prompt + completion, ``_chunked_divergence_loss``: TRL's
    ``ChunkedDivergenceFunction``, whose backward recomputes both models' logits; the entropy
    metric) → backward, and the optimizer and scheduler ``create_optimizer_and_scheduler`` builds
    (``adamw_torch_fused``, weight decay 0). Written out as for :class:`TRLDPOStep` (identity
    collator, ``training_step``, clip at 1, optimizer / scheduler step, ``zero_grad``). Config
    differences from DistillationConfig's defaults, the same on both sides:
    ``gradient_checkpointing=False`` (its default is True), fp32 (``bf16=False``), learning rate
    ``cfg.lr`` (its default is 1e-6) with a constant schedule.

    Phases: ``generate`` (the student's ``generate`` calls) and ``update`` (the rest: the
    teacher's forward under no_grad, the student forward + backward, the loss, the optimizer;
    rlhf_fast runs the teacher per micro-batch inside its update too).
    """

    # the metric TRL's trainer logs the mean completion length under (tokens/s)
    length_metric = "completions/mean_length"

    @staticmethod
    def _example(prompt: str) -> Dict[str, object]:
        """TRL's dataset record of ``prompt``."""
        return {"prompt": prompt}

    def _trl_trainer(self, teacher, tok) -> tuple:
        """``(config class, trainer class, the config keys of this algorithm)`` of TRL's side, called
        with the teacher and the tokenizer before the trainer is built."""
        from trl import DistillationConfig, DistillationTrainer

        return DistillationConfig, DistillationTrainer, {"beta": self.cfg.distill_beta}

    def __init__(self, cfg: E2EConfig):
        import warnings

        from datasets import Dataset

        self.cfg = cfg
        model, tok = build_model(cfg)
        teacher = build_teacher(cfg, tok)
        self.examples = [self._example(p) for p in distill_prompts(cfg)]
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_distill_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-module, gradient_checkpointing's rename, bf16 notices
            config_cls, trainer_cls, algo_args = self._trl_trainer(teacher, tok)
            args = config_cls(
                output_dir=self._tmp.name, per_device_train_batch_size=len(self.examples), learning_rate=cfg.lr,
                lr_scheduler_type="constant", temperature=cfg.temperature,
                max_completion_length=cfg.max_new_tokens, gradient_checkpointing=False, bf16=False,
                use_cpu=cfg.device == "cpu", report_to="none", save_strategy="no", seed=cfg.seed, disable_tqdm=True,
                max_grad_norm=1.0, **algo_args)
            self.trainer = trainer_cls(model=model, teacher_model=teacher, args=args, processing_class=tok,
                                       train_dataset=Dataset.from_list(self.examples))
        self._gen_s = _trl_ready_to_step(self.trainer, cfg)

    def step(self) -> Dict[str, float]:
        self._gen_s[0] = 0.0
        step, loss = _trl_optimizer_step(self, "_metrics")
        gen = self._gen_s[0]
        tokens = float(self.last_metrics.get(self.length_metric, 0.0)) * len(self.examples)
        return dict(generate=gen, update=max(0.0, step - gen), step=step, tokens=tokens, loss=loss)


class RLHFFastDistillStep:
    """rlhf_fast's ``DistillationTrainer.step()`` on the same student, teacher, prompts and
    configuration: ``estimator: distill``, one epoch and one mini-batch of the whole rollout (TRL's
    one optimizer step per generation), grad clipping at 1, the same learning rate."""

    def __init__(self, cfg: E2EConfig):
        from rlhf_fast.trainers.distill import DistillationTrainer
        from rlhf_fast.trainers.rl_config import DataConfig, DistillConfig

        self.cfg = cfg
        model, tok = build_model(cfg)
        teacher = build_teacher(cfg, tok)
        rl_cfg = self._rl_config("distill", DataConfig(prompts=list(PROMPTS), shuffle=False),
                                 distill=self._distill_config(DistillConfig))
        # (the prompts= argument, not data.prompts, is what the trainer reads)
        self.trainer = DistillationTrainer(rl_cfg, model, tok, teacher_model=teacher, prompts=self._prompts())

    def _rl_config(self, estimator: str, data, ppo_keys=None, **section):
        """``estimator``'s RLConfig in this comparison's settings (one epoch and one mini-batch of
        the whole rollout, grad clipping at 1, ``cfg.lr``), with ``data``, the ppo keys
        ``ppo_keys`` and the estimator's ``section`` (``distill=…``, ``sdft=…``) on top."""
        from rlhf_fast.trainers.rl_config import OptimConfig, PPOConfig, RLConfig, RolloutConfig

        cfg, B = self.cfg, self.cfg.batch_size
        return RLConfig(
            estimator=estimator, steps=cfg.steps + 3, seed=cfg.seed, device=cfg.device, progress=False, sample_every=0,
            data=data,
            rollout=RolloutConfig(prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
            ppo=PPOConfig(epochs=1, mini_batch_size=B, micro_batch_size=B, max_grad_norm=1.0, **(ppo_keys or {})),
            optim=OptimConfig(lr=cfg.lr), **section,
        )

    @staticmethod
    def _prompts() -> list:
        """The trainer's prompts (PROMPTS, read in order)."""
        return list(PROMPTS)

    def _distill_config(self, config_cls):
        """The ``distill`` section: the generalised JSD with ``distill_beta``."""
        return config_cls(beta=self.cfg.distill_beta)

    # the step metrics holding the loss and the mean answer length (tokens/s)
    loss_key, length_key = "loss", "completions/mean_length"

    def step(self) -> Dict[str, float]:
        m, step = _timed_step(self.trainer, self.cfg.device)
        gen = m.get("time/generate", 0.0)
        tokens = float(m.get(self.length_key, 0.0)) * self.cfg.batch_size
        return dict(generate=gen, update=max(0.0, step - gen), step=step, tokens=tokens, loss=float(m[self.loss_key]))


class TRLIWOPDStep(TRLDistillStep):
    """One optimizer step of TRL 1.16's experimental ``trl.experimental.iw_opd.IWOPDTrainer``
    (Importance-Weighted On-Policy Distillation, ``distillation_objective`` "iw_opd", its default:
    the sampled-token policy gradient with the teacher's minus the sampler's log-prob as advantage,
    each answer's prefix weights with ``iw_opd_gamma`` 0.5), driven as :class:`TRLDistillStep` (the
    trainer is a fork of DistillationTrainer). Its own path kept as is: the student's and the
    teacher's full ``[B, T, V]`` logits over prompt + completion, ``log_softmax``; without vLLM the
    sampler's log-probs are the student's own (TRL's ``rollout_logprobs=None`` fallback: equal here,
    one optimizer step per generation, no sampling filter). Config differences from IWOPDConfig's
    defaults, beyond :class:`TRLDistillStep`'s: ``top_p`` 1 (its default 0.95; rlhf_fast's rollout
    samples without a filter)."""

    length_metric = "completions/on_policy_mean_length"  # IWOPDTrainer's name for it

    @staticmethod
    def _example(prompt: str) -> Dict[str, object]:
        # IWOPDTrainer's collator reads chat records only (the tokenizer's chat template renders them; so does
        # rlhf_fast's side, RLHFFastIWOPDStep._prompts)
        return {"messages": [{"role": "user", "content": prompt}]}

    def _trl_trainer(self, teacher, tok) -> tuple:
        import os

        from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer

        # IWOPDTrainer checks the teacher's tokenizer, loaded from the teacher's model id: the shared one, saved
        d = os.path.join(self._tmp.name, "teacher")
        tok.save_pretrained(d)
        teacher.config._name_or_path = d

        return IWOPDConfig, IWOPDTrainer, {"distillation_objective": "iw_opd", "top_p": 1.0}


class RLHFFastIWOPDStep(RLHFFastDistillStep):
    """rlhf_fast's ``DistillationTrainer.step()`` with ``distill.objective: iw_opd`` (its
    ``iw_opd_gamma`` / ``iw_opd_epsilon`` at TRL's defaults) in :class:`RLHFFastDistillStep`'s
    configuration."""

    @staticmethod
    def _prompts() -> list:
        """PROMPTS as one-message chats, as TRL's side reads them (:meth:`TRLIWOPDStep._example`)."""
        return [[{"role": "user", "content": p}] for p in PROMPTS]

    def _distill_config(self, config_cls):
        return config_cls(objective="iw_opd")


# --------------------------------------------------------------------------- self-distillation (SDFT)


def self_distill_records() -> List[Dict[str, str]]:
    """PROMPTS as self-distillation records ``{"prompt", "privileged_context"}``: each prompt's context
    a demonstration of digits (the teacher reads it between the prompt and the student's answer)."""
    return [{"prompt": p, "privileged_context": "answer: " + " ".join(str((i + k) % 10) for k in range(8))}
            for i, p in enumerate(PROMPTS)]


def self_distill_step_records(cfg: E2EConfig, step: int) -> List[Dict[str, str]]:
    """The records of self-distillation step ``step`` (0-based, the warm-up included): the prompts
    rlhf_fast's trainer reads (:func:`online_dpo_prompts`), each ``group_size`` times in a row (TRL's
    RepeatSampler order)."""
    by_prompt = {r["prompt"]: r for r in self_distill_records()}
    return [by_prompt[p] for p in online_dpo_prompts(cfg, step) for _ in range(cfg.group_size)]


def _saved_initial_policy(model, folder: str) -> None:
    """Save ``model`` to ``folder`` and name it there (``config._name_or_path``): TRL's self-distillation
    trainers build their ``base`` / ``ema`` teacher from the student's model id (``create_model_from_path``),
    so the teacher gets the initial policy's weights, as rlhf_fast's copy of it."""
    model.save_pretrained(folder)
    model.config._name_or_path = folder


class TRLSDFTStep:
    """One optimizer step of TRL 1.16's experimental ``trl.experimental.sdft.SDFTTrainer``
    (self-distillation fine-tuning: the student answers each prompt, the teacher — the initial
    student, ``teacher_model_kind`` "base", its default — reads the answer after the prompt and
    its privileged context; top-k divergence), built on an in-memory ``datasets.Dataset`` of
    :func:`self_distill_records` with the benchmark's model. TRL builds a base teacher from the
    student's model id (``create_model_from_path``), so the initial student is saved to a
    temporary folder its config names: the teacher gets the same weights as rlhf_fast's copy.

    TRL's code: ``training_step`` → ``_prepare_inputs`` → ``sample_rollouts`` (tokenisation,
    ``model.generate`` with its GenerationConfig: ``temperature``, ``top_p`` 1, ``top_k`` 0,
    ``max_completion_length``; padding; no rollout log-probs: one optimizer step per generation) →
    the teacher prompts (``DemonstrationTeacherContextBuilder``) → ``compute_loss`` (the student's
    and the teacher's ``logits_to_keep`` forwards, ``[B, C, V]`` logits each,
    ``compute_topk_self_distillation_loss`` with ``distillation_topk`` 100 and
    ``distillation_alpha`` 0.5, its defaults) → backward; the optimizer and scheduler of
    ``create_optimizer_and_scheduler`` (``adamw_torch_fused``, weight decay 0). Written out as for
    :class:`TRLDistillStep`. Each step reads the records of :func:`self_distill_step_records`, as
    rlhf_fast's side. Config differences from SDFTConfig's defaults, the same on both sides:
    ``gradient_checkpointing=False``, fp32, learning rate ``cfg.lr`` with a constant schedule,
    ``num_generations`` = ``group_size``, ``max_completion_length`` = ``max_new_tokens``.

    Phases: ``generate`` (the student's ``generate`` call) and ``update`` (the rest: the teacher
    prompts, the teacher's forward under no_grad, the student forward + backward, the loss, the
    optimizer)."""

    length_metric = TRLDistillStep.length_metric

    def _trl_trainer(self) -> tuple:
        """``(config class, trainer class, config keys, trainer keywords, dataset records)`` of TRL's
        side, imported inside :meth:`__init__`'s silenced warnings."""
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        return SDFTConfig, SDFTTrainer, {}, {}, self_distill_records()

    def __init__(self, cfg: E2EConfig):
        import os
        import warnings

        from datasets import Dataset

        self.cfg, self.pos = cfg, 0
        model, tok = build_model(cfg)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_self_distill_")
        _saved_initial_policy(model, os.path.join(self._tmp.name, "initial_student"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-module, gradient_checkpointing, bf16 notices
            config_cls, trainer_cls, algo_args, trainer_kw, records = self._trl_trainer()
            args = config_cls(
                output_dir=self._tmp.name, per_device_train_batch_size=cfg.batch_size, num_generations=cfg.group_size,
                learning_rate=cfg.lr, lr_scheduler_type="constant", temperature=cfg.temperature,
                max_completion_length=cfg.max_new_tokens, gradient_checkpointing=False, bf16=False,
                use_cpu=cfg.device == "cpu", report_to="none", save_strategy="no", seed=cfg.seed, disable_tqdm=True,
                max_grad_norm=1.0, shuffle_dataset=False, **algo_args)
            self.trainer = trainer_cls(model=model, args=args, processing_class=tok,
                                       train_dataset=Dataset.from_list(records), **trainer_kw)
        self._gen_s = _trl_ready_to_step(self.trainer, cfg)

    def step(self) -> Dict[str, float]:
        self.examples = self_distill_step_records(self.cfg, self.pos)
        self.pos += 1
        return TRLDistillStep.step(self)


class RLHFFastSDFTStep(RLHFFastDistillStep):
    """rlhf_fast's ``SDFTTrainer.step()`` (``estimator: sdft``, ``sdft`` at its defaults, TRL's:
    teacher ``base``, ``topk_logits`` with top-k 100, alpha 0.5) on the same model, records
    (:func:`self_distill_records`, read in order) and settings: one epoch and one mini-batch of the
    whole rollout (TRL's one optimizer step per generation: no rollout log-probs, no importance
    weight, as TRL), grad clipping at 1, the same learning rate (constant), fp32."""

    def __init__(self, cfg: E2EConfig):
        from rlhf_fast.trainers.rl_config import DataConfig, SDFTConfig
        from rlhf_fast.trainers.sdft import SDFTTrainer

        self.cfg = cfg
        model, tok = build_model(cfg)
        rl_cfg = self._rl_config("sdft", DataConfig(shuffle=False), sdft=SDFTConfig())
        self.trainer = SDFTTrainer(rl_cfg, model, tok, prompts=self_distill_records())


class TRLSDPOStep(TRLSDFTStep):
    """One optimizer step of TRL 1.16's experimental ``trl.experimental.sdpo.SDPOTrainer``
    (Self-Distillation Policy Optimization: GRPO's rollout and rewards, then each answer distilled
    from the teacher reading the prompt reprompted with a successful answer of its group), built on
    an in-memory ``datasets.Dataset`` of PROMPTS with the benchmark's model and the digit reward. Its
    defaults kept: ``distillation_weight`` 1 (the self-distillation loss alone), ``sampled_token``
    reverse KL, teacher ``ema`` (rate 0.05, built from the initial policy saved to disk,
    :func:`_saved_initial_policy`). ``success_reward_threshold`` 0 on both sides (its default 1 asks
    for an all-digit answer, which the untrained model never gives: no answer would be reprompted
    and the loss would be 0): every answer is reprompted with the first other answer of its group,
    so the teacher's path runs in full every step.

    TRL's code: ``training_step`` → ``_prepare_inputs`` → ``sample_rollouts`` (``model.generate``;
    no rollout log-probs: one optimizer step per generation) → the rewards, group advantages and
    ``SuccessfulRolloutTeacherContextBuilder.build`` → ``compute_loss`` (the student's and the
    teacher's ``logits_to_keep`` forwards, ``[B, C, V]`` logits each,
    ``compute_sampled_token_self_distillation_loss``) → backward; the optimizer and scheduler of
    ``create_optimizer_and_scheduler``; then the EMA teacher update, its ``SyncTeacherModelCallback``'s
    ``on_step_end`` (Trainer's loop calls it after each optimizer step; timed in ``update``, as
    rlhf_fast's EMA update is). Written out as for :class:`TRLSDFTStep`, each step reading the prompts
    of :func:`online_dpo_prompts` ``group_size`` times, as rlhf_fast's side."""

    def _trl_trainer(self) -> tuple:
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        return (SDPOConfig, SDPOTrainer, {"success_reward_threshold": 0.0}, {"reward_funcs": [_trl_digit_reward]},
                [{"prompt": p} for p in PROMPTS])

    def step(self) -> Dict[str, float]:
        from trl.experimental.sdpo.teacher_sync import SyncTeacherModelCallback

        t, dev = self.trainer, self.cfg.device
        G = self.cfg.group_size
        self.examples = [{"prompt": p} for p in online_dpo_prompts(self.cfg, self.pos) for _ in range(G)]
        self.pos += 1
        rec = TRLDistillStep.step(self)
        _sync(dev)
        t0 = time.perf_counter()
        syncs = [c for c in t.callback_handler.callbacks if isinstance(c, SyncTeacherModelCallback)]
        for c in syncs:
            c.on_step_end(t.args, t.state, t.control, model=t.model)
        _sync(dev)
        self.teacher_syncs = getattr(self, "teacher_syncs", 0) + len(syncs)
        dt = time.perf_counter() - t0
        return dict(rec, update=rec["update"] + dt, step=rec["step"] + dt)


class RLHFFastSDPOStep(RLHFFastDistillStep):
    """rlhf_fast's ``SDPOTrainer.step()`` (``estimator: sdpo``, ``sdpo`` at its defaults, TRL's, but
    ``success_reward_threshold`` 0 as :class:`TRLSDPOStep`) on the same model, prompts (read in order),
    digit reward and settings: one epoch and one mini-batch of the whole rollout, ``ppo.old_logp``
    behaviour (the sampler's log-probs: TRL computes none with one optimizer step per generation, and
    its importance clip is then 1, as ours on the first pass), grad clipping at 1, the same learning rate
    (constant), fp32."""

    loss_key, length_key = "policy/loss", "response_length/mean"  # (the RL trainer's names)

    def __init__(self, cfg: E2EConfig):
        from rlhf_fast.trainers.rl_config import DataConfig, SDPOConfig
        from rlhf_fast.trainers.sdpo import SDPOTrainer

        self.cfg = cfg
        model, tok = build_model(cfg)
        rl_cfg = self._rl_config("sdpo", DataConfig(prompts=list(PROMPTS), shuffle=False),
                                 ppo_keys={"old_logp": "behaviour"}, sdpo=SDPOConfig(success_reward_threshold=0.0))
        self.trainer = SDPOTrainer(rl_cfg, model, tok, reward_fns=[digit_reward], prompts=list(PROMPTS))


# the sides of the experimental distillation comparisons: (TRL's runner, rlhf_fast's runner), each from an E2EConfig
SELF_DISTILL_SIDES = {"sdft": (TRLSDFTStep, RLHFFastSDFTStep), "sdpo": (TRLSDPOStep, RLHFFastSDPOStep),
                      "iw_opd": (TRLIWOPDStep, RLHFFastIWOPDStep)}


# --------------------------------------------------------------------------- online DPO


def online_dpo_prompts(cfg: E2EConfig, step: int) -> List[str]:
    """The prompts of online DPO step ``step`` (0-based, the warm-up included): the next
    ``prompts_per_step`` of PROMPTS in order, as rlhf_fast's trainer reads them (``data.shuffle``
    off); each is answered twice on both sides."""
    k = cfg.prompts_per_step
    return [PROMPTS[(step * k + i) % len(PROMPTS)] for i in range(k)]


def _check_online_dpo_rollout(cfg: E2EConfig, rows: int, width: int, side: str) -> None:
    """RuntimeError unless a step generated ``2 · prompts_per_step`` answers (``rows``) whose
    longest (``width``, the generated columns) is within ``max_new_tokens``: the work both sides
    must do."""
    if rows != 2 * cfg.prompts_per_step or not 0 < width <= cfg.max_new_tokens:
        raise RuntimeError(f"{side}: the online DPO step generated {rows} answers of up to {width} tokens, expected "
                           f"{2 * cfg.prompts_per_step} (2 per prompt) of up to {cfg.max_new_tokens}")


def _trl_digit_reward(prompts, completions, **kwargs) -> List[float]:
    """:func:`digit_reward` as a TRL reward function (TRL passes completion_ids, trainer_state, … too)."""
    return digit_reward(prompts, completions)


class TRLOnlineDPOStep:
    """One optimizer step of TRL 1.16's own ``trl.experimental.online_dpo.OnlineDPOTrainer``
    (``reward_funcs=[digit_reward]``, loss_type sigmoid, ``beta`` = ``cfg.dpo_beta``), built on an
    in-memory ``datasets.Dataset`` of the prompts with the benchmark's model; the reference is
    TRL's own ``create_reference_model`` copy (``ref_model=None``).

    TRL's code: ``training_step`` → ``_generate`` (left-padded tokenisation, each prompt twice,
    ``model.generate`` with its GenerationConfig: ``temperature``, ``top_k`` 0, ``top_p`` 1,
    ``max_new_tokens``; ``truncate_right`` after the first eos) → ``_forward`` of the policy (full
    ``[2N, T, V]`` logits, ``log_softmax``, the completion tokens' log-probs; its only log-prob
    path, kept as is) and of the reference under no_grad → the rewards
    (``_calculate_rewards_from_functions``), the chosen / rejected split, the sigmoid loss, every
    logged statistic, the backward; the optimizer and scheduler ``create_optimizer_and_scheduler``
    builds (``adamw_torch_fused``, weight decay 0). Written out as for :class:`TRLDPOStep`
    (collate the step's prompts, ``training_step``, clip at 1, optimizer / scheduler step,
    ``zero_grad``; its ``stats`` lists cleared each step). Each step gets the next
    ``prompts_per_step`` prompts (:func:`online_dpo_prompts`), as rlhf_fast's side reads them.
    Config differences from OnlineDPOConfig's defaults, the same on both sides:
    ``gradient_checkpointing=False`` (its default is True), fp32 (``bf16=False``), learning rate
    ``cfg.lr`` (its default 5e-7) with a constant schedule, ``temperature`` ``cfg.temperature`` (its
    default 0.9), ``max_new_tokens`` ``cfg.max_new_tokens`` (its default 64).

    Phases: ``generate`` (the policy's ``generate`` call), ``logprobs`` (the reference's
    ``_forward``) and ``update`` (the rest: the policy's forward, rewards, loss, backward, optimizer).
    """

    def __init__(self, cfg: E2EConfig):
        import warnings

        from datasets import Dataset

        self.cfg = cfg
        model, tok = build_model(cfg)
        self.pos = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_online_dpo_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-module, gradient_checkpointing, bf16 notices
            from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

            args = OnlineDPOConfig(
                output_dir=self._tmp.name, per_device_train_batch_size=cfg.prompts_per_step, learning_rate=cfg.lr,
                lr_scheduler_type="constant", beta=cfg.dpo_beta, loss_type="sigmoid", temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens, gradient_checkpointing=False, bf16=False,
                use_cpu=cfg.device == "cpu", report_to="none", save_strategy="no", seed=cfg.seed, disable_tqdm=True,
                max_grad_norm=1.0)
            self.trainer = OnlineDPOTrainer(model=model, ref_model=None, reward_funcs=[_trl_digit_reward], args=args,
                                            processing_class=tok,
                                            train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
        t = self.trainer
        t.create_optimizer_and_scheduler(num_training_steps=cfg.steps + 3)
        t.current_gradient_accumulation_steps = 1
        self._gen_s, self._ref_s = [0.0], [0.0]
        self.generated: Optional[torch.Tensor] = None  # the last step's completion columns [2N, C]
        generate = _timed_calls(t.model.generate, self._gen_s, cfg.device)

        def recording_generate(*a, input_ids, **kw):
            out = generate(*a, input_ids=input_ids, **kw)
            self.generated = out[:, input_ids.shape[1]:]
            return out

        t.model.generate = recording_generate
        forward, timed = t._forward, _timed_calls(t._forward, self._ref_s, cfg.device)
        t._forward = lambda model, *a, **kw: (timed if model is t.ref_model else forward)(model, *a, **kw)

    def step(self) -> Dict[str, float]:
        from trl.experimental.utils import truncate_right

        self.examples = [{"prompt": p} for p in online_dpo_prompts(self.cfg, self.pos)]
        self.pos += 1
        self._gen_s[0] = self._ref_s[0] = 0.0
        step, loss = _trl_optimizer_step(self, "stats", split=None)
        gen, ref, comp = self._gen_s[0], self._ref_s[0], self.generated
        _check_online_dpo_rollout(self.cfg, comp.shape[0], comp.shape[1], "TRL")
        # each answer's own tokens, eos included (TRL's completion mask)
        tokens = float(truncate_right(comp, self.trainer.eos_token_ids, self.trainer._tokenizer.pad_token_id)[1].sum())
        return dict(generate=gen, logprobs=ref, update=max(0.0, step - gen - ref), step=step, tokens=tokens, loss=loss)


class RLHFFastOnlineDPOStep:
    """rlhf_fast's ``OnlineDPOTrainer.step()`` (``estimator: online_dpo``) on the same model, prompts
    (:func:`online_dpo_prompts`), reward function and settings: ``rollout.group_size`` 2, one epoch and
    one mini-batch of the whole rollout (TRL's one optimizer step per generation), ``online_dpo.beta``
    ``cfg.dpo_beta``, loss_type sigmoid, grad clipping at 1, the same learning rate (constant), fp32.
    Phases from the trainer's own timers: ``generate``, ``logprobs`` (the reference's log-probs of the
    answers) and ``update`` (the rest of the step)."""

    def __init__(self, cfg: E2EConfig):
        from rlhf_fast.trainers.online_dpo import OnlineDPOTrainer
        from rlhf_fast.trainers.rl_config import (DataConfig, OnlineDPOConfig, OptimConfig, PPOConfig, RLConfig,
                                                  RolloutConfig)

        self.cfg = cfg
        model, tok = build_model(cfg)
        B = 2 * cfg.prompts_per_step
        rl_cfg = RLConfig(
            estimator="online_dpo", steps=cfg.steps + 3, seed=cfg.seed, device=cfg.device, progress=False,
            sample_every=0, data=DataConfig(prompts=list(PROMPTS), shuffle=False),
            rollout=RolloutConfig(prompts_per_step=cfg.prompts_per_step, group_size=2,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
            ppo=PPOConfig(epochs=1, mini_batch_size=B, micro_batch_size=B, max_grad_norm=1.0),
            optim=OptimConfig(lr=cfg.lr), online_dpo=OnlineDPOConfig(beta=cfg.dpo_beta, loss_type="sigmoid"),
        )
        self.trainer = tr = OnlineDPOTrainer(rl_cfg, model, tok, reward_fns=[digit_reward], prompts=list(PROMPTS))
        self.generated = (0, 0)  # the last step's (answers, generated columns)
        generate = tr._generate

        def recording_generate(*a, **kw):
            out = generate(*a, **kw)
            ids = out[0].input_ids
            self.generated = (ids.shape[0], ids.shape[1] - out[0].prompt_length)
            return out

        tr._generate = recording_generate

    def step(self) -> Dict[str, float]:
        m, step = _timed_step(self.trainer, self.cfg.device)
        _check_online_dpo_rollout(self.cfg, *self.generated, "rlhf_fast")
        gen, lp = m.get("time/generate", 0.0), m.get("time/logprobs", 0.0)
        tokens = float(m.get("response_length/mean", 0.0)) * self.generated[0]
        self.last_metrics = m
        return dict(generate=gen, logprobs=lp, update=max(0.0, step - gen - lp), step=step, tokens=tokens,
                    loss=float(m["loss"]))


# --------------------------------------------------------------------------- SFT and reward model


def sft_records(cfg: E2EConfig, tok) -> List[Dict[str, str]]:
    """The SFT step's prompt–completion records, ``{"prompt", "completion"}`` × ``2 · cfg.dpo_pairs``:
    every :func:`dpo_pairs` prompt with its chosen, then with its rejected response (the rows a DPO
    step's policy forward sees: prompts of ``dpo_prompt_tokens`` tokens, completions of
    [dpo_min_response, dpo_max_response] single-token words, so both sides' tokenisations agree)."""
    pairs = dpo_pairs(cfg, tok)
    return [{"prompt": p["prompt"], "completion": p[k]} for k in ("chosen", "rejected") for p in pairs]


def _check_sft_rows(cfg: E2EConfig, rows: List[tuple], eos: int, side: str) -> None:
    """RuntimeError unless ``rows`` — ``(prompt, completion)`` token ids, the completion being the
    tokens that train — are the :func:`sft_records`: every record kept, prompts of
    ``dpo_prompt_tokens`` tokens, completions of the pairs' lengths ending in eos."""
    n, lo, hi = cfg.dpo_pairs, cfg.dpo_min_response, cfg.dpo_max_response
    want = sorted([lo + round((hi - lo) * i / max(1, n - 1)) + 1 for i in range(n)]
                  + [hi - round((hi - lo) * i / max(1, n - 1)) + 1 for i in range(n)])
    got = sorted(len(c) for _, c in rows)
    if got != want or any(len(p) != cfg.dpo_prompt_tokens or c[-1] != eos for p, c in rows):
        raise RuntimeError(f"{side}: the SFT records tokenised to completion lengths {got} (expected {want}, after "
                           f"prompts of {cfg.dpo_prompt_tokens} tokens, eos last)")


def build_reward_model(cfg: E2EConfig, tok):
    """The reward model both sides train: a sequence-classification model (one label) of the
    policy's family and shape (:func:`build_model`'s sizes) from a config, same seed — the same
    backbone and score-head weights on both sides."""
    from rlhf_fast.models.tiny import tiny_reward_model

    model = tiny_reward_model(len(tok), family=cfg.family, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                              num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                              intermediate_size=cfg.intermediate_size, seed=cfg.seed, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return model.to(cfg.device)


def _load_tokenizer(cfg: E2EConfig):
    """The benchmark's tokenizer alone (:func:`build_model`'s, without building a policy)."""
    if cfg.tokenizer_dir is not None:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(cfg.tokenizer_dir)
    return build_tokenizer(cfg)


def _timed_train_step(runner) -> Tuple[Dict[str, float], float]:
    """``(metrics, wall seconds)`` of one ``runner.trainer.train_step()`` (an rlhf_fast offline trainer),
    its GPU work included; the metrics also go to ``runner.last_metrics``."""
    dev = runner.cfg.device
    _sync(dev)
    t0 = time.perf_counter()
    m = runner.trainer.train_step()
    _sync(dev)
    runner.last_metrics = m
    return m, time.perf_counter() - t0


class TRLSFTStep:
    """One optimizer step of TRL 1.16's own ``trl.SFTTrainer`` on the :func:`sft_records` (an
    in-memory ``datasets.Dataset`` of prompt–completion records) with the benchmark's model;
    ``per_device_train_batch_size`` = every record, so one step trains on all of them.

    TRL's code: the dataset preparation (EOS appended to the completion, prompt + completion
    tokenised and split at the common prefix with the prompt's tokens, labels -100 over the prompt:
    ``completion_only_loss``, TRL's default for prompt–completion data), ``DataCollatorForLanguageModeling``
    (right padding; with ``padding_free`` one flattened row with position ids and cu_seq_lens),
    ``SFTTrainer.training_step`` → ``compute_loss`` (the fused LM head it patches on, the NLL summed over
    the completion tokens ÷ ``num_items_in_batch``, entropy and token-accuracy metrics, the backward), and
    the optimizer and scheduler ``Trainer.create_optimizer_and_scheduler`` builds (``adamw_torch_fused``,
    weight decay 0). Written out as for :class:`TRLDPOStep`, with ``num_items_in_batch`` counted by
    ``Trainer._get_num_items_in_batch`` as its loop does (the batch's completion tokens: the loss is the
    token mean over the whole batch, as rlhf_fast's). Config differences from SFTConfig's defaults, the
    same on both sides: ``gradient_checkpointing=False`` (its default is True), fp32 (``bf16=False``),
    learning rate ``cfg.lr`` (its default 2e-5) with a constant schedule, ``max_length`` = prompt +
    longest completion + eos (nothing is truncated).

    ``cfg.sft_packing``: TRL's ``padding_free=True`` (the batch flattened into one row whose attention
    transformers keeps inside each sequence from the position ids; with sdpa on the CPU too) against
    rlhf_fast's ``packing: true``; TRL refuses ``padding_free`` without packing unless ``max_length`` is
    None, which changes nothing here (no row is cut).

    Log-probs (``cfg.trl_fused_head("sft")``): on CUDA, and with ``trl_logprobs="fused_head"``, the fused
    LM head SFTTrainer patches on; otherwise (the CPU default) :func:`_trl_selective_head` with the
    entropy and top-1 flags its metrics read, for the reason :class:`TRLDPOStep` gives. Both give the same
    loss and metrics. The step is one phase (no reference, no generation).
    """

    def __init__(self, cfg: E2EConfig):
        import warnings

        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        self.cfg, packing = cfg, cfg.sft_packing
        model, tok = build_model(cfg)
        records = sft_records(cfg, tok)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_sft_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gradient_checkpointing's rename, bf16 / padding-free notices
            args = SFTConfig(output_dir=self._tmp.name, per_device_train_batch_size=len(records), learning_rate=cfg.lr,
                             lr_scheduler_type="constant", max_length=None if packing else cfg.dpo_max_len,
                             padding_free=packing, packing=False, gradient_checkpointing=False, bf16=False,
                             use_cpu=cfg.device == "cpu", report_to="none", save_strategy="no", seed=cfg.seed,
                             disable_tqdm=True, max_grad_norm=1.0)
            self.trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                                      train_dataset=Dataset.from_list(records))
        t = self.trainer
        if not t.completion_only_loss:
            raise RuntimeError("TRL: SFTTrainer does not train on the completion only (completion_only_loss)")
        self.fused_head = cfg.trl_fused_head("sft")
        if not self.fused_head:
            _trl_selective_head(t.model, metrics=True, outputs=("entropy", "is_top1"))
        t.create_optimizer_and_scheduler(num_training_steps=cfg.steps + 3)
        t.current_gradient_accumulation_steps = 1
        # the columns Trainer's dataloader keeps (its signature columns), in dataset order
        self.examples = [{k: t.train_dataset[i][k] for k in ("input_ids", "labels")}
                         for i in range(len(t.train_dataset))]
        _check_sft_rows(cfg, self.rows(), tok.eos_token_id, "TRL")
        self.tokens = float(sum(len(e["input_ids"]) for e in self.examples))

    def rows(self) -> List[tuple]:
        """The step's records as ``(prompt, completion)`` token ids (the completion: the labelled
        tokens), in TRL's dataset order."""
        out = []
        for e in self.examples:
            first = next(i for i, lab in enumerate(e["labels"]) if lab != -100)
            if any(lab == -100 for lab in e["labels"][first:]):
                raise RuntimeError("TRL: an SFT row's labelled tokens are not one completion at its end")
            out.append((tuple(e["input_ids"][:first]), tuple(e["input_ids"][first:])))
        return out

    def step(self) -> Dict[str, float]:
        step, loss = _trl_optimizer_step(self, "_metrics", num_items_in_batch=True)
        return dict(step=step, tokens=self.tokens, loss=loss)


class RLHFFastSFTStep:
    """One optimizer step of ``rlhf_fast.trainers.sft.SFTTrainer.train_step`` on the same model,
    records and settings: built with ``model=``, ``tokenizer=``, ``train_records=`` (the
    :func:`sft_records` as SFTRecords, no eval split), ``batch_size`` = every record (one step trains on
    all of them), the loss on the completion tokens (``completion_only_loss``, the default) as their
    token mean over the batch, ``loss_type`` nll, fp32, grad_clip 1, the same learning rate (constant,
    no warm-up) and max length; its own fused AdamW (weight decay 0). ``cfg.sft_packing``: ``packing:
    true`` (bfd: the micro-batch as one row, attention per sequence)."""

    def __init__(self, cfg: E2EConfig):
        from rlhf_fast.feedback.formats import SFTRecord
        from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

        self.cfg = cfg
        model, tok = build_model(cfg)
        records = sft_records(cfg, tok)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_sft_")
        scfg = SFTConfig(output_dir=self._tmp.name, max_len=cfg.dpo_max_len, batch_size=len(records), grad_accum=1,
                         lr=cfg.lr, weight_decay=0.0, warmup_steps=0, lr_schedule="constant", max_steps=cfg.steps + 3,
                         grad_clip=1.0, bf16=False, gradient_checkpointing=False, packing=cfg.sft_packing,
                         completion_only_loss=True, loss_type="nll", eval_fraction=0.0, seed=cfg.seed,
                         device=cfg.device)
        self.trainer = tr = SFTTrainer(scfg, model=model, tokenizer=tok,
                                       train_records=[SFTRecord(r["prompt"], r["completion"]) for r in records],
                                       eval_records=[])
        _check_sft_rows(cfg, self.rows(), tok.eos_token_id, "rlhf_fast")
        assert tr.optimizer.defaults.get("fused"), "SFTTrainer's optimizer is the fused AdamW"
        self.tokens = float(sum(len(r["input_ids"]) for r in tr.train_rows))

    def rows(self) -> List[tuple]:
        """The step's records as ``(prompt, completion)`` token ids, in the trainer's row order."""
        out = []
        for r in self.trainer.train_rows:
            first = r["response_mask"].index(1)
            out.append((tuple(r["input_ids"][:first]), tuple(r["input_ids"][first:])))
        return out

    def step(self) -> Dict[str, float]:
        m, step = _timed_train_step(self)
        return dict(step=step, tokens=self.tokens, loss=float(m["loss"]))


class TRLRewardStep:
    """One optimizer step of TRL 1.16's own ``trl.RewardTrainer`` (pairwise Bradley–Terry:
    −log σ(r_chosen − r_rejected), the mean over the pairs) on the :func:`dpo_pairs` (an in-memory
    ``datasets.Dataset`` of ``{prompt, chosen, rejected}`` records, no margin) with
    :func:`build_reward_model`'s model; ``per_device_train_batch_size`` = every pair.

    TRL's code: the dataset preparation (EOS appended to each response, prompt + response tokenised
    as one text), ``DataCollatorForPreference`` (chosen rows then rejected rows, right padding),
    ``RewardTrainer.training_step`` → ``compute_loss`` (the sequence-classification forward on the 2B
    rows — the score head on every position, read at each row's last non-pad token —, the loss, its
    reward / accuracy / margin metrics, the backward), and the optimizer and scheduler
    ``create_optimizer_and_scheduler`` builds (``adamw_torch_fused``, weight decay 0). Written out as
    for :class:`TRLDPOStep`. Config differences from RewardConfig's defaults, the same on both sides:
    ``gradient_checkpointing=False`` (its default is True), fp32 (``bf16=False``), learning rate
    ``cfg.lr`` with a constant schedule, ``max_length`` = prompt + longest response + eos (nothing is
    dropped); ``disable_dropout`` stays on (both sides' default). The step is one phase.
    """

    def __init__(self, cfg: E2EConfig):
        import warnings

        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        self.cfg = cfg
        tok = _load_tokenizer(cfg)
        model = build_reward_model(cfg, tok)
        pairs = dpo_pairs(cfg, tok)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_trl_reward_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = RewardConfig(output_dir=self._tmp.name, per_device_train_batch_size=len(pairs),
                                learning_rate=cfg.lr, lr_scheduler_type="constant", max_length=cfg.dpo_max_len,
                                gradient_checkpointing=False, bf16=False, use_cpu=cfg.device == "cpu",
                                report_to="none", save_strategy="no", seed=cfg.seed, disable_tqdm=True,
                                max_grad_norm=1.0, center_rewards_coefficient=None)
            self.trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                                         train_dataset=Dataset.from_list(pairs))
        t = self.trainer
        t.create_optimizer_and_scheduler(num_training_steps=cfg.steps + 3)
        t.current_gradient_accumulation_steps = 1
        self.examples = [{k: t.train_dataset[i][k] for k in ("chosen_ids", "rejected_ids")}
                         for i in range(len(t.train_dataset))]
        self._prompt_tokens = cfg.dpo_prompt_tokens
        _check_dpo_rows(cfg, self.rows(), tok.eos_token_id, "TRL")
        self.tokens = float(sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in self.examples))

    def rows(self) -> List[tuple]:
        """The step's pairs as token ids ``(prompt, chosen, rejected)``, in TRL's dataset order (the
        prompt: the ``dpo_prompt_tokens`` tokens both rows start with, checked)."""
        return _split_reward_rows([(e["chosen_ids"], e["rejected_ids"]) for e in self.examples],
                                  self._prompt_tokens, "TRL")

    def step(self) -> Dict[str, float]:
        step, loss = _trl_optimizer_step(self, "_metrics")
        return dict(step=step, tokens=self.tokens, loss=loss)


def _split_reward_rows(rows: List[tuple], prompt_tokens: int, side: str) -> List[tuple]:
    """``(prompt, chosen, rejected)`` from whole ``(chosen, rejected)`` rows that share their first
    ``prompt_tokens`` ids (RuntimeError otherwise)."""
    out = []
    for c, r in rows:
        c, r = tuple(c), tuple(r)
        if c[:prompt_tokens] != r[:prompt_tokens]:
            raise RuntimeError(f"{side}: a pair's chosen and rejected rows do not start with the same prompt")
        out.append((c[:prompt_tokens], c[prompt_tokens:], r[prompt_tokens:]))
    return out


class RLHFFastRewardStep:
    """One optimizer step of ``rlhf_fast.trainers.reward.RewardTrainer.train_step`` (``data_kind``
    pairs: Bradley–Terry, the mean over the pairs, no margin, no label smoothing, no annotator weights)
    on the same pairs and :func:`build_reward_model`'s model: ``batch_size`` = every pair, fp32,
    grad_clip 1, the same learning rate (constant, no warm-up) and max length, ``disable_dropout`` on;
    its own fused AdamW (weight decay 0). Its scores: the backbone's last hidden state
    (``rlhf_fast.models.loading.reward_scores``) and the score head at each row's last token."""

    def __init__(self, cfg: E2EConfig):
        from rlhf_fast.feedback.formats import PairRecord
        from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer

        self.cfg = cfg
        tok = _load_tokenizer(cfg)
        model = build_reward_model(cfg, tok)
        pairs = dpo_pairs(cfg, tok)
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_reward_")
        rcfg = RewardConfig(output_dir=self._tmp.name, data_kind="pairs", max_len=cfg.dpo_max_len,
                            batch_size=len(pairs), grad_accum=1, lr=cfg.lr, weight_decay=0.0, warmup_steps=0,
                            lr_schedule="constant", max_steps=cfg.steps + 3, grad_clip=1.0, bf16=False,
                            gradient_checkpointing=False, label_smoothing=0.0, center_rewards_coefficient=None,
                            disable_dropout=True, eval_fraction=0.0, seed=cfg.seed, device=cfg.device)
        self.trainer = tr = RewardTrainer(rcfg, model=model, tokenizer=tok,
                                          train_records=[PairRecord(p["prompt"], p["chosen"], p["rejected"])
                                                         for p in pairs], eval_records=[])
        _check_dpo_rows(cfg, self.rows(), tok.eos_token_id, "rlhf_fast")
        assert tr.optimizer.defaults.get("fused"), "RewardTrainer's optimizer is the fused AdamW"
        self.tokens = float(sum(len(s) for it in tr.train_items for s in it["seqs"]))

    def rows(self) -> List[tuple]:
        """The step's pairs as token ids ``(prompt, chosen, rejected)``, in the trainer's order."""
        return _split_reward_rows([tuple(it["seqs"]) for it in self.trainer.train_items], self.cfg.dpo_prompt_tokens,
                                  "rlhf_fast")

    def step(self) -> Dict[str, float]:
        m, step = _timed_train_step(self)
        return dict(step=step, tokens=self.tokens, loss=float(m["loss"]))


# the sides of each SFT / reward comparison: (TRL's runner, rlhf_fast's runner), each built from an E2EConfig
OFFLINE_SIDES = {"sft": (TRLSFTStep, RLHFFastSFTStep), "reward": (TRLRewardStep, RLHFFastRewardStep)}


def _trained_params(runner) -> Dict[str, torch.Tensor]:
    """A runner's model parameters by name (detached; TRL's selective head leaves the names as they are)."""
    return {n: p.detach() for n, p in runner.trainer.model.named_parameters()}


def check_same_step(algo: str, cfg: E2EConfig, *, trl_overrides: Optional[Dict] = None,
                    ours_overrides: Optional[Dict] = None, steps: int = 2, rel: float = 1e-4,
                    weight_rel: float = 1e-2) -> Dict[str, object]:
    """The correctness check of the SFT and reward tables: both sides (``algo`` ``"sft"`` — padding-free
    with ``cfg.sft_packing`` — or ``"reward"``) built in this process from ``cfg`` —
    with ``trl_overrides`` / ``ours_overrides``, E2EConfig fields set on one side only (a planted
    difference, for the tests) — must start from the same weights and token rows, give the same loss at
    each of ``steps`` optimizer steps (rel ``rel``; the second step's loss is computed on the updated
    weights), and end with close weights: ‖W_ours − W_trl‖ ≤ ``weight_rel`` · ‖W_trl − W_0‖ over all
    parameters (the difference of the updates against the update itself, which rounding noise in the
    Adam step's sign of tiny gradients keeps from being exact). Returns ``{"losses": [(trl, ours), ...],
    "weight_diff": that ratio}``; RuntimeError naming the first difference otherwise."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if algo not in OFFLINE_SIDES:
        raise ValueError(f"algo must be one of {tuple(OFFLINE_SIDES)}, got {algo!r}")
    make_trl, make_ours = OFFLINE_SIDES[algo]
    torch.manual_seed(cfg.seed)
    trl_side = make_trl(replace(cfg, **(trl_overrides or {})))
    ours = make_ours(replace(cfg, **(ours_overrides or {})))
    if sorted(trl_side.rows()) != sorted(ours.rows()):
        raise RuntimeError(f"{algo}: the two sides train on different token rows")
    w0, w_trl = _trained_params(ours), _trained_params(trl_side)
    w0 = {n: p.clone() for n, p in w0.items()}
    if w0.keys() != w_trl.keys():
        raise RuntimeError(f"{algo}: the two models have different parameters: {sorted(w0.keys() ^ w_trl.keys())}")
    bad = [n for n in w0 if not torch.equal(w0[n], w_trl[n])]
    if bad:
        raise RuntimeError(f"{algo}: the two sides start from different weights ({bad[:3]})")
    losses = []
    for i in range(steps):
        a, b = trl_side.step()["loss"], ours.step()["loss"]
        losses.append((a, b))
        if not abs(a - b) <= rel * max(abs(a), abs(b)):
            raise RuntimeError(f"{algo}: step {i + 1}'s loss differs: TRL {a:.8g}, rlhf_fast {b:.8g} "
                               f"(rel {abs(a - b) / max(abs(a), abs(b), 1e-30):.2e} > {rel:g})")
    w_ours, w_trl = _trained_params(ours), _trained_params(trl_side)
    diff = sum(float((w_ours[n] - w_trl[n]).double().pow(2).sum()) for n in w0) ** 0.5
    moved = sum(float((w_trl[n] - w0[n]).double().pow(2).sum()) for n in w0) ** 0.5
    ratio = diff / max(moved, 1e-30)
    if not ratio <= weight_rel:
        raise RuntimeError(f"{algo}: the weights after {steps} step(s) differ: |W_ours - W_trl| = {diff:.3g}, "
                           f"{ratio:.3g}× TRL's update |W_trl - W_0| = {moved:.3g} (> {weight_rel:g})")
    return {"losses": losses, "weight_diff": ratio}


# --------------------------------------------------------------------------- harness


def measure(framework: str, algo: str, cfg: E2EConfig) -> Dict[str, object]:
    """Run one side in this process: warm-up, ``cfg.steps`` timed steps (median per phase,
    tokens/s), then one more step for the extra peak memory above what the step starts with
    (bytes; None where not measurable): on CUDA the caching allocator's peak; on the CPU the
    torch allocator's peak from the profiler's allocation events, and, as ``extra_rss_bytes``,
    the peak RSS of one more step with glibc made to return freed memory at once
    (:func:`common.tighten_malloc`, which slows allocation, so only after the timed steps)."""
    torch.manual_seed(cfg.seed)
    cuda = cfg.device == "cuda"
    if cuda:  # both sides: fp32 weights, TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if algo == "dpo":
        runner = (TRLDPOStep if framework == "trl" else RLHFFastDPOStep)(cfg)
    elif algo == "kto":
        runner = (TRLKTOStep if framework == "trl" else RLHFFastKTOStep)(cfg)
    elif algo == "simpo":
        runner = TRLSimPOStep(cfg) if framework == "trl" else RLHFFastDPOStep(cfg, loss_type="simpo")
    elif algo == "distill":
        runner = (TRLDistillStep if framework == "trl" else RLHFFastDistillStep)(cfg)
    elif algo == "online_dpo":
        runner = (TRLOnlineDPOStep if framework == "trl" else RLHFFastOnlineDPOStep)(cfg)
    elif algo in SELF_DISTILL_SIDES:
        runner = SELF_DISTILL_SIDES[algo][0 if framework == "trl" else 1](cfg)
    elif algo in OFFLINE_SIDES:
        runner = OFFLINE_SIDES[algo][0 if framework == "trl" else 1](cfg)
    else:
        maker: Callable = TRLStep if framework == "trl" else RLHFFastStep
        runner = maker(cfg, algo)
    runner.step()  # warm-up
    recs = [runner.step() for _ in range(cfg.steps)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.step()
        peak = max(0, torch.cuda.max_memory_allocated() - before)
        rss = None
    else:
        # the torch allocator's peak (the CPU counterpart of max_memory_allocated), then the
        # peak RSS of one more step, which also counts non-tensor memory the step touches
        peak = profiler_extra_peak_bytes(runner.step)
        rss = rss_extra_peak_bytes_here(runner.step) if tighten_malloc() else None
    med = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
    med["tokens_per_s"] = statistics.median(r["tokens"] / r["step"] for r in recs)
    med["extra_peak_bytes"] = peak
    med["extra_rss_bytes"] = rss
    med["rss_bytes"] = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return med


def _subprocess(framework: str, algo: str, cfg: E2EConfig, timeout_s: float) -> Dict[str, object]:
    # the allocator as users have it: measure() tightens it only for its memory step
    cmd = [sys.executable, "-m", "rlhf_fast.benchmarks.e2e", "--framework", framework, "--algo", algo,
           "--config", json.dumps(asdict(cfg)), "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        tail = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(tail[-1] if tail else f"exit code {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _progress_line(algo: str, framework: str, run: Optional[Dict[str, object]], error: Optional[str],
                   wall_s: float) -> str:
    """One line per finished subprocess: its step and phase times, or its error."""
    head = f"e2e {algo} {framework} ({wall_s:.0f} s in the subprocess):"
    if run is None:
        return f"{head} failed: {error}"
    phases = " ".join(f"{p} {run[p]:.3f}" for p in ALGO_PHASES[algo] if run.get(p) is not None)
    tps = run.get("tokens_per_s")
    return f"{head} step {run['step']:.3f} s" + (f" ({phases})" if phases else "") + \
        (f", {tps:.0f} tokens/s" if tps else "")


def _median_runs(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Per-key median over repeated subprocess runs (None where any run has None)."""
    out: Dict[str, object] = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = None if any(v is None for v in vals) else statistics.median(vals)
    return out


def _check_algos(algos) -> tuple:
    if isinstance(algos, str):
        algos = [a.strip() for a in algos.split(",") if a.strip()]
    algos = tuple(algos)
    bad = [a for a in algos if a not in ALL_ALGOS]
    if not algos or bad:
        raise ValueError(f"algos must be a non-empty selection of {ALL_ALGOS}, got {algos!r}")
    return tuple(a for a in ALL_ALGOS if a in algos)  # table order, no duplicates


def run_suite(device: str = "cpu", quick: bool = False, cfg: Optional[E2EConfig] = None,
              timeout_s: float = 600.0, repeats: int = 1, algos=ALGOS,
              overrides: Optional[Dict[str, object]] = None) -> List[Table]:
    """PPO, GRPO and DPO steps (and, when asked for, KTO, SimPO, distillation, online DPO, SFT, the
    reward model, SDFT, SDPO and IW-OPD: :func:`run_sft_table`, :func:`run_reward_table`, :func:`run_sdft_table`,
    :func:`run_sdpo_table`, :func:`run_iw_opd_table`),
    rlhf_fast vs TRL, per configuration — ``cfg`` if given, else the quick one, else the tiny model
    with its 256-token vocabulary and again with a real-sized one (:meth:`E2EConfig.large_vocab`): a
    table of the RL algorithms (PPO / GRPO) and one each of DPO, KTO, SimPO, distillation and online
    DPO, each only when ``algos`` (a subset
    of :data:`ALL_ALGOS`, or "ppo,dpo"-style text; default :data:`ALGOS`) holds them.

    ``repeats``: fresh subprocesses per (algo, framework), run alternately TRL / rlhf_fast so
    both sides see the same machine load; every column is the median over them. ``overrides``:
    E2EConfig fields set on every configuration (``--dpo-prefix-sharing``, ``--dpo-prompt-tokens``).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' needs a CUDA GPU, and torch sees none")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    algos = _check_algos(algos)
    cfgs = suite_configs(device, quick, cfg, overrides)
    if not (any(c.rl_prompt_tokens for c in cfgs) and any(a in RL_ALGOS for a in algos)):
        return [t for c in cfgs for t in run_config(c, timeout_s=timeout_s, repeats=repeats, algos=algos)]
    # rl_prompt_tokens shorter than a prompt under one configuration's tokenizer (prompts tokenise to
    # more tokens at V=32768 than at V=256) is refused before any configuration runs: each tokenizer is
    # trained here once and handed to run_config
    with tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_tok_") as d:
        ready = []
        for i, c in enumerate(cfgs):
            if c.tokenizer_dir is None:
                build_tokenizer(c).save_pretrained(f"{d}/{i}")
                c = replace(c, tokenizer_dir=f"{d}/{i}")
            check_rl_prompt_tokens(c)
            ready.append(c)
        return [t for c in ready for t in run_config(c, timeout_s=timeout_s, repeats=repeats, algos=algos)]


def suite_configs(device: str = "cpu", quick: bool = False, cfg: Optional[E2EConfig] = None,
                  overrides: Optional[Dict[str, object]] = None) -> List[E2EConfig]:
    """The configurations :func:`run_suite` runs: ``cfg`` if given, else on CUDA
    :meth:`E2EConfig.gpu_0p5b`, else the quick one or the tiny model with V=256 and V=32768;
    ``overrides`` set on each."""
    if cfg is not None:
        cfgs = [cfg]
    elif device == "cuda":
        cfgs = [E2EConfig.gpu_0p5b(quick=quick)]
    else:
        cfgs = [E2EConfig.quick()] if quick else [E2EConfig(), E2EConfig.large_vocab()]
    return [replace(c, **overrides) for c in cfgs] if overrides else cfgs


def check_rl_prompt_tokens(cfg: E2EConfig) -> None:
    """ValueError naming ``rl_prompt_tokens`` when a prompt of :data:`PROMPTS` is longer than that under
    ``cfg``'s tokenizer (:func:`rl_prompts`; trained here unless ``cfg.tokenizer_dir`` holds it)."""
    if cfg.rl_prompt_tokens:
        rl_prompts(cfg, _load_tokenizer(cfg))



def _with_tokenizer(table_fn: Callable) -> Callable:
    """``table_fn(cfg, ...)`` with ``cfg.tokenizer_dir`` set: the tokenizer trained once here,
    saved to a temporary folder every subprocess loads, unless the config already names one."""
    @functools.wraps(table_fn)
    def wrapped(cfg: E2EConfig, *args, **kwargs):
        if cfg.tokenizer_dir is not None:
            return table_fn(cfg, *args, **kwargs)
        with tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_tok_") as d:
            build_tokenizer(cfg).save_pretrained(d)
            return table_fn(replace(cfg, tokenizer_dir=d), *args, **kwargs)

    return wrapped


def _where(cfg: E2EConfig) -> str:
    """What the table ran on: the GPU's name, or the CPU thread count."""
    return torch.cuda.get_device_name() if cfg.device == "cuda" else f"{torch.get_num_threads()} CPU threads"


def run_config(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1, algos=ALGOS) -> List[Table]:
    """One configuration's tables (:func:`run_table` for PPO / GRPO, :func:`run_dpo_table`,
    :func:`run_kto_table`, :func:`run_simpo_table`, :func:`run_distill_table`,
    :func:`run_online_dpo_table`), the tokenizer trained once for all of their
    subprocesses (after ``algos`` is checked: a wrong name costs no training)."""
    return _with_tokenizer(_config_tables)(cfg, timeout_s, repeats, _check_algos(algos))


def _config_tables(cfg: E2EConfig, timeout_s: float, repeats: int, algos) -> List[Table]:
    rl = tuple(a for a in algos if a in RL_ALGOS)
    tables = [run_table(cfg, timeout_s=timeout_s, repeats=repeats, algos=rl)] if rl else []
    if "dpo" in algos:
        tables.append(run_dpo_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "kto" in algos:
        tables.append(run_kto_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "simpo" in algos:
        tables.append(run_simpo_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "distill" in algos:
        tables.append(run_distill_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "online_dpo" in algos:
        tables.append(run_online_dpo_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "sdft" in algos:
        tables.append(run_sdft_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "sdpo" in algos:
        tables.append(run_sdpo_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "iw_opd" in algos:
        tables.append(run_iw_opd_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "sft" in algos:
        tables.append(run_sft_table(cfg, timeout_s=timeout_s, repeats=repeats))
    if "reward" in algos:
        tables.append(run_reward_table(cfg, timeout_s=timeout_s, repeats=repeats))
    return tables


def _mem_ratio(trl: Dict[str, object], ours: Dict[str, object], key: str) -> Optional[str]:
    """TRL's extra memory ÷ ours as ``"1.23×"`` (ours floored at 4 KiB), or None."""
    a, b = trl.get(key), ours.get(key)
    return None if a is None or b is None else f"{a / max(b, 4096):.2f}×"


def _memory_note(cfg: E2EConfig) -> str:
    if cfg.device == "cuda":
        return ("CUDA: each side's step and phases are timed between torch.cuda.synchronize() calls (rlhf_fast's "
                "phase split from its trainer's own timers, made to synchronise for the benchmark); extra_peak = "
                "torch.cuda.max_memory_allocated above the allocation before the step")
    return ("extra_peak = the torch allocator's peak during one more step above what was allocated before it "
            "(the profiler's allocation events: the CPU counterpart of torch.cuda.max_memory_allocated); "
            "extra_rss = peak RSS of one more step above the RSS before it, with glibc returning freed memory "
            "at once (set after the timed steps, which run on the default allocator): it also counts the "
            "non-tensor memory the step touches (Python objects, heap pages re-touched after the trim)")


def _add_algo_rows(table: Table, algo: str, cfg: E2EConfig, timeout_s: float, repeats: int,
                   phases: tuple, trl_name: str, label: Optional[str] = None) -> None:
    """Run ``algo`` ``repeats`` times per side (alternating, fresh subprocesses) and append its
    TRL row, rlhf_fast row and TRL ÷ rlhf_fast row to ``table`` (phase columns ``<phase>_s``);
    ``label``: the rows' ``algo`` column (default ``algo``), where one table has two variants."""
    label = algo if label is None else label
    runs: Dict[str, List[Dict[str, object]]] = {"trl": [], "rlhf_fast": []}
    errors: Dict[str, str] = {}
    for _ in range(repeats):
        for fw in ("trl", "rlhf_fast"):
            if fw in errors:
                continue
            t0 = time.perf_counter()
            try:
                runs[fw].append(_subprocess(fw, algo, cfg, timeout_s))
            except Exception as e:
                errors[fw] = str(e)[:200]
            print(_progress_line(algo, fw, runs[fw][-1] if fw not in errors else None, errors.get(fw),
                                 time.perf_counter() - t0), file=sys.stderr, flush=True)
    got = {}
    for fw in ("trl", "rlhf_fast"):
        row = dict(algo=label, framework=fw if fw == "rlhf_fast" else trl_name)
        if fw in errors:
            if fw == "rlhf_fast":  # our own step failing is the suite's failure (exit 1), a peer's is a note
                row["error"] = f"rlhf_fast side failed: {errors[fw]}"
                if "error" not in table.columns:
                    table.columns.append("error")
            else:
                row["note"] = f"TRL side failed: {errors[fw]}"
            table.rows.append(row)
            continue
        r = got[fw] = _median_runs(runs[fw])
        row.update({f"{p}_s": r[p] for p in phases}, step_s=r["step"], tokens_per_s=r["tokens_per_s"],
                   extra_peak=fmt_bytes(r["extra_peak_bytes"]), extra_peak_bytes=r["extra_peak_bytes"],
                   extra_rss=fmt_bytes(r.get("extra_rss_bytes")), extra_rss_bytes=r.get("extra_rss_bytes"))
        if r.get("loss") is not None:
            row["loss"] = r["loss"]
        table.rows.append(row)
    if len(got) == 2:
        a, b = got["trl"], got["rlhf_fast"]
        ratio = {f"{p}_s": (a[p] / b[p] if b[p] > 0 else None) for p in phases}
        mem, rss = (_mem_ratio(a, b, k) for k in ("extra_peak_bytes", "extra_rss_bytes"))
        table.rows.append(dict(algo=label, framework="TRL ÷ rlhf_fast", step_s=a["step"] / b["step"],
                               tokens_per_s=b["tokens_per_s"] / a["tokens_per_s"] if a["tokens_per_s"] else None,
                               extra_peak=mem, extra_rss=rss,
                               note="time ratios > 1: rlhf_fast faster; tokens/s ratio rlhf_fast ÷ TRL", **ratio))


def _step_table(cfg: E2EConfig, title: str, phases: tuple, sides: List[Tuple[str, str]], timeout_s: float,
                repeats: int, *, what: str, timing: str = "", notes: Sequence[str] = ()) -> Table:
    """The table every e2e comparison shares: ``title`` (the step and its data) followed by the
    model's shape, where it ran and the repeats; a phase column per ``phases``; the rows of each
    ``(algo, TRL side's name)`` in ``sides``; then the notes: ``what`` the step does, the timing
    method (with ``timing`` appended), the memory method, and ``notes``."""
    table = Table(
        f"{title}, h={cfg.hidden_size}, {cfg.num_layers} layers, V={cfg.vocab_size}), {_where(cfg)}, "
        f"median of {repeats} subprocess run(s) × {cfg.steps} step(s)",
        ["algo", "framework", *(f"{p}_s" for p in phases), "step_s", "tokens_per_s", "extra_peak", "extra_rss",
         "note"],
    )
    # what a row means beyond the title: every setting of the step, the same on both sides (the
    # tokenizer's temporary folder left out), in the results JSON
    conf = {k: v for k, v in asdict(cfg).items() if k != "tokenizer_dir"}
    conf.update(batch_size=cfg.batch_size, dtype="float32", tf32_matmuls=cfg.device == "cuda",
                gradient_checkpointing=False)
    table.meta.update(config=conf, repeats=repeats)
    for algo, trl_name in sides:
        _add_algo_rows(table, algo, cfg, timeout_s, repeats, phases, trl_name)
    table.notes += [what, "median over timed steps after one warm-up; each framework in a fresh subprocess" + timing,
                    _memory_note(cfg), *notes]
    return table


# the tokens/s note of the pair tables (DPO, SimPO)
_PAIR_TOKENS = ("; tokens/s = the step's non-padding tokens (prompt + response of every chosen and rejected row) ÷ "
                "step time")


@_with_tokenizer
def run_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1, algos=RL_ALGOS) -> Table:
    """One configuration's RL table (``algos`` among PPO and GRPO): a row per (algo, framework)
    and a TRL ÷ rlhf_fast ratio row.

    The tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it, and loaded by every
    subprocess; each finished subprocess prints one progress line to stderr, so a run cut short
    still shows its rows."""
    algos = _check_algos(algos)
    if any(a not in RL_ALGOS for a in algos):
        raise ValueError(f"run_table runs {RL_ALGOS}; DPO has its own table (run_dpo_table), got {algos!r}")
    check_rl_prompt_tokens(cfg)  # before the subprocesses, each of which would fail on it
    return _step_table(
        cfg, f"one RL step on a {cfg.family} model from a config (B={cfg.batch_size}, ≤{cfg.max_new_tokens} new tokens"
        + (f", prompts of {cfg.rl_prompt_tokens} tokens" if cfg.rl_prompt_tokens else ""),
        PHASES, [(algo, "TRL-equivalent (trl utils)") for algo in algos], timeout_s, repeats,
        what="phases: generate; logprobs = policy + reference log-probs (+ critic values for PPO); "
        "reward_adv = rewards and advantages; update = epochs × mini-batches of forward, backward, optimiser",
        notes=[
            "TRL side: TRL 1.x has no PPOTrainer; the step is TRL's GRPO / last-PPO algorithm written with TRL's "
            "utilities and HF generate (see rlhf_fast/benchmarks/e2e.py); log-probs: "
            f"PPO {'TRL 1.x fused LM head' if cfg.trl_fused_head('ppo') else 'selective_log_softmax'}, "
            f"GRPO {'TRL 1.x fused LM head (add_fused_lm_head, entropy in the loss forward, as GRPOTrainer)' if cfg.trl_fused_head('grpo') else 'selective_log_softmax (TRL 1.x GRPOTrainer fuses the LM head, whose CPU fallback was slower and heavier here; trl_logprobs=fused_head)'} "
            "on a logits_to_keep forward; fused AdamW with weight decay 0 (transformers' Trainer default) on both "
            "sides; TRL's shortcuts kept (PPO: rollout log-probs from the generation scores; GRPO, one update per "
            "generation: no old-policy forward); rlhf_fast: ppo.old_logp='behaviour', the same saving",
            "goals (issue 10, not asserted): step time ratio >= 2 and extra_peak ratio >= 1.43 (30% less memory)",
            "tokens/s counts each side's own generated tokens (random tiny models stop at EOS at different times)",
        ] + (["rlhf_fast side with ppo.prefix_sharing: each prompt computed once per group of answers (the "
              "policy's and the reference's scoring, the PPO critic, the update); TRL has no such option"]
             if cfg.rl_prefix_sharing else [])
        + (["rlhf_fast side with ppo.padding_free: every forward (scoring, critic, update) one packed row "
            "without padding; TRL's side is unchanged"] if cfg.rl_padding_free else []))


@_with_tokenizer
def run_dpo_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's DPO table: TRL 1.16's ``DPOTrainer`` (:class:`TRLDPOStep`) and
    rlhf_fast's (:class:`RLHFFastDPOStep`), one optimizer step on the same pairs, and the
    TRL ÷ rlhf_fast ratios. The tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it."""
    fused = cfg.trl_fused_head("dpo")
    return _step_table(
        cfg, f"one DPO step on a {cfg.family} model from a config ({cfg.dpo_pairs} pairs = {2 * cfg.dpo_pairs} rows, "
        f"prompt {cfg.dpo_prompt_tokens} tokens, responses {cfg.dpo_min_response}–{cfg.dpo_max_response} tokens + "
        "eos", DPO_PHASES,
        [("dpo", "TRL DPOTrainer" + (" (fused LM head)" if fused else " (selective_log_softmax head)"))],
        timeout_s, repeats, timing=_PAIR_TOKENS,
        what="one optimizer step over every pair: reference = the reference model's log-probs of the chosen and "
        "rejected rows (no_grad, every step: precompute_ref_log_probs off on both sides); update = the rest of the "
        "step (collation, policy forward + backward on the chosen + rejected rows in one batch, sigmoid loss, "
        "metrics, grad clipping at 1, fused AdamW step, scheduler)",
        notes=[
            "TRL side: trl.DPOTrainer itself (dataset preparation, DataCollatorForPreference, training_step / "
            "_compute_loss with its metrics, create_optimizer_and_scheduler: adamw_torch_fused), driven one "
            "optimizer step as Trainer's loop does (collate, training_step, clip, optimizer / scheduler step, "
            "zero_grad); ref_model a copy of the policy; gradient_checkpointing off (TRL's default is on) and fp32 "
            "on both sides; log-probs: "
            + ("TRL 1.x's fused LM head (add_fused_lm_head), as DPOTrainer sets it" if fused else
               "TRL <= 0.2x's logits + selective_log_softmax on a logits_to_keep forward, in place of TRL 1.x's "
               "fused LM head, whose CPU fallback scores every position in torch tiles (at V=32768 7.6× slower a "
               "step and 4× the extra peak; a [min(N, 4096), 32768] buffer at any vocabulary); same log-probs and "
               "metrics; trl_logprobs=fused_head renders TRL 1.x's path"),
            "rlhf_fast side: DPOTrainer.train_step (fused LM head over the response tokens only) with its own "
            "optimizer, the fused AdamW the TRL sides use too"
            + ("; prefix_sharing on (each pair one packed row [prompt, chosen, rejected]: the prompt scored once by "
               "the policy and the reference; TRL has no such option)" if cfg.dpo_prefix_sharing else ""),
        ])


@_with_tokenizer
def run_kto_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's KTO table: TRL 1.16's ``KTOTrainer`` (:class:`TRLKTOStep`) and
    rlhf_fast's (:class:`RLHFFastKTOStep`), one optimizer step on the same examples and KL rows,
    and the TRL ÷ rlhf_fast ratios. The tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it."""
    n = 2 * cfg.dpo_pairs
    fused = cfg.trl_fused_head("kto")
    return _step_table(
        cfg, f"one KTO step on a {cfg.family} model from a config ({n} examples = {cfg.dpo_pairs} pairs unpaired, "
        f"{n} rows + {n} KL rows, prompt {cfg.dpo_prompt_tokens} tokens, completions {cfg.dpo_min_response}–"
        f"{cfg.dpo_max_response} tokens + eos", DPO_PHASES,
        [("kto", "TRL KTOTrainer" + (" (fused LM head)" if fused else " (selective_log_softmax head)"))],
        timeout_s, repeats,
        timing="; tokens/s = the example rows' non-padding tokens (prompt + completion; the KL rows, scored on both "
        "sides, not counted) ÷ step time",
        what="one optimizer step over every example (loss_type kto, desirable and undesirable weights 1): reference "
        "= the reference model's log-probs of the example rows and of the KL rows (each prompt with the previous "
        "example's completion), no_grad, every step (precompute_ref_log_probs off on both sides); update = the rest "
        "of the step (collation, the policy's no-grad forward on the KL rows, its forward + backward on the example "
        "rows, z0, loss, metrics, grad clipping at 1, fused AdamW step, scheduler)",
        notes=[
            "TRL side: trl.KTOTrainer itself (dataset preparation with its KL completions, "
            "DataCollatorForUnpairedPreference, training_step / _compute_loss with its metrics, "
            "create_optimizer_and_scheduler: adamw_torch_fused), driven one optimizer step as Trainer's loop does; "
            "per_device_train_batch_size = every example, given in rlhf_fast's seeded step order, so both sides "
            "build the same KL rows (TRL reads its data in order); ref_model a copy of the policy; "
            "gradient_checkpointing off (TRL's default is on) and fp32 on both sides; log-probs: "
            + ("TRL 1.x's fused LM head (add_fused_lm_head), as KTOTrainer sets it" if fused else
               "TRL <= 0.2x's logits + selective_log_softmax (with the entropy and mean logit its metrics read) on a "
               "logits_to_keep forward, in place of TRL 1.x's fused LM head, whose CPU fallback scores every "
               "position in torch tiles (see the DPO table); same log-probs and metrics; trl_logprobs=fused_head "
               "renders TRL 1.x's path"),
            "rlhf_fast side: KTOTrainer.train_step (fused LM head over the completion tokens only; the reference "
            "scores the example rows and the KL rows in one forward) with its own fused AdamW",
        ])


@_with_tokenizer
def run_simpo_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's SimPO table (reference-free): TRL 1.16's ``CPOTrainer`` with
    ``loss_type="simpo"`` (:class:`TRLSimPOStep`) and rlhf_fast's DPOTrainer with
    ``loss_type: simpo`` (:class:`RLHFFastDPOStep`), one optimizer step on the same pairs, and the
    TRL ÷ rlhf_fast ratios. The tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it."""
    return _step_table(
        cfg, f"one SimPO step (reference-free) on a {cfg.family} model from a config ({cfg.dpo_pairs} pairs = "
        f"{2 * cfg.dpo_pairs} rows, prompt {cfg.dpo_prompt_tokens} tokens with bos, responses {cfg.dpo_min_response}–"
        f"{cfg.dpo_max_response} tokens + eos", ALGO_PHASES["simpo"], [("simpo", "TRL CPOTrainer (loss_type simpo)")],
        timeout_s, repeats, timing=_PAIR_TOKENS,
        what="one optimizer step over every pair, no reference model on either side: the policy forward + backward "
        "on the chosen + rejected rows in one batch, the SimPO loss on token-mean log-probs (beta, simpo_gamma 0.5) "
        "+ cpo_alpha 1.0 × the chosen rows' token-mean NLL (CPOConfig's defaults: CPO-SimPO), metrics, grad "
        "clipping at 1, fused AdamW step, scheduler",
        notes=[
            "TRL side: trl.experimental.cpo.CPOTrainer itself (tokenize_row, DPODataCollatorWithPadding, "
            "training_step / get_batch_loss_metrics with its metrics, create_optimizer_and_scheduler: "
            "adamw_torch_fused), driven one optimizer step as Trainer's loop does; its only log-prob path, kept as "
            "is: the full [2B, T, V] logits of every position (no fused head, no logits_to_keep), "
            "nn.CrossEntropyLoss for the NLL, selective_log_softmax; gradient_checkpointing off and fp32 "
            "(CPOConfig's defaults: on, bf16) on both sides; each prompt starts with bos on both sides (CPOTrainer "
            "adds it when missing)",
            "rlhf_fast side: DPOTrainer.train_step with loss_type simpo, simpo_gamma 0.5, cpo_alpha 1.0 (fused LM "
            "head over the response tokens only, no reference model) with its own fused AdamW",
        ])


@_with_tokenizer
def run_distill_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's on-policy distillation table: TRL 1.16's ``DistillationTrainer``
    (:class:`TRLDistillStep`) and rlhf_fast's (:class:`RLHFFastDistillStep`), one optimizer step on
    the same prompts, student and teacher, and the TRL ÷ rlhf_fast ratios. The tokenizer is trained
    here unless ``cfg.tokenizer_dir`` holds it."""
    return _step_table(
        cfg, f"one on-policy distillation step on a {cfg.family} model from a config (B={cfg.batch_size}, "
        f"≤{cfg.max_new_tokens} new tokens, teacher h={cfg.teacher_hidden_size} × {cfg.teacher_layers} layers, "
        f"beta {cfg.distill_beta:g}", DISTILL_PHASES, [("distill", "TRL DistillationTrainer")], timeout_s, repeats,
        timing="; tokens/s = the step's generated tokens ÷ step time",
        what="one optimizer step: generate = the student's sampling of the completions; update = the rest (the "
        "teacher's forward over prompt + completion under no_grad, the student forward + backward, the generalised "
        "JSD over the completion tokens, grad clipping at 1, fused AdamW step, scheduler)",
        notes=[
            "TRL side: trl.DistillationTrainer itself (_generate_and_score_completions with HF generate, "
            "compute_loss with _chunked_divergence_loss, create_optimizer_and_scheduler: adamw_torch_fused), driven "
            "one optimizer step as Trainer's loop does; gradient_checkpointing off (its default is on) and fp32 on "
            "both sides",
            "rlhf_fast side: DistillationTrainer.step (its rollout engine, the teacher's hidden states, "
            "ops.fused_linear_divergence with the gradients computed in its forward) with its own fused AdamW",
        ])


@_with_tokenizer
def run_online_dpo_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's online DPO table: TRL 1.16's experimental ``OnlineDPOTrainer``
    (:class:`TRLOnlineDPOStep`) and rlhf_fast's (:class:`RLHFFastOnlineDPOStep`), one optimizer step
    on the same prompts, model and reward function, and the TRL ÷ rlhf_fast ratios. The tokenizer is
    trained here unless ``cfg.tokenizer_dir`` holds it."""
    return _step_table(
        cfg, f"one online DPO step on a {cfg.family} model from a config ({cfg.prompts_per_step} prompts × 2 "
        f"answers = {2 * cfg.prompts_per_step} sequences, ≤{cfg.max_new_tokens} new tokens, beta {cfg.dpo_beta:g}, "
        "loss_type sigmoid", ONLINE_DPO_PHASES, [("online_dpo", "TRL OnlineDPOTrainer (experimental)")], timeout_s,
        repeats, timing="; tokens/s = the step's generated tokens (each answer's own, eos included) ÷ step time",
        what="one optimizer step: generate = the policy's sampling of two answers per prompt; logprobs = the "
        "reference's log-probs of the answers (no_grad); update = the rest (the digit reward of every answer, the "
        "chosen / rejected choice, the policy forward + backward, the sigmoid DPO loss on the summed log-probs, its "
        "statistics, grad clipping at 1, fused AdamW step, scheduler)",
        notes=[
            "TRL side: trl.experimental.online_dpo.OnlineDPOTrainer itself (training_step: _generate with HF "
            "generate, _forward with the full [2N, T, V] logits and log_softmax for the policy and the reference — "
            "its only log-prob path, kept as is —, _calculate_rewards_from_functions with the digit reward, the "
            "loss and its stats; create_optimizer_and_scheduler: adamw_torch_fused), driven one optimizer step as "
            "Trainer's loop does; gradient_checkpointing off (its default is on), fp32 and the same temperature, "
            "max_new_tokens and learning rate on both sides; both sides generate the same number of answers within "
            "the same max_new_tokens (checked each step)",
            "rlhf_fast side: OnlineDPOTrainer.step (estimator online_dpo: its rollout engine, the fused log-prob head "
            "over the answers' tokens only for the reference and the policy) with its own fused AdamW",
        ])


@_with_tokenizer
def run_sdft_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's SDFT table: TRL 1.16's experimental ``SDFTTrainer`` (:class:`TRLSDFTStep`)
    and rlhf_fast's (:class:`RLHFFastSDFTStep`), one optimizer step on the same records and model,
    and the TRL ÷ rlhf_fast ratios. The tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it."""
    return _step_table(
        cfg, f"one SDFT (self-distillation) step on a {cfg.family} model from a config (B={cfg.batch_size}, "
        f"≤{cfg.max_new_tokens} new tokens, teacher base (the initial policy), topk_logits top-k 100, alpha 0.5",
        DISTILL_PHASES, [("sdft", "TRL SDFTTrainer (experimental)")], timeout_s, repeats,
        timing="; tokens/s = the step's generated tokens ÷ step time",
        what="one optimizer step: generate = the student's sampling of the completions of its prompts; update = "
        "the rest (the teacher prompts: each prompt with its privileged context, then the same answer; the "
        "teacher's forward under no_grad, the student forward + backward, the top-k generalised JSD over the "
        "completion tokens, each answer's mean then the mean over answers, grad clipping at 1, fused AdamW step, "
        "scheduler)",
        notes=[
            "TRL side: trl.experimental.sdft.SDFTTrainer itself (sample_rollouts with HF generate, the teacher "
            "prompts of DemonstrationTeacherContextBuilder, compute_loss with the [B, C, V] logits of both models "
            "and compute_topk_self_distillation_loss; create_optimizer_and_scheduler: adamw_torch_fused), driven one "
            "optimizer step as Trainer's loop does, its base teacher loaded from the initial student saved to disk "
            "(same weights as rlhf_fast's copy); gradient_checkpointing off (its default is on), fp32, the same "
            "records, temperature, max_new_tokens and learning rate on both sides",
            "rlhf_fast side: SDFTTrainer.step (estimator sdft: its rollout engine, both models' hidden states at "
            "the answer tokens only, the chunked top-k self-distillation loss without [B, C, V] logits) with its own "
            "fused AdamW",
        ])


@_with_tokenizer
def run_sdpo_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's SDPO table: TRL 1.16's experimental ``SDPOTrainer`` (:class:`TRLSDPOStep`)
    and rlhf_fast's (:class:`RLHFFastSDPOStep`), one optimizer step on the same prompts, model and
    reward, and the TRL ÷ rlhf_fast ratios. The tokenizer is trained here unless ``cfg.tokenizer_dir``
    holds it."""
    return _step_table(
        cfg, f"one SDPO (self-distillation policy optimisation) step on a {cfg.family} model from a config "
        f"({cfg.prompts_per_step} prompts × {cfg.group_size} answers, ≤{cfg.max_new_tokens} new tokens, "
        "distillation_weight 1, sampled_token, EMA teacher, success_reward_threshold 0", DISTILL_PHASES,
        [("sdpo", "TRL SDPOTrainer (experimental)")], timeout_s, repeats,
        timing="; tokens/s = the step's generated tokens ÷ step time",
        what="one optimizer step: generate = the student's sampling of the answers; update = the rest (the digit "
        "reward and group advantages, each answer's teacher context: its prompt reprompted with the first other "
        "answer of its group (threshold 0: every answer), the EMA teacher's forward under no_grad, the student "
        "forward + backward, the sampled-token reverse-KL self-distillation loss, grad clipping at 1, fused AdamW "
        "step, scheduler, the EMA teacher update)",
        notes=[
            "TRL side: trl.experimental.sdpo.SDPOTrainer itself (sample_rollouts with HF generate, "
            "_calculate_rewards, SuccessfulRolloutTeacherContextBuilder, compute_loss with the [B, C, V] logits of "
            "both models; create_optimizer_and_scheduler: adamw_torch_fused; its SyncTeacherModelCallback's "
            "on_step_end for the EMA update), driven one optimizer step as Trainer's loop does, its EMA teacher "
            "loaded from the initial policy saved to disk; gradient_checkpointing off, fp32, the same prompts, "
            "reward, temperature, max_new_tokens, learning rate and success_reward_threshold (0; TRL's default 1 "
            "asks for all-digit answers, which the untrained model never gives) on both sides",
            "rlhf_fast side: SDPOTrainer.step (estimator sdpo: its rollout engine, ppo.old_logp behaviour — TRL "
            "computes no rollout log-probs with one optimizer step per generation —, both models' per-token "
            "log-probs of the answers from the fused log-prob op, the EMA update) with its own fused AdamW",
        ])


@_with_tokenizer
def run_iw_opd_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's IW-OPD table: TRL 1.16's experimental ``IWOPDTrainer`` (:class:`TRLIWOPDStep`)
    and rlhf_fast's ``DistillationTrainer`` with ``distill.objective: iw_opd`` (:class:`RLHFFastIWOPDStep`),
    one optimizer step on the same prompts, student and teacher, and the TRL ÷ rlhf_fast ratios. The
    tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it."""
    return _step_table(
        cfg, f"one IW-OPD (importance-weighted on-policy distillation) step on a {cfg.family} model from a config "
        f"(B={cfg.batch_size}, ≤{cfg.max_new_tokens} new tokens, teacher h={cfg.teacher_hidden_size} × "
        f"{cfg.teacher_layers} layers, iw_opd_gamma 0.5", DISTILL_PHASES,
        [("iw_opd", "TRL IWOPDTrainer (experimental)")], timeout_s, repeats, timing="; tokens/s = the step's generated tokens ÷ step time",
        what="one optimizer step: generate = the student's sampling of the completions; update = the rest (the "
        "teacher's forward under no_grad, the student forward + backward, the advantage teacher − sampler log-prob "
        "of each sampled token with its prefix weight, the policy-gradient loss, grad clipping at 1, fused AdamW "
        "step, scheduler)",
        notes=[
            "TRL side: trl.experimental.iw_opd.IWOPDTrainer itself (distillation_objective iw_opd; HF generate; "
            "compute_loss with the full [B, T, V] logits of student and teacher over prompt + completion and "
            "log_softmax, its only local path, kept as is; the sampler's log-probs are the student's own, TRL's "
            "fallback without vLLM; create_optimizer_and_scheduler: adamw_torch_fused), driven one optimizer step as "
            "Trainer's loop does; top_p 1 (its default 0.95) and gradient_checkpointing off, fp32 on both sides",
            "rlhf_fast side: DistillationTrainer.step with distill.objective iw_opd (its rollout engine and the "
            "sampler's log-probs from it, both models' per-token log-probs from the fused log-prob op) with its own "
            "fused AdamW",
        ])


def _checked(algo: str, cfg: E2EConfig) -> str:
    """The table note of :func:`check_same_step` on ``cfg`` (run here, in-process, before the timed
    subprocesses): the first step's loss on both sides and the weights after two steps, or — loudly —
    the difference it found (the timings are then not a like-for-like comparison)."""
    what = f"{algo}{' padding-free' if cfg.sft_packing else ''}"
    try:
        res = check_same_step(algo, cfg)
    except Exception as e:  # noqa: BLE001 - any failure is reported in the table, never hidden
        return f"CORRECTNESS CHECK FAILED ({what}): {type(e).__name__}: {str(e)[:300]}"
    (a, b), (a2, b2) = res["losses"][0], res["losses"][-1]
    return (f"checked ({what}, this configuration, in-process): the same token rows and initial weights; loss "
            f"TRL {a:.6g} / rlhf_fast {b:.6g} at step 1 and {a2:.6g} / {b2:.6g} at step {len(res['losses'])} "
            f"(rel 1e-4); weights after it |W_ours − W_trl| = {res['weight_diff']:.1e} × TRL's update")


@_with_tokenizer
def run_sft_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's SFT table: TRL 1.16's ``SFTTrainer`` (:class:`TRLSFTStep`) and rlhf_fast's
    (:class:`RLHFFastSFTStep`), one optimizer step on the same prompt–completion records, padded and
    then padding-free on both sides (TRL's ``padding_free``, rlhf_fast's ``packing``), each with its
    TRL ÷ rlhf_fast row; :func:`check_same_step` on both layouts first (its results in the notes). The
    tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it."""
    fused = cfg.trl_fused_head("sft")
    head = " (fused LM head)" if fused else " (selective_log_softmax head)"
    n = 2 * cfg.dpo_pairs
    padded, packed = replace(cfg, sft_packing=False), replace(cfg, sft_packing=True)
    notes = [_checked("sft", padded), _checked("sft", packed)]
    table = _step_table(
        cfg, f"one SFT step on a {cfg.family} model from a config ({n} prompt–completion records, prompt "
        f"{cfg.dpo_prompt_tokens} tokens, completions {cfg.dpo_min_response}–{cfg.dpo_max_response} tokens + eos", (),
        [], timeout_s, repeats,
        timing="; tokens/s = the step's non-padding tokens (prompt + completion of every record) ÷ step time",
        what="one optimizer step over every record: the policy forward + backward, the NLL of the completion "
        "tokens (and eos) averaged over all of the batch's completion tokens (TRL's completion_only_loss with "
        "num_items_in_batch; rlhf_fast's default), the entropy and token-accuracy metrics, grad clipping at 1, fused "
        "AdamW step, scheduler; row 'sft': right-padded batch; row 'sft padding-free': the batch as one row with "
        "attention per record (TRL padding_free=True with max_length None, as TRL requires without packing; "
        "rlhf_fast packing: true)",
        notes=[
            "TRL side: trl.SFTTrainer itself (dataset preparation: eos, tokenisation, completion mask and labels; "
            "DataCollatorForLanguageModeling; training_step / compute_loss with its metrics; "
            "create_optimizer_and_scheduler: adamw_torch_fused), driven one optimizer step as Trainer's loop does, "
            "num_items_in_batch from Trainer._get_num_items_in_batch; gradient_checkpointing off (TRL's default is "
            "on), fp32, no warm-up and lr constant on both sides; log-probs: "
            + ("TRL 1.x's fused LM head (add_fused_lm_head), as SFTTrainer sets it" if fused else
               "TRL <= 0.2x's logits + selective_log_softmax (with the entropy and top-1 flags its metrics read) on a "
               "logits_to_keep forward, in place of TRL 1.x's fused LM head, whose CPU fallback scores every position "
               "in torch tiles (see the DPO table); same loss and metrics; trl_logprobs=fused_head renders TRL 1.x's "
               "path"),
            "rlhf_fast side: SFTTrainer.train_step (fused LM head over the completion tokens only) with its own fused "
            "AdamW", *notes,
        ])
    _add_algo_rows(table, "sft", padded, timeout_s, repeats, (), "TRL SFTTrainer" + head)
    _add_algo_rows(table, "sft", packed, timeout_s, repeats, (), "TRL SFTTrainer, padding_free" + head,
                   label="sft padding-free")
    return table


@_with_tokenizer
def run_reward_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration's reward-model table: TRL 1.16's ``RewardTrainer`` (:class:`TRLRewardStep`)
    and rlhf_fast's (:class:`RLHFFastRewardStep`), one optimizer step of pairwise Bradley–Terry on the
    same pairs and sequence-classification model, and the TRL ÷ rlhf_fast ratios; :func:`check_same_step`
    first (its result in the notes). The tokenizer is trained here unless ``cfg.tokenizer_dir`` holds it."""
    note = _checked("reward", cfg)
    return _step_table(
        cfg, f"one reward-model step on a {cfg.family} sequence-classification model from a config "
        f"({cfg.dpo_pairs} pairs = {2 * cfg.dpo_pairs} rows, prompt {cfg.dpo_prompt_tokens} tokens, responses "
        f"{cfg.dpo_min_response}–{cfg.dpo_max_response} tokens + eos", (), [("reward", "TRL RewardTrainer")],
        timeout_s, repeats, timing=_PAIR_TOKENS,
        what="one optimizer step over every pair: the forward of the chosen + rejected rows in one batch, the score "
        "at each row's last token, the Bradley–Terry loss −log σ(r_chosen − r_rejected) averaged over the pairs (no "
        "margin), the reward / accuracy / margin metrics, the backward, grad clipping at 1, fused AdamW step, "
        "scheduler",
        notes=[
            "TRL side: trl.RewardTrainer itself (dataset preparation: eos, prompt + response tokenised as one text; "
            "DataCollatorForPreference; training_step / compute_loss with its metrics; "
            "create_optimizer_and_scheduler: adamw_torch_fused), driven one optimizer step as Trainer's loop does; "
            "the model's own forward (AutoModelForSequenceClassification: the score head on every position, read "
            "at the last non-pad token); gradient_checkpointing off (its default is on), fp32, lr constant on both "
            "sides",
            "rlhf_fast side: RewardTrainer.train_step (data_kind pairs; the backbone's hidden states, the score head "
            "at each row's last token) with its own fused AdamW; both models the same "
            "AutoModelForSequenceClassification built from the policy's config (num_labels 1), same seed", note,
        ])


def main(quick: bool = False, repeats: int = 1, write: bool = False, device: str = "cpu",
         algos=ALGOS, overrides: Optional[Dict[str, object]] = None) -> List[Table]:
    """Run the suite and print its tables; ``write``: also append them to benchmarks/results;
    ``overrides``: E2EConfig fields set on every configuration."""
    algos = _check_algos(algos)
    paths = None
    if write:  # named after the day the run starts, and checked before the long work
        from .common import check_results_paths, results_paths

        paths = results_paths(device)
        check_results_paths(paths, "--write")
    t = run_suite(device=device, quick=quick, repeats=repeats, algos=algos, overrides=overrides)
    for table in t:
        print(table.markdown())
    if write:
        from .common import write_results

        paths = write_results(t, device=device, suite=f"e2e --repeats {repeats} --threads {torch.get_num_threads()}"
                              + (f" --algos {','.join(algos)}" if algos != ALGOS else "")
                              + (" --quick" if quick else "")
                              + "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                        for k, v in (overrides or {}).items()),
                              paths=paths)
        print(f"wrote {paths['json']} and {paths['md']}")
    return t


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="one PPO / GRPO / DPO (/ KTO / SimPO / distillation / online DPO / SFT / "
                                "reward model) step, rlhf_fast vs TRL")
    p.add_argument("--framework", choices=("trl", "rlhf_fast"))
    p.add_argument("--algo", choices=ALL_ALGOS, help="internal: the algorithm of one --framework subprocess")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"algorithms to run, comma-separated among "
                   f"{','.join(ALL_ALGOS)} (default: {','.join(ALGOS)})")
    p.add_argument("--config", default=None, help="E2EConfig as JSON")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="subprocess runs per side (median), alternating sides")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/results/cpu-<date>.{json,md}")
    add_step_arguments(p)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.framework is None:
        over = step_overrides(a)
        tables = main(quick=a.quick, repeats=a.repeats, write=a.write, device=a.device, algos=a.algos,
                      overrides=over)
        sys.exit(1 if any(r.get("error") for t in tables for r in t.rows) else 0)  # as `rlhf-fast bench e2e`
    else:
        known = {f.name for f in fields(E2EConfig)}
        c = E2EConfig(**{k: v for k, v in json.loads(a.config or "{}").items() if k in known})
        print(json.dumps(measure(a.framework, a.algo, c)))
