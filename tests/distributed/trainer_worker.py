"""Run under torchrun (or alone) by tests/test_distributed_trainers.py: a few steps of the SFT,
reward, DPO or RL trainer (tiny model, synthetic data, fixed global batch and seed) with DDP,
FSDP2 or no wrapping. Rank 0 writes the per-step losses and metrics it logged, so the test can
compare one process with two."""

import argparse
import json
import os
import sys

import torch

# the repository root: the tool runs take their tokenizer, model and tool from tests/test_rl_tools.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rlhf_fast.distributed import DistributedConfig, exit_process, shutdown  # noqa: E402
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

MODEL = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2"


def _length_reward(prompts, completions):
    """A checkable rule reward: longer completions score higher."""
    return [float(len(c)) for c in completions]


def _length_reward_dropping(prompts, completions):
    """The length reward, NaN (dropped, with its GRPO group) for the prompt "go:": ranks then
    keep different numbers of rows, 2 and 4, or 4 and 2, of the step's 8."""
    return [float("nan") if p == "go:" else float(len(c)) for p, c in zip(prompts, completions)]


def _uniform_for_some(prompts, completions):
    """No spread (so no gradient) in the groups of "count:" and "list:"; elsewhere the length,
    and the characters to break ties (a function of the text alone, as on any number of ranks)."""
    return [0.0 if p in ("count:", "list:") else float(len(c)) + 1e-3 * sum(map(ord, c))
            for p, c in zip(prompts, completions)]


def _rl_config(strategy: str, steps: int, out_dir: str, estimator: str, resume: bool, *, same: bool = False,
               trpo: bool = False, bf16: bool = False, behaviour: bool = False, dynamic: bool = False,
               ref_sync: bool = False, variants: bool = False):
    """``same``: sampling seeded per sample and two mini-batches per step (of 4 rows, in
    micro-batches of 2), so 2 ranks must give what one process gives."""
    from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RewardConfig, RLConfig, RolloutConfig

    ppo = dict(mini_batch_size=4 if same else 8, micro_batch_size=2, whiten_advantages=True)
    if trpo:  # a bound the first proposals overshoot, so the line search backtracks
        ppo.update(trpo=True, trpo_max_kl=2e-5, epochs=1)
    if behaviour:  # the sampler's log-probs as old_logp: no entropy / logprob_gap to reduce
        ppo.update(old_logp="behaviour")
    if variants:  # CISPO with the high-entropy mask: its threshold a quantile over every rank's tokens
        ppo.update(policy_loss="cispo", clip_high=1.5, top_entropy_quantile=0.5, off_policy_mask_threshold=0.05)
    return RLConfig(estimator=estimator, steps=steps, output_dir=out_dir, resume=out_dir if resume else None,
                    device="cpu", progress=False, sample_every=1, optim=OptimConfig(lr=5e-3),
                    rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=4,
                                          per_sample_seeds=True if same else None, dynamic_sampling=dynamic),
                    reward=RewardConfig(on_bad_reward="drop" if same else "raise"), ppo=PPOConfig(**ppo),
                    # ref_sync: the reference moves halfway to the policy after every step
                    kl=KLConfig(ref_sync_steps=1, ref_sync_alpha=0.5) if ref_sync else KLConfig(),
                    distributed=DistributedConfig(strategy=strategy, mixed_precision=bf16))


LM_HEAD_DTYPES = set()


def run_rl(strategy: str, steps: int, out_dir: str, estimator: str, resume: bool, **kw):
    """Whole RL steps: rollout (generation included), rewards, advantages, update."""
    from rlhf_fast.trainers.rl import RLTrainer

    same = kw.get("same", False)
    reward = _uniform_for_some if kw.get("dynamic") else _length_reward_dropping if same else _length_reward
    trainer = RLTrainer(_rl_config(strategy, steps, out_dir, estimator, resume, **kw), reward_fns=[reward])
    from rlhf_fast.distributed import unwrap

    # the dtype generation computes the logits in (bf16 under FSDP2 mixed precision), recorded by
    # the head's class forward for the run: a hook on the head would itself send decoding to the
    # transformers forward (the fast decoder would skip it)
    head = unwrap(trainer.policy).lm_head
    cls, forward = type(head), type(head).forward

    def recording_forward(self, x, *a, **k):
        if self is head:
            LM_HEAD_DTYPES.add(str(x.dtype))
        return forward(self, x, *a, **k)

    cls.forward = recording_forward
    try:
        trainer.train()
    finally:
        cls.forward = forward
    trainer.run = trainer.run_dir
    return trainer


