"""End-to-end step benchmark: one PPO step and one GRPO step, rlhf_fast against TRL.

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
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Dict, List, Optional

import torch

from .common import (Table, _status_kb, fmt_bytes, profiler_extra_peak_bytes, rss_extra_peak_bytes_here,
                     tighten_malloc)

PROMPTS = ["count: 1 2 3", "list the digits:", "numbers please:", "go on: 4 5", "write 7 8 9:", "digits:",
           "say 0 1:", "more numbers:"]
PHASES = ("generate", "logprobs", "reward_adv", "update")


def digit_reward(prompts: List[str], completions: List[str]) -> List[float]:
    """The shared, checkable reward: the fraction of non-space characters that are digits."""
    out = []
    for c in completions:
        chars = [ch for ch in c if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / max(1, len(chars)))
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
    # the TRL side's log-prob path: "fused_head" = TRL 1.x GRPOTrainer's own (add_fused_lm_head);
    # "selective" = logits + selective_log_softmax (TRL <= 0.2x GRPO, the last PPOTrainer);
    # "auto": fused_head for GRPO on CUDA (Triton, completion tokens only), selective elsewhere —
    # on the CPU TRL's fused head falls back to torch tiles over every position and was slower
    # and heavier than selective (GRPO, V=32768: 2.16 s / 625 MiB vs 1.48 s / 198 MiB), so the
    # CPU tables compare against the stronger of the two
    trl_logprobs: str = "auto"

    def __post_init__(self):
        for f in ("prompts_per_step", "group_size", "max_new_tokens", "vocab_size", "hidden_size", "num_layers",
                  "num_heads", "epochs", "mini_batch_size", "steps"):
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

    def trl_fused_head(self, algo: str) -> bool:
        """Whether the TRL side of ``algo`` takes its log-probs through TRL's fused LM head."""
        if self.trl_logprobs == "auto":
            return algo == "grpo" and self.device == "cuda"
        return self.trl_logprobs == "fused_head"

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @classmethod
    def quick(cls) -> "E2EConfig":
        return cls(max_new_tokens=8, hidden_size=32, steps=1)

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
        big = dict(family="qwen2", vocab_size=151936, hidden_size=896, num_heads=14, num_kv_heads=2,
                   intermediate_size=4864, device="cuda")
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


