"""Run under torchrun (or alone) by tests/test_distributed.py: a few optimiser steps of SFT or
of the GRPO policy update on a fixed global batch, sharded over the ranks, with DDP or FSDP2.
Writes the global losses and the final full weights so the test can compare 1 vs 2 ranks."""

import argparse
import contextlib
import json

import torch

from rlhf_fast import ops
from rlhf_fast.distributed import exit_process, init_distributed, load_sharded, save_sharded, shutdown, wrap_model
from rlhf_fast.models import llama_forward
from rlhf_fast.models.logprobs import policy_loss, sequence_logprobs
from rlhf_fast.models.tiny import tiny_causal_lm

B, T, V = 8, 12, 96


def batch():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(4, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    for i, n in enumerate(lengths.tolist()):  # right padding of uneven rows
        attn[i, n:] = 0
        ids[i, n:] = 0
    resp = attn.clone()
    resp[:, : T // 3] = 0  # a prompt prefix that does not count
    scores = torch.randn(B, generator=g)
    return ids, attn, resp, scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="none:sft", help="comma list of STRATEGY:MODE[:STEPS[:LOAD[:SAVE]]]")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = init_distributed()
    results, fast_calls = {}, {}
    for spec in args.runs.split(","):
        parts = spec.split(":") + [""] * 5
        strategy, mode, steps, load, save = parts[:5]
        with _counting(llama_forward, "hidden_states") as calls:
            losses, full = run_one(ctx, strategy, mode, int(steps or 3), load or None, save or None)
        if ctx.is_main:
            results[spec] = losses
            fast_calls[spec] = calls[0]
            torch.save({k: v.detach().clone() for k, v in full.items()}, f"{args.out}.{len(results) - 1}.pt")
    if ctx.is_main:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "fast_calls": fast_calls, "world_size": ctx.world_size}, f)
    shutdown()  # every rank done (rank 0 writes the results last) before gloo's pairs close


@contextlib.contextmanager
def _counting(module, name):
    """Count the calls of ``module.name`` (a one-element list) while the block runs."""
    fn, calls = getattr(module, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, fn)


def run_generate(ctx, strategy, family):
    """Sample 2 answers to each of 4 prompts, each rank its share, every row seeded by its
    global index; rows stop on any of 16 tokens of 96, so the ranks decode for
    different numbers of steps. Returns per global row [token-id sum, tokens, logp sum]."""
    from rlhf_fast.models import sample_texts, train_tokenizer
    from rlhf_fast.rollout import HFRolloutEngine, SamplingParams

    tok = train_tokenizer(sample_texts(), 96)
    model = tiny_causal_lm(len(tok), family=family, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model = wrap_model(model, strategy, ctx)
    prompts = ["hello world", "the cat sat on the", "one", "what is two and three"]
    rows = ctx.shard(len(prompts))
    seeds = [2 * rows.start + i for i in range(2 * len(rows))]
    from rlhf_fast.rollout.hf_engine import _LlamaDecoder

    steps, step = [0], _LlamaDecoder.step
    _LlamaDecoder.step = lambda self, *a: (steps.__setitem__(0, steps[0] + 1), step(self, *a))[1]
    try:
        b = HFRolloutEngine(model, tok).generate([prompts[i] for i in rows], SamplingParams(
            max_new_tokens=12, n=2, sample_seeds=seeds, stop_token_ids=tuple(range(4, 20)), ignore_eos=True))
    finally:
        _LlamaDecoder.step = step
    P = b.prompt_length
    m = b.response_mask[:, P:].bool()
    out = torch.zeros(2 * len(prompts), 3, dtype=torch.float64)
    for i, (ids, lp, mk) in enumerate(zip(b.response_ids, b.behaviour_logp[:, P:], m)):
        out[seeds[i]] = torch.tensor([float(ids[mk].sum()), float(mk.sum()), float(lp[mk].sum())])
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fast = ctx.all_reduce_max(torch.tensor([float(steps[0] > 0)]))  # the preallocated-KV decoder ran
    return ctx.all_reduce_sum(out).flatten().tolist() + fast.tolist(), full


def run_one(ctx, strategy, mode, steps, load, save):
    if mode.startswith("gen_"):
        return run_generate(ctx, strategy, mode[4:])
    model = tiny_causal_lm(V, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model.train()
    if mode.endswith("_ckpt"):  # transformers' activation checkpointing, which our forward keeps
        mode = mode[: -len("_ckpt")]
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model, strategy, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if load:
        load_sharded(load, model, opt, ctx)
    ids, attn, resp, scores = batch()
    rows = ctx.shard(B)
    ids, attn, resp = ids[rows], attn[rows], resp[rows]
    mask = resp.bool() & attn.bool()
    mask[:, 0] = False
    # the global token count, computed once and shared: the loss does not depend on the split
    n_tok = ctx.all_reduce_sum(mask.sum().double()).float()
    losses = []
    old_logp = None
    for _ in range(steps):
        if mode == "sft":
            logp = sequence_logprobs(model, ids, attn, response_mask=resp)
            local = -(logp * mask).sum() / n_tok
        else:
            if old_logp is None:
                with torch.no_grad():
                    old_logp = sequence_logprobs(model, ids, attn, response_mask=resp)
                adv_rows = ops.group_advantages(scores, 4)[rows]  # groups of 4 never straddle ranks
                adv = adv_rows[:, None].expand_as(old_logp).contiguous()
            local, _ = policy_loss(model, ids, attn, mask.long(), old_logp, adv, normalizer=n_tok)
        (local * ctx.grad_scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(ctx.all_reduce_sum(local.detach())))
    if save:
        save_sharded(save, model, opt, ctx, extra={"steps": steps})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return losses, full


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter finalisation: see rlhf_fast.distributed.exit_process