def run_rl_update(strategy: str, steps: int, out_dir: str):
    """``steps`` GRPO policy updates on one fixed global rollout batch (B = 8 rows), each rank
    taking its contiguous rows: the global token normaliser and whitening make the result
    equal to one process updating on all 8 rows. Logs the update metrics per step."""
    from rlhf_fast.models.logprobs import sequence_logprobs
    from rlhf_fast.trainers.common import MetricsLogger, RunDir
    from rlhf_fast.trainers.rl import RLTrainer, RolloutTensors

    trainer = RLTrainer(_rl_config(strategy, steps, out_dir, "grpo", False), reward_fns=[_length_reward])
    g = torch.Generator().manual_seed(5)
    from rlhf_fast.distributed import unwrap

    B, L, V = 8, 10, unwrap(trainer.policy).config.vocab_size
    ids = torch.randint(4, V, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.bool)
    am[torch.arange(B) % 3 == 0, -3:] = False  # uneven lengths
    rm = am.clone()
    rm[:, :4] = False
    with torch.no_grad():
        old = sequence_logprobs(trainer.policy, ids, am, response_mask=rm) * rm
    adv = torch.randn(B, 1, generator=g).expand(B, L) * rm
    full = RolloutTensors(ids, am, rm, old, old.clone(), old.clone(), torch.zeros(B, L), adv.contiguous(),
                          torch.zeros(B, L), torch.zeros(B))
    rank, world = trainer.ctx.rank, trainer.ctx.world_size
    lo, hi = rank * B // world, (rank + 1) * B // world
    data = full.select(torch.arange(lo, hi))
    trainer.run = trainer.run_dir = RunDir(out_dir)
    log = MetricsLogger(out_dir) if trainer.ctx.is_main else None
    for step in range(1, steps + 1):
        trainer.global_step = step - 1
        m = trainer.update(data)
        if log is not None:
            log.log(step, {"loss": m["policy/loss"], "approx_kl": m["policy/approx_kl"],
                           "grad_norm": m["policy/grad_norm"]})
    if log is not None:
        log.close()
    return trainer