def _sync(device: str) -> None:
    """Wait for queued GPU work, so a phase's wall time includes its kernels."""
    if device == "cuda":
        torch.cuda.synchronize()


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

    def _prompts(self) -> List[str]:
        k = self.cfg.prompts_per_step
        ps = [PROMPTS[(self.pos + i) % len(PROMPTS)] for i in range(k)]
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
        rl_cfg = RLConfig(
            estimator="gae" if ppo else "grpo", steps=cfg.steps + 1, seed=cfg.seed, device=cfg.device, progress=False,
            sample_every=0,
            data=DataConfig(prompts=list(PROMPTS), shuffle=False),
            rollout=RolloutConfig(prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
            kl=KLConfig(coef=cfg.kl_coef, placement="reward" if ppo else "loss", kind="k1" if ppo else "k3"),
            ppo=PPOConfig(epochs=cfg.epochs, mini_batch_size=cfg.mini_batch_size, micro_batch_size=cfg.mini_batch_size,
                          clip_low=cfg.clip, value_clip=cfg.value_clip, value_coef=cfg.value_coef, gamma=cfg.gamma,
                          lam=cfg.lam, whiten_advantages=ppo, max_grad_norm=1.0,
                          # as the TRL side: PPO's log-probs from generation, GRPO's on-policy shortcut
                          old_logp="behaviour"),
            optim=OptimConfig(lr=cfg.lr, critic_lr=cfg.lr),
        )
        self.trainer = RLTrainer(rl_cfg, model, tok, reward_fns=[digit_reward], prompts=list(PROMPTS))

    def step(self) -> Dict[str, float]:
        _sync(self.cfg.device)
        t0 = time.perf_counter()
        m = self.trainer.step()
        _sync(self.cfg.device)
        step = time.perf_counter() - t0
        gen, lp, upd = m.get("time/generate", 0.0), m.get("time/logprobs", 0.0), m.get("time/update", 0.0)
        n = self.cfg.batch_size - m.get("reward/dropped", 0)
        return dict(generate=gen, logprobs=lp, reward_adv=max(0.0, step - gen - lp - upd), update=upd, step=step,
                    tokens=float(m.get("response_length/mean", 0.0)) * n, reward=float(m.get("reward/total", 0.0)))


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
    phases = " ".join(f"{p} {run[p]:.3f}" for p in PHASES if run.get(p) is not None)
    tps = run.get("tokens_per_s")
    return f"{head} step {run['step']:.3f} s ({phases})" + (f", {tps:.0f} tokens/s" if tps else "")


def _median_runs(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Per-key median over repeated subprocess runs (None where any run has None)."""
    out: Dict[str, object] = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = None if any(v is None for v in vals) else statistics.median(vals)
    return out


def run_suite(device: str = "cpu", quick: bool = False, cfg: Optional[E2EConfig] = None,
              timeout_s: float = 600.0, repeats: int = 1) -> List[Table]:
    """PPO and GRPO steps, rlhf_fast vs TRL: one table per configuration — ``cfg`` if given,
    else the quick one, else the tiny model with its 256-token vocabulary and again with a
    real-sized one (:meth:`E2EConfig.large_vocab`).

    ``repeats``: fresh subprocesses per (algo, framework), run alternately TRL / rlhf_fast so
    both sides see the same machine load; every column is the median over them.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' needs a CUDA GPU, and torch sees none")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if cfg is not None:
        cfgs = [cfg]
    elif device == "cuda":
        cfgs = [E2EConfig.gpu_0p5b(quick=quick)]
    else:
        cfgs = [E2EConfig.quick()] if quick else [E2EConfig(), E2EConfig.large_vocab()]
    return [run_table(c, timeout_s=timeout_s, repeats=repeats) for c in cfgs]


def _mem_ratio(trl: Dict[str, object], ours: Dict[str, object], key: str) -> Optional[str]:
    """TRL's extra memory ÷ ours as ``"1.23×"`` (ours floored at 4 KiB), or None."""
    a, b = trl.get(key), ours.get(key)
    return None if a is None or b is None else f"{a / max(b, 4096):.2f}×"


def run_table(cfg: E2EConfig, timeout_s: float = 600.0, repeats: int = 1) -> Table:
    """One configuration: a row per (algo, framework) and a TRL ÷ rlhf_fast ratio row.

    The tokenizer is trained once here and loaded by every subprocess; each finished
    subprocess prints one progress line to stderr, so a run cut short still shows its rows."""
    if cfg.tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="rlhf_fast_e2e_tok_") as d:
            build_tokenizer(cfg).save_pretrained(d)
            return run_table(replace(cfg, tokenizer_dir=d), timeout_s=timeout_s, repeats=repeats)
    where = (torch.cuda.get_device_name() if cfg.device == "cuda" else f"{torch.get_num_threads()} CPU threads")
    table = Table(
        f"one RL step on a {cfg.family} model from a config (B={cfg.batch_size}, ≤{cfg.max_new_tokens} new tokens, "
        f"h={cfg.hidden_size}, {cfg.num_layers} layers, V={cfg.vocab_size}), {where}, "
        f"median of {repeats} subprocess run(s) × {cfg.steps} step(s)",
        ["algo", "framework", "generate_s", "logprobs_s", "reward_adv_s", "update_s", "step_s", "tokens_per_s",
         "extra_peak", "extra_rss", "note"],
    )
    for algo in ("ppo", "grpo"):
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
            row = dict(algo=algo, framework=fw if fw == "rlhf_fast" else "TRL-equivalent (trl utils)")
            if fw in errors:
                what = "rlhf_fast trainer not available" if fw == "rlhf_fast" else "TRL side failed"
                row["note"] = f"{what}: {errors[fw]}"
                table.rows.append(row)
                continue
            r = got[fw] = _median_runs(runs[fw])
            row.update({f"{p}_s": r[p] for p in PHASES}, step_s=r["step"], tokens_per_s=r["tokens_per_s"],
                       extra_peak=fmt_bytes(r["extra_peak_bytes"]), extra_peak_bytes=r["extra_peak_bytes"],
                       extra_rss=fmt_bytes(r.get("extra_rss_bytes")), extra_rss_bytes=r.get("extra_rss_bytes"))
            table.rows.append(row)
        if len(got) == 2:
            a, b = got["trl"], got["rlhf_fast"]
            ratio = {f"{p}_s": (a[p] / b[p] if b[p] > 0 else None) for p in PHASES}
            mem, rss = (_mem_ratio(a, b, k) for k in ("extra_peak_bytes", "extra_rss_bytes"))
            table.rows.append(dict(algo=algo, framework="TRL ÷ rlhf_fast", step_s=a["step"] / b["step"],
                                   tokens_per_s=b["tokens_per_s"] / a["tokens_per_s"] if a["tokens_per_s"] else None,
                                   extra_peak=mem, extra_rss=rss,
                                   note="time ratios > 1: rlhf_fast faster; tokens/s ratio rlhf_fast ÷ TRL", **ratio))
    if cfg.device == "cuda":
        memory = ("CUDA: each side's step is timed between torch.cuda.synchronize() calls; rlhf_fast's phase split "
                  "comes from its own timers, which do not synchronise (the step total does); extra_peak = "
                  "torch.cuda.max_memory_allocated above the allocation before the step")
    else:
        memory = ("extra_peak = the torch allocator's peak during one more step above what was allocated before it "
                  "(the profiler's allocation events: the CPU counterpart of torch.cuda.max_memory_allocated); "
                  "extra_rss = peak RSS of one more step above the RSS before it, with glibc returning freed memory "
                  "at once (set after the timed steps, which run on the default allocator): it also counts the "
                  "non-tensor memory the step touches (Python objects, heap pages re-touched after the trim)")
    table.notes += [
        "phases: generate; logprobs = policy + reference log-probs (+ critic values for PPO); "
        "reward_adv = rewards and advantages; update = epochs × mini-batches of forward, backward, optimiser",
        "median over timed steps after one warm-up; each framework in a fresh subprocess",
        memory,
        "TRL side: TRL 1.x has no PPOTrainer; the step is TRL's GRPO / last-PPO algorithm written with TRL's "
        "utilities and HF generate (see rlhf_fast/benchmarks/e2e.py); log-probs: "
        f"PPO {'TRL 1.x fused LM head' if cfg.trl_fused_head('ppo') else 'selective_log_softmax'}, "
        f"GRPO {'TRL 1.x fused LM head (add_fused_lm_head, entropy in the loss forward, as GRPOTrainer)' if cfg.trl_fused_head('grpo') else 'selective_log_softmax (TRL 1.x GRPOTrainer fuses the LM head, whose CPU fallback was slower and heavier here; trl_logprobs=fused_head)'} "
        "on a logits_to_keep forward; fused AdamW with weight decay 0 (transformers' Trainer default) on both sides; "
        "TRL's shortcuts kept (PPO: rollout log-probs from the generation scores; GRPO, one update per generation: "
        "no old-policy forward); rlhf_fast: ppo.old_logp='behaviour', the same saving",
        "goals (issue 10, not asserted): step time ratio >= 2 and extra_peak ratio >= 1.43 (30% less memory)",
        "tokens/s counts each side's own generated tokens (random tiny models stop at EOS at different times)",
    ]
    return table


def main(quick: bool = False, repeats: int = 1, write: bool = False, device: str = "cpu") -> List[Table]:
    """Run the suite and print its tables; ``write``: also append them to benchmarks/results."""
    t = run_suite(device=device, quick=quick, repeats=repeats)
    for table in t:
        print(table.markdown())
    if write:
        from .common import write_results

        paths = write_results(t, device=device, suite=f"e2e --repeats {repeats} --threads {torch.get_num_threads()}"
                              + (" --quick" if quick else ""))
        print(f"wrote {paths['json']} and {paths['md']}")
    return t


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="one PPO / GRPO step, rlhf_fast vs TRL")
    p.add_argument("--framework", choices=("trl", "rlhf_fast"))
    p.add_argument("--algo", choices=("ppo", "grpo"))
    p.add_argument("--config", default=None, help="E2EConfig as JSON")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="subprocess runs per side (median), alternating sides")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/results/cpu-<date>.{json,md}")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.framework is None:
        main(quick=a.quick, repeats=a.repeats, write=a.write, device=a.device)
    else:
        known = {f.name for f in fields(E2EConfig)}
        c = E2EConfig(**{k: v for k, v in json.loads(a.config or "{}").items() if k in known})
        print(json.dumps(measure(a.framework, a.algo, c)))
