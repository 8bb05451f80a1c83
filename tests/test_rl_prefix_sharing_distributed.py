"""RL ``ppo.prefix_sharing`` and ``ppo.padding_free`` on two gloo ranks. prefix_sharing under DDP
and under FSDP2 (the policy, and the reference sharded like it, run the shared-prefix rows through
the wrappers' forward; the group shuffle is over every rank's groups, blank micro-batches keep the
ranks in step): two GRPO steps log the metrics one process logs, and end with its weights; so do
two PPO steps whose critic (a ValueModel) runs on the shared rows too, ending with its critic.
padding_free (every forward one packed row): GRPO under DDP and PPO with a packed critic under
FSDP2, micro-batches that split prompt groups, the same comparison. One launch of two ranks and
one of one process; this file is also the worker they run."""

import json
import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.torchrun_launch import launch, main  # noqa: E402

KEYS = {
    "grpo": ["reward/total", "kl/seq", "kl/token", "advantages/mean", "response_length/mean", "policy/loss",
             "policy/approx_kl", "policy/clip_frac", "policy/kl", "policy/entropy", "policy/grad_norm",
             "policy/ratio_max"],
    "gae": ["reward/total", "advantages/mean", "returns/mean", "value/mean", "value/explained_variance",
            "policy/loss", "policy/grad_norm", "value/loss", "value/clip_frac"],
}
# the model whose final weights are compared: GRPO's policy, PPO's critic
COMPARED = {"grpo": "policy", "gae": "critic"}


def _reward(prompts, completions):
    return [float(sum(map(ord, c)) % 13) + 0.1 * len(c) for c in completions]


def _run(spec: str, out_dir: str):
    """``spec`` KEY:ESTIMATOR:STRATEGY, KEY the ``ppo`` switch under test (prefix_sharing or
    padding_free): two GRPO steps (grpo), or two PPO steps with a critic on the same rows (gae)."""
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import make_policy

    key, estimator, strategy = spec.split(":")
    G = 4 if estimator == "grpo" else 2
    if key == "prefix_sharing":
        from tests.test_rl_prefix_sharing import PROMPTS

        rollout, micro = dict(max_new_tokens=5), G
    else:  # prompts of 1 to ~40 tokens, answers cut by stop strings; micro-batches split the groups
        from tests.test_rl_padding_free import PROMPTS

        rollout, micro = dict(max_new_tokens=8, stop_strings=["a", "1", "x"]), G // 2
    pol, tok = make_policy()
    cfg = RLConfig(estimator=estimator, steps=2, seed=0, output_dir=out_dir, progress=False, sample_every=0,
                   report_to="none",
                   rollout=RolloutConfig(prompts_per_step=4, group_size=G, per_sample_seeds=True, **rollout),
                   ppo=PPOConfig(epochs=2, mini_batch_size=2 * G, micro_batch_size=micro, **{key: True}),
                   kl=KLConfig(coef=0.05, placement="loss" if estimator == "grpo" else "reward"),
                   optim=OptimConfig(lr=5e-3, critic_lr=1e-2), distributed=DistributedConfig(strategy=strategy))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)
    assert estimator == "grpo" or tr._critic_shared
    tr.train()
    return tr


def worker(specs, root, out):
    from rlhf_fast.distributed import full_state_dict, unwrap

    results = {}
    for spec in specs:
        folder = os.path.join(root, spec.replace(":", "_"))
        tr = _run(spec, folder)
        _, estimator, strategy = spec.split(":")
        model = getattr(tr, COMPARED[estimator])
        weights = full_state_dict(model, tr.ctx, strategy) or unwrap(model).state_dict()
        if tr.ctx.is_main:
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                log = [json.loads(ln) for ln in f]
            torch.save({k: v.detach().cpu() for k, v in weights.items()},
                       os.path.join(root, spec.replace(":", "_") + ".pt"))
            results[spec] = {"log": log, "world": tr.ctx.world_size}
    return results


# the two-rank runs of each switch: every estimator under both strategies for prefix_sharing, one
# strategy each for padding_free (its forwards go through the same wrappers)
TWO_RANKS = [f"prefix_sharing:{e}:{s}" for e in ("grpo", "gae") for s in ("ddp", "fsdp2")] + [
    "padding_free:grpo:ddp", "padding_free:gae:fsdp2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rl_prefix"))
    one = sorted({spec.rsplit(":", 1)[0] + ":none" for spec in TWO_RANKS})
    return {**launch(__file__, root, 2, TWO_RANKS), **launch(__file__, root, 1, one), "root": root}


@pytest.mark.parametrize("spec", TWO_RANKS)
def test_two_ranks_match_one_process(runs, spec):
    key_estimator, _ = spec.rsplit(":", 1)
    estimator = key_estimator.split(":")[1]
    two, one = runs[spec], runs[f"{key_estimator}:none"]
    assert two["world"] == 2 and one["world"] == 1
    for k in KEYS[estimator]:
        a, b = [m[k] for m in two["log"] if k in m], [m[k] for m in one["log"] if k in m]
        assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-4, abs=1e-5), k
    wa = torch.load(os.path.join(runs["root"], spec.replace(":", "_") + ".pt"))
    wb = torch.load(os.path.join(runs["root"], f"{key_estimator}:none".replace(":", "_") + ".pt"))
    assert wa.keys() == wb.keys()
    for k in wb:  # (AdamW's normalised step magnifies rounding near zero gradients)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)


if __name__ == "__main__":
    main(worker)