def _tool_caller(inner, tok):
    """An engine whose first turn is the model's (generated on every rank, so FSDP2's weight
    gathering lines up) except answer 0 of "what is 1+2?", replaced by a calculator call:
    each step one rank has an answer to continue and the other has none, yet must make the
    same continuation call (rl.py's agreement across ranks before each one)."""
    from rlhf_fast.rollout import RolloutBatch, RolloutEngine
    from tests.test_rl_tools import call_text, ids_of

    call = ids_of(tok, call_text()) + [tok.eos_token_id]

    class Caller(RolloutEngine):
        pad_id = inner.pad_id

        def generate(self, prompts, params):
            out = inner.generate(prompts, params)
            if not isinstance(prompts[0], str):  # a continuation: the model's own
                return out
            P, B = out.prompt_length, out.batch_size
            resp, logp = [], []
            for i in range(B):
                m = out.response_mask[i, P:].bool()
                scripted = "what is 1+2?" in prompts[i // params.n] and i % params.n == 0
                resp.append(call if scripted else out.input_ids[i, P:][m].tolist())
                logp.append([0.0] * len(call) if scripted else out.behaviour_logp[i, P:][m].tolist())
            R = max(map(len, resp))
            ids = torch.full((B, R), self.pad_id, dtype=torch.long)
            mask, lp = torch.zeros(B, R, dtype=torch.long), torch.zeros(B, R)
            for i, (r, lq) in enumerate(zip(resp, logp)):
                ids[i, :len(r)], mask[i, :len(r)], lp[i, :len(r)] = torch.tensor(r), 1, torch.tensor(lq)
            reasons = ["stop" if r[-1] == tok.eos_token_id else "length" for r in resp]
            return RolloutBatch(torch.cat([out.input_ids[:, :P], ids], 1),
                                torch.cat([out.attention_mask[:, :P], mask], 1),
                                torch.cat([torch.zeros(B, P, dtype=torch.long), mask], 1),
                                torch.cat([torch.zeros(B, P), lp], 1), list(out.prompt_texts),
                                tok.batch_decode(resp, skip_special_tokens=True), out.group_index, int(mask.sum()),
                                out.tokens_per_second, P, reasons)

        def update_weights(self, model):
            inner.update_weights(model)

    return Caller()


def run_rl_tools(strategy: str, steps: int, out_dir: str):
    """GRPO steps with a calculator tool (chat prompts, the test tokenizer's tool template): one
    answer a step calls it, on one rank; its result joins the sequence as a hole in the loss."""
    import dataclasses

    from rlhf_fast.trainers.rl import RLTrainer
    from tests.test_rl_tools import CHATS, calculator, make_policy, tool_tokenizer

    tok = tool_tokenizer()
    cfg = _rl_config(strategy, steps, out_dir, "grpo", False, same=True)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=80))  # call 32, result 33
    trainer = RLTrainer(cfg, make_policy(tok), tok, reward_fns=[_length_reward], prompts=CHATS, tools=[calculator])
    trainer.engine = _tool_caller(trainer.engine, tok)
    trainer.train()
    trainer.run = trainer.run_dir
    return trainer


