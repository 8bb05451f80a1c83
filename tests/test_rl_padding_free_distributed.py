"""RL ``ppo.padding_free`` on two gloo ranks: GRPO under DDP and PPO (a ValueModel critic on the
packed rows too) under FSDP2, micro-batches that split prompt groups; two steps log the metrics one
process logs and end with its weights (GRPO's policy, PPO's critic). One launch of two ranks and
one of one process; this file is also the worker they run."""

import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.torchrun_launch import launch, main  # noqa: E402

SPECS = {"grpo": "ddp", "gae": "fsdp2"}


def _run(spec: str, out_dir: str):
    """``spec`` ESTIMATOR:STRATEGY: two GRPO steps (grpo), or two PPO steps with a packed critic (gae)."""
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import make_policy
    from tests.test_rl_padding_free import PROMPTS
    from tests.test_rl_prefix_sharing_distributed import _reward

    estimator, strategy = spec.split(":")
    G = 4 if estimator == "grpo" else 2
    pol, tok = make_policy()
    cfg = RLConfig(estimator=estimator, steps=2, seed=0, output_dir=out_dir, progress=False, sample_every=0,
                   report_to="none",
                   rollout=RolloutConfig(prompts_per_step=4, group_size=G, max_new_tokens=8, per_sample_seeds=True,
                                         stop_strings=["a", "1", "x"]),
                   ppo=PPOConfig(epochs=2, mini_batch_size=2 * G, micro_batch_size=G // 2, padding_free=True),
                   kl=KLConfig(coef=0.05, placement="loss" if estimator == "grpo" else "reward"),
                   optim=OptimConfig(lr=5e-3, critic_lr=1e-2), distributed=DistributedConfig(strategy=strategy))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)
    assert estimator == "grpo" or tr._critic_shared
    tr.train()
    return tr


def worker(specs, root, out):
    import tests.test_rl_prefix_sharing_distributed as base

    base._run = _run  # the same worker, on padding-free runs
    return base.worker(specs, root, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rl_padding_free"))
    two = launch(__file__, root, 2, [f"{e}:{s}" for e, s in SPECS.items()])
    return {**two, **launch(__file__, root, 1, [f"{e}:none" for e in SPECS]), "root": root}


@pytest.mark.parametrize("estimator", list(SPECS))
def test_two_ranks_padding_free_match_one_process(runs, estimator):
    from tests.test_rl_prefix_sharing_distributed import KEYS

    strategy = SPECS[estimator]
    two, one = runs[f"{estimator}:{strategy}"], runs[f"{estimator}:none"]
    assert two["world"] == 2 and one["world"] == 1
    for k in KEYS[estimator]:
        a, b = [m[k] for m in two["log"] if k in m], [m[k] for m in one["log"] if k in m]
        assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-4, abs=1e-5), k
    wa = torch.load(os.path.join(runs["root"], f"{estimator}_{strategy}.pt"))
    wb = torch.load(os.path.join(runs["root"], f"{estimator}_none.pt"))
    assert wa.keys() == wb.keys()
    for k in wb:  # (AdamW's normalised step magnifies rounding near zero gradients)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)


if __name__ == "__main__":
    main(worker)
