"""DPO ``prefix_sharing`` on two gloo ranks: under DDP and under FSDP2 (the policy, and the
separate reference sharded like it, run the shared-prefix row through the wrappers' forward) the
per-step metrics equal one process's padded run. One launch of two ranks and one of one process;
this file is also the worker they run."""

import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402

from tests.torchrun_launch import launch, main  # noqa: E402

MODEL = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2"
KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "logps/rejected",
        "entropy", "logits/chosen", "logits/rejected", "nll", "grad_norm"]


def _run(strategy: str, shared: bool, steps: int, out_dir: str):
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from rlhf_fast.trainers.sft import split_records

    train, ev = split_records(synthetic_preference_records(48, seed=0), 0.1, 0)
    cfg = DPOConfig(model=MODEL, output_dir=out_dir, device="cpu", batch_size=8, max_steps=steps, lr=5e-3,
                    warmup_steps=0, lr_schedule="constant", eval_every=0, log_every=1, save_every=0, max_len=48,
                    beta=0.5, rpo_alpha=0.3, prefix_sharing=shared, distributed=DistributedConfig(strategy=strategy))
    tr = DPOTrainer(cfg, train_records=train, eval_records=ev)
    tr.train()
    return tr


def worker(specs, root, out):
    from rlhf_fast.trainers.common import read_metrics

    results = {}
    for spec in specs:
        strategy, shared, steps = spec.split(":")
        tr = _run(strategy, shared == "shared", int(steps), os.path.join(root, spec.replace(":", "_")))
        if tr.ctx.is_main:
            results[spec] = {"log": read_metrics(tr.run.path), "world": tr.ctx.world_size}
    return results


def _launch(root, nproc, specs):
    return launch(__file__, root, nproc, specs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dpo_prefix"))
    two = _launch(root, 2, ["ddp:shared:2", "fsdp2:shared:2"])
    one = _launch(root, 1, ["none:padded:2"])
    return {**two, **one}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_with_prefix_sharing_match_one_padded_process(runs, strategy):
    two, one = runs[f"{strategy}:shared:2"], runs["none:padded:2"]
    assert two["world"] == 2 and one["world"] == 1
    for k in KEYS:
        a = [m[k] for m in two["log"] if k in m]
        b = [m[k] for m in one["log"] if k in m]
        assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-4, abs=1e-6), k


if __name__ == "__main__":
    main(worker)