def run_one(kind: str, strategy: str, steps: int, out_dir: str, grad_accum: int):
    if kind in ("grpo", "gae", "grpo_resume", "gae_resume"):  # whole steps, 2 ranks equal to one process
        return run_rl(strategy, steps, out_dir, kind.split("_")[0], kind.endswith("_resume"), same=True)
    if kind == "trpo":
        return run_rl(strategy, steps, out_dir, "grpo", False, same=True, trpo=True)
    if kind == "grpo_sync":
        return run_rl(strategy, steps, out_dir, "grpo", False, same=True, ref_sync=True)
    if kind == "grpo_ds":  # dynamic sampling: the groups kept are the one process's, on any ranks
        return run_rl(strategy, steps, out_dir, "grpo", False, same=True, dynamic=True)
    if kind == "grpo_var":
        return run_rl(strategy, steps, out_dir, "grpo", False, same=True, variants=True)
    if kind == "gae_beh":
        return run_rl(strategy, steps, out_dir, "gae", False, same=True, behaviour=True)
    if kind == "grpo_bf16":  # FSDP2 bf16 mixed precision, applied on the CPU too for this check
        import rlhf_fast.distributed as d

        d.MIXED_PRECISION_DEVICES = ("cuda", "cpu")
        try:
            return run_rl(strategy, steps, out_dir, "grpo", False, bf16=True)
        finally:
            d.MIXED_PRECISION_DEVICES = ("cuda",)
    if kind == "grpo_update":
        return run_rl_update(strategy, steps, out_dir)
    if kind == "grpo_tools":
        return run_rl_tools(strategy, steps, out_dir)
    common = dict(model=MODEL, output_dir=out_dir, max_len=48, batch_size=8, grad_accum=grad_accum, lr=1e-2,
                  warmup_steps=0, lr_schedule="constant", max_steps=steps, log_every=1, eval_every=0, seed=0,
                  device="cpu", bf16=False, distributed=DistributedConfig(strategy=strategy))
    if kind == "sft":
        trainer = SFTTrainer(SFTConfig(eval_fraction=0.1, **common))
    elif kind == "sft_chat":  # conversations, the assistant turns only: unequal trained tokens per rank
        tok, records = _chat_data()
        trainer = SFTTrainer(SFTConfig(assistant_only_loss=True, **{**common, "max_len": 64}),
                             train_records=records[:56], eval_records=records[56:], tokenizer=tok)
    elif kind == "sft_text":  # {"text"} records: every token trains, rows of unequal length
        tok, records = _text_data()
        trainer = SFTTrainer(SFTConfig(**common), train_records=records[:56], eval_records=records[56:],
                             tokenizer=tok)
    elif kind == "reward":
        trainer = RewardTrainer(RewardConfig(eval_fraction=0.05, **common))
    elif kind == "dpo":
        trainer = run_dpo(common)
    elif kind == "dpo_pre":
        # the reference log-probs of every pair computed before training, each rank its share, summed
        trainer = DPOTrainer(DPOConfig(eval_fraction=DPO_EVAL_FRACTION, beta=0.5, precompute_ref_logps=True,
                                       **common))
    elif kind == "dpo_mix":
        # a weighted list of losses (MPO-like), the js f-divergence and LD-DPO's length weighting
        trainer = run_dpo(common, loss_type=["sigmoid", "ipo", "sft"], loss_weights=[0.8, 0.2, 1.0],
                          f_divergence_type="js_divergence", ld_alpha=0.5, rpo_alpha=0.0)
    elif kind == "dpo_orpo":  # reference-free: no reference model on any rank
        trainer = run_dpo(common, loss_type="orpo", rpo_alpha=0.0)
    elif kind == "dpo_pf":  # padding_free: policy and reference score one packed row per micro-batch
        trainer = run_dpo(common, padding_free=True)
    elif kind == "dpo_tpo":  # TPO: a gold row per pair (of unequal lengths), its NLL a token mean over the step
        train, ev = (_with_gold(r) for r in _annotated_pairs())
        trainer = DPOTrainer(DPOConfig(**{**common, "loss_type": "tpo_ipo", "beta": 0.5, "tpo_alpha": 0.7,
                                          "annotator_weights": {"a": 1.0, "b": 3.0}}),
                             train_records=train, eval_records=ev)
    elif kind == "kto_apo":
        # APO-zero: no KL rows; annotator weights 1 and 3, so each rank's share of the step's weight differs
        trainer = KTOTrainer(KTOConfig(beta=0.5, loss_type="apo_zero_unpaired", annotator_weights={"a": 1.0, "b": 3.0},
                                       undesirable_weight=1.3, **common),
                             train_records=_annotated_pairs()[0], eval_records=_annotated_pairs()[1])
    elif kind == "kto":
        # the KL reference point z0 is a mean over every KL row of the step (all micro-batches,
        # all ranks); unequal desirable / undesirable weights
        trainer = KTOTrainer(KTOConfig(eval_fraction=DPO_EVAL_FRACTION, beta=0.5, desirable_weight=1.0,
                                       undesirable_weight=1.3, **common))
    else:
        raise ValueError(f"unknown run kind {kind!r}")
    trainer.train()
    return trainer


# 17 eval pairs of the 512 synthetic ones: eval micro-batches of 8, 8 and 1 pairs, so in the
# last one rank 0's share is empty (one stand-in pair that counts for nothing) under 2 ranks
DPO_EVAL_FRACTION = 17 / 512


def _annotated_pairs():
    """(train, eval) synthetic pairs, every third one by annotator "b", the others by "a"."""
    import dataclasses

    from rlhf_fast.trainers.sft import split_records

    records = [dataclasses.replace(r, annotator="b" if i % 3 == 0 else "a") for i, r in
               enumerate(synthetic_preference_records(seed=0))]
    return split_records(records, DPO_EVAL_FRACTION, 0)


def _with_gold(records):
    """The pairs as TPO triples: each with a gold answer of its own length (the chosen one, lengthened)."""
    from rlhf_fast.feedback.formats import TripleRecord

    return [TripleRecord(r.prompt, r.chosen, r.rejected, annotator=r.annotator,
                         reference="good " + r.chosen + " yes" * (i % 4)) for i, r in enumerate(records)]


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "red blue green cat dog sun moon one two three".split()


