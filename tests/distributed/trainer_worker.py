"""Run under torchrun (or alone) by tests/test_distributed_trainers.py: a few steps of the SFT
or reward trainer (tiny model, synthetic data, fixed global batch and seed) with DDP, FSDP2 or
no wrapping. Rank 0 writes the per-step losses and eval metrics it logged, so the test can
compare one process with two."""

import argparse
import json
import os

import torch

from rlhf_fast.distributed import DistributedConfig
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

MODEL = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2"


def run_one(kind: str, strategy: str, steps: int, out_dir: str, grad_accum: int):
    common = dict(model=MODEL, output_dir=out_dir, max_len=48, batch_size=8, grad_accum=grad_accum, lr=1e-2,
                  warmup_steps=0, lr_schedule="constant", max_steps=steps, log_every=1, eval_every=0, seed=0,
                  device="cpu", bf16=False, distributed=DistributedConfig(strategy=strategy))
    if kind == "sft":
        trainer = SFTTrainer(SFTConfig(eval_fraction=0.1, **common))
    else:
        trainer = RewardTrainer(RewardConfig(eval_fraction=0.05, **common))
    trainer.train()
    return trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True, help="comma list of TRAINER:STRATEGY:STEPS:NAME[:GRAD_ACCUM]")
    ap.add_argument("--root", required=True, help="folder of the runs' output folders (NAME inside)")
    ap.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results, world = {}, 1
    for spec in args.runs.split(","):
        kind, strategy, steps, name, *rest = spec.split(":")
        trainer = run_one(kind, strategy, int(steps), os.path.join(args.root, name), int(rest[0]) if rest else 1)
        world = trainer.ctx.world_size
        if trainer.ctx.is_main:
            results[spec] = read_metrics(trainer.run.path)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "world_size": world}, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
