"""SDPO under ``torchrun`` with 2 gloo ranks (DDP with the EMA teacher; FSDP2 with the live, the
EMA and the base one, the last two copied from the policy before FSDP2 shards it, then sharded
like it) equals one process: every logged number (the GRPO and self-distillation losses, TRL's
reward diagnostics of the whole batch and the teacher builder's fractions), the policy's and the
EMA teacher's weights and the teacher's step count in the checkpoint. Each rank reprompts its own
whole groups; the distillation loss is divided by the answers of the whole mini-batch, so the sum
over ranks is one process's loss."""

import json
import os

import pytest
import torch

from rlhf_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

COMMON = ["none", "--progress", "false", "--reward.functions", "tests.test_rl_learning:frac_a",
          "--rollout.max_new_tokens", "4", "--rollout.per_sample_seeds", "true", "--rollout.prompts_per_step", "4",
          "--ppo.epochs", "2", "--ppo.mini_batch_size", "8", "--ppo.micro_batch_size", "2", "--sample_every", "0",
          "--optim.lr", "0.01", "--kl.coef", "0", "--sdpo.distillation_weight", "0.5",
          "--sdpo.success_reward_threshold", "0.1"]


def _rows(run):
    return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per", "step_time"))}
            for ln in open(os.path.join(run, "metrics.jsonl"))]


def _ckpt(run, parts):
    from safetensors.torch import load_file

    from rlhf_fast.trainers.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run)
    with open(os.path.join(ck, "extra.json")) as f:
        extra = json.load(f)
    weights = {}
    for part in parts:
        if os.path.isdir(os.path.join(ck, "models")):  # one process: a model folder
            sd = load_file(os.path.join(ck, "models", part, "model.safetensors"))
            weights[part] = {k.removeprefix("module."): v for k, v in sd.items()}  # (the teacher's wrapper)
        else:  # torchrun: a distributed checkpoint of every rank
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(os.path.join(ck, part), os.path.join(run, f"{part}.pt"))
            weights[part] = torch.load(os.path.join(run, f"{part}.pt"))["model"]
    return weights, extra.get("sdpo_teacher")


TOPK = ["--sdpo.distillation_mode", "topk_logits", "--sdpo.distillation_topk", "5"]


@pytest.mark.parametrize("strategy,steps,sdpo", [
    ("ddp", 2, ["--sdpo.teacher_model_kind", "ema", "--sdpo.teacher_update_rate", "0.25"]),
    # the live teacher is the policy itself; the logit mode reads its sharded LM head
    ("fsdp2", 1, ["--sdpo.teacher_model_kind", "live", *TOPK]),
    # the EMA teacher sharded like the policy: each rank's shards move; the logit mode's backward
    # recomputes from the teacher's head after the teacher is resharded
    ("fsdp2", 2, ["--sdpo.teacher_model_kind", "ema", "--sdpo.teacher_update_rate", "0.25", *TOPK]),
    ("fsdp2", 1, ["--sdpo.teacher_model_kind", "base"]),  # (sampled_token)
], ids=["ddp-ema", "fsdp2-live", "fsdp2-ema", "fsdp2-base"])
def test_two_ranks_match_one_process(tmp_path, strategy, steps, sdpo):
    from tests.torchrun_launch import torchrun

    args = [*COMMON, "--steps", str(steps), *sdpo]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(["sdpo", *args, "--output_dir", one]) == 0
    r = torchrun(["-m", "rlhf_fast.cli"], "sdpo", *args, "--output_dir", two, "--distributed.strategy", strategy)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == steps
    # a step that distils, with rows without a teacher context too, and unequal rewards
    assert any(0 < r["self_distillation/reprompt_sample_fraction"] < 1 for r in a)
    assert a[-1]["self_distillation/distillation_loss"] != 0 and a[-1]["self_distillation/reward_std"] > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k
    ema = "ema" in sdpo
    parts = ("policy", "teacher") if ema else ("policy",)  # (only an EMA teacher is checkpointed)
    (wa, sa), (wb, sb) = _ckpt(one, parts), _ckpt(two, parts)
    assert sa == sb == {"optimizer_steps": 4 * steps}  # per step: 2 epochs × 2 mini-batches
    for part in parts:
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            # Adam's steps on near-zero gradients turn their float rounding into ~1e-5 (8 steps, lr 1e-2)
            torch.testing.assert_close(wa[part][k], wb[part][k], rtol=1e-4, atol=5e-5)
    if ema:  # the teacher moved, and is not the policy
        assert any(not torch.equal(wa["teacher"][k], wa["policy"][k]) for k in wa["policy"] if k in wa["teacher"])