def _chat_data():
    """(tokenizer with a ChatML template, 64 conversations of 1-3 exchanges), the same on every rank."""
    import random

    from rlhf_fast.feedback.formats import ChatRecord
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    rng = random.Random(0)
    records = []
    for i in range(64):
        msgs = [{"role": "system", "content": "copy the words"}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            w = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            msgs += [{"role": "user", "content": f"repeat: {w}"}, {"role": "assistant", "content": w}]
        records.append(ChatRecord(msgs))
    tok = train_tokenizer(sample_texts(64) + ["repeat: copy the words " + " ".join(WORDS)], 300,
                          padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok, records


def _text_data():
    """(tokenizer, 64 {"text"} records of 1-12 words), the same on every rank."""
    import random

    from rlhf_fast.feedback.formats import TextRecord
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    rng = random.Random(1)
    records = [TextRecord(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))) for _ in range(64)]
    return train_tokenizer(sample_texts(64) + [" ".join(WORDS)], 300, padding_side="right", add_bos=True), records


def run_dpo(common, **overrides):
    """DPO with the RPO term (rpo_alpha > 0: the token mean over every chosen token of the step)
    and per-annotator weights 1 and 3, so each rank's share of the pair weights and of the
    chosen tokens differs from half the global one: only the global normalisers give one
    process's gradient. ``overrides``: other DPOConfig fields (the loss)."""
    train, ev = _annotated_pairs()
    cfg = DPOConfig(**{"beta": 0.5, "rpo_alpha": 0.5, "annotator_weights": {"a": 1.0, "b": 3.0}, **common,
                       **overrides})
    return DPOTrainer(cfg, train_records=train, eval_records=ev)


def _full_weights(trainer, model=None):
    """The full (gathered) state dict; under FSDP2 every rank takes part, rank 0 gets it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = model or getattr(trainer, "model", None) or trainer.policy
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _same_weights_on_every_rank(trainer) -> bool:
    """Whether every DDP replica ends with the same weights (FSDP2 holds one sharded copy)."""
    model = getattr(trainer, "model", None) or trainer.policy
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return True
    vec = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    # the mean over ranks equals the max exactly only when all ranks agree
    mean = trainer.ctx.all_reduce_sum(vec) / trainer.ctx.world_size
    return bool(torch.equal(mean, trainer.ctx.all_reduce_max(vec)))


def _local_fraction(model) -> float:
    """The share of ``model``'s parameter elements this rank holds (FSDP2: about 1/world)."""
    if not isinstance(model, torch.nn.Module):
        return -1.0
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True, help="comma list of KIND:STRATEGY:STEPS:NAME[:GRAD_ACCUM]")
    ap.add_argument("--root", required=True, help="folder of the runs' output folders (NAME inside)")
    ap.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results, world = {}, 1
    for spec in args.runs.split(","):
        kind, strategy, steps, name, *rest = spec.split(":")
        grad_accum = int(rest[0]) if rest else 1
        trainer = run_one(kind, strategy, int(steps), os.path.join(args.root, name), grad_accum)
        world = trainer.ctx.world_size
        in_sync = _same_weights_on_every_rank(trainer)
        weights = _full_weights(trainer)
        critic = getattr(trainer, "critic", None)
        critic_weights = _full_weights(trainer, critic) if critic is not None else None
        if trainer.ctx.is_main:
            results[spec] = read_metrics(trainer.run.path)
            results[spec + "|in_sync"] = in_sync
            results[spec + "|lm_head_dtypes"] = sorted(LM_HEAD_DTYPES)
            results[spec + "|ref_local_fraction"] = _local_fraction(getattr(trainer, "reference", None))
            stem = os.path.join(args.root, name + (".resumed" if kind.endswith("_resume") else ""))
            torch.save(weights, f"{stem}.weights.pt")
            if critic_weights is not None:
                torch.save(critic_weights, f"{stem}.critic.pt")
        LM_HEAD_DTYPES.clear()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "world_size": world}, f)
    shutdown()  # every rank done (rank 0 writes the results last) before gloo's pairs close


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter finalisation: see rlhf_fast.distributed.exit_process
