"""The two-gloo-rank half of tests/test_rl_clip_extremes.py and tests/test_rl_gmpo_clip_extremes.py:
two GRPO steps of each loss (the default fused ``clip``; ``gmpo``) on two ranks (DDP) and in one
process, all from one torchrun launch and one plain one shared by both files (~15 s a launch on 2
cores). This file is also the ranks' worker: ``--runs LOSS:STRATEGY,...``."""

import json
import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402

from tests.torchrun_launch import launch, main  # noqa: E402

# the ppo keys of each loss's run; mini-batches of 4 rows (on two ranks a rank may hold none of one)
LOSSES = {"clip": dict(clip_low=0.02, clip_high=0.01),
          "gmpo": dict(policy_loss="gmpo", agg="seq-mean-token-mean", clip_low=0.05, clip_high=0.02)}
_RUNS = {}  # "loss:strategy" -> {"log", "world"}, filled by the first test that asks


def _run(spec: str, out_dir: str):
    """Two GRPO steps of ``spec`` ("loss:strategy")."""
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import make_policy
    from tests.test_rl_prefix_sharing import PROMPTS
    from tests.test_rl_prefix_sharing_distributed import _reward

    loss, strategy = spec.split(":")
    pol, tok = make_policy()
    cfg = RLConfig(estimator="grpo", steps=2, seed=0, output_dir=out_dir, progress=False, sample_every=0,
                   report_to="none",
                   rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=5, per_sample_seeds=True),
                   ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=2, **LOSSES[loss]),
                   kl=KLConfig(coef=0.05, placement="loss"), optim=OptimConfig(lr=5e-3),
                   distributed=DistributedConfig(strategy=strategy))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)
    tr.train()
    return tr


def worker(specs, root, out):
    results = {}
    for spec in specs:
        folder = os.path.join(root, spec.replace(":", "_"))
        tr = _run(spec, folder)
        if tr.ctx.is_main:
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                results[spec] = {"log": [json.loads(ln) for ln in f], "world": tr.ctx.world_size}
    return results


def check_two_ranks_log_one_process_extremes(tmp_path_factory, loss: str) -> None:
    """``loss``'s run on two ranks logs the clip extremes, clip fraction and loss of one process."""
    if not _RUNS:  # every loss at once: the second file's test reuses the launches
        root = str(tmp_path_factory.mktemp("clip_extremes_ddp"))
        two = launch(__file__, root, 2, [f"{k}:ddp" for k in LOSSES])
        _RUNS.update({**two, **launch(__file__, root, 1, [f"{k}:none" for k in LOSSES])})
    two, one = _RUNS[f"{loss}:ddp"], _RUNS[f"{loss}:none"]
    assert two["world"] == 2 and one["world"] == 1
    for k in ("policy/clip_low_min", "policy/clip_high_max", "policy/clip_frac", "policy/loss"):
        a, b = [m[k] for m in two["log"] if k in m], [m[k] for m in one["log"] if k in m]
        assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-4, abs=1e-6), (k, a, b)
    assert any(m["policy/clip_high_max"] > 0 for m in one["log"])


if __name__ == "__main__":
    main(worker)
