"""Padding-free training steps against padded ones, on the CPU by default.

One optimizer step of DPO (``padding_free`` off / on) and of SFT (``packing`` off / on) on the
same model and data, where the rows of a micro-batch have very unequal lengths (so padding
is most of a padded batch). The padded step computes every padding position; the
padding-free step packs the micro-batch into one row whose attention runs per sequence
(``models/llama_forward.py``: one causal sdpa per sequence, no dense [T, T] mask). Both
give the same losses and gradients (tests/test_dpo_padding_free.py, tests/test_sft.py).

Steps alternate between the two sides after one warm-up step each, so a machine's changing
load falls on both; the table gives the median and the 20th / 80th percentiles.

    .venv/bin/python benchmarks/bench_packing.py --hidden 256 --layers 4 --vocab 4096
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_fast.benchmarks.common import Table, write_results  # noqa: E402


def _quantiles(xs: List[float]) -> Dict[str, float]:
    s = sorted(xs)
    q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else [s[0]] * 4
    return {"median_ms": statistics.median(s) * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[3] * 1e3}


def _pairs(args, n: int, seed: int = 0) -> List[dict]:
    """Token-id pairs: a prompt of ``--prompt`` tokens, responses of ``--min-response`` to
    ``--max-response`` tokens (uniform), random ids."""
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, args.vocab) for _ in range(k)]

    return [{"prompt": ids(args.prompt), "chosen": ids(rng.randint(args.min_response, args.max_response)),
             "rejected": ids(rng.randint(args.min_response, args.max_response)), "margin": 0.0, "weight": 1.0}
            for _ in range(n)]


def _tokenizer():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(16), 300, padding_side="right")


def _model(args):
    from rlhf_fast.models.tiny import tiny_causal_lm

    torch.manual_seed(0)
    return tiny_causal_lm(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)


def dpo_steppers(args, tok, workdir: str) -> Dict[bool, Callable[[], object]]:
    """{padding_free: one DPO train_step} on the same pairs (sigmoid loss, a reference model);
    the trainers' run folders under ``workdir``."""
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from rlhf_fast.trainers.sft import _Batches

    out = {}
    for pf in (False, True):
        cfg = DPOConfig(output_dir=os.path.join(workdir, f"dpo_{pf}"), batch_size=args.pairs,
                        max_len=args.prompt + args.max_response + 1, max_steps=10 ** 6, device="cpu", eval_every=0,
                        warmup_steps=0, padding_free=pf)
        tr = DPOTrainer(cfg, model=_model(args), tokenizer=tok, train_records=synthetic_preference_records(8),
                        eval_records=[])
        tr.train_items = _pairs(args, 8 * args.pairs)  # the pairs of the table, in place of the records'
        tr.batches = _Batches(len(tr.train_items), args.pairs, 0)
        out[pf] = tr.train_step
    return out


def sft_steppers(args, tok, workdir: str) -> Dict[bool, Callable[[], object]]:
    """{packing: one SFT train_step} on rows of prompt + response tokens (the pairs' chosen);
    the trainers' run folders under ``workdir``."""
    from rlhf_fast.feedback.formats import SFTRecord
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, _Batches

    rows = []
    for p in _pairs(args, 8 * 2 * args.pairs):
        ids = p["prompt"] + p["chosen"]
        rows.append({"input_ids": ids, "response_mask": [0] * len(p["prompt"]) + [1] * len(p["chosen"])})
    out = {}
    for packing in (False, True):
        cfg = SFTConfig(output_dir=os.path.join(workdir, f"sft_{packing}"), batch_size=2 * args.pairs,
                        max_len=args.prompt + args.max_response + 1, max_steps=10 ** 6, device="cpu", eval_every=0,
                        warmup_steps=0, packing=packing, eval_fraction=0.0)
        tr = SFTTrainer(cfg, model=_model(args), tokenizer=tok, train_records=[SFTRecord("a b", "c d")] * 4,
                        eval_records=[])
        tr.train_rows = rows  # the table's rows, in place of the records'

        tr.batches = _Batches(len(rows), 2 * args.pairs, 0)
        out[packing] = tr.train_step
    return out


def measure(steppers: Dict[bool, Callable[[], dict]], steps: int) -> tuple:
    """(seconds per step of each side, the loss of each side's first step): one warm-up step
    each, then ``steps`` alternating timed steps."""
    times: Dict[bool, List[float]] = {False: [], True: []}
    first: Dict[bool, float] = {}
    for s in range(steps + 1):
        for side in (False, True):
            t0 = time.perf_counter()
            m = steppers[side]()
            if s:
                times[side].append(time.perf_counter() - t0)
            else:
                first[side] = float(m["loss"])
    return times, first


def run(args) -> Table:
    torch.set_num_threads(args.threads)
    tok = _tokenizer()
    table = Table(f"padded vs padding-free steps (h={args.hidden}, {args.layers} layers, V={args.vocab}; "
                  f"{args.pairs} pairs / {2 * args.pairs} SFT rows a step, prompt {args.prompt} tokens, responses "
                  f"{args.min_response}–{args.max_response}; {args.threads} CPU thread(s), {args.steps} steps)",
                  ["trainer", "layout", "median_ms", "p20_ms", "p80_ms", "speedup", "first_loss"])
    for name, make, key in (("dpo", dpo_steppers, "padding_free"), ("sft", sft_steppers, "packing")):
        if name not in args.trainers:
            continue
        with tempfile.TemporaryDirectory(prefix="bench_packing_") as workdir:  # the runs' config.yaml
            t, first = measure(make(args, tok, workdir), args.steps)
        padded, packed = _quantiles(t[False]), _quantiles(t[True])
        table.add(trainer=name, layout="padded", **padded, speedup=1.0, first_loss=first[False])
        table.add(trainer=name, layout=f"{key}: true", **packed, speedup=padded["median_ms"] / packed["median_ms"],
                  first_loss=first[True])
    table.notes.append("speedup = the padded step's median ÷ this one's (> 1: padding-free faster); first_loss = "
                       "the loss of each side's first (warm-up) step, the same model and batch: equal up to float "
                       "rounding")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--min-response", type=int, default=16)
    ap.add_argument("--max-response", type=int, default=256)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trainers", default="dpo,sft", help="comma list of dpo, sft")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/results/cpu-<date>.*")
    args = ap.parse_args(argv)
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    bad = [t for t in args.trainers if t not in ("dpo", "sft")]
    if bad or not args.trainers:
        ap.error(f"--trainers: expected a comma list of dpo, sft, got {bad or args.trainers}")
    if not 1 <= args.min_response <= args.max_response:
        ap.error("--min-response must be >= 1 and <= --max-response")
    small = [f"--{k} ({getattr(args, k)})" for k in ("steps", "pairs", "threads") if getattr(args, k) < 1]
    if small:  # (no timed step: no median to give, after building both trainers)
        ap.error(f"{', '.join(small)} must be >= 1")
    table = run(args)
    print(table.markdown())
    if args.write:
        paths = write_results([table], suite="bench_packing " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"wrote {paths['md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
