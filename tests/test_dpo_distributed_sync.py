"""TR-DPO's moving reference on two gloo ranks: under FSDP2 the reference is sharded like the
policy and mixed shard by shard (no communication), under DDP each rank mixes its full copy;
both give one process's per-step metrics and final reference. A two-rank FSDP2 run stopped at
step 2 (its sharded reference saved with the checkpoint) and resumed on two ranks equals the
uninterrupted run. One launch of two ranks and one of one process; this file is also the
worker they run."""

import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.torchrun_launch import launch, main  # noqa: E402

MODEL = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2"
KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "logps/rejected",
        "grad_norm"]


def _run(strategy: str, steps: int, out_dir: str):
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from rlhf_fast.trainers.sft import split_records

    train, ev = split_records(synthetic_preference_records(48, seed=0), 0.1, 0)
    # a sync after every step, half-way: the reference moves a lot, so a rank that mixed the
    # wrong shard (or the wrong policy) could not match one process
    cfg = DPOConfig(model=MODEL, output_dir=out_dir, device="cpu", batch_size=8, max_steps=steps, lr=5e-3,
                    warmup_steps=0, lr_schedule="constant", eval_every=0, log_every=1, save_every=0, max_len=48,
                    beta=0.5, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
                    distributed=DistributedConfig(strategy=strategy))
    tr = DPOTrainer(cfg, train_records=train, eval_records=ev)
    before = _full(tr.reference)
    tr.train()
    return tr, before


def _full(model):
    """The full state dict (under FSDP2 every rank takes part; each gets it here)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}  # (one process: views of the live parameters)


def worker(specs, root, out):
    from rlhf_fast.trainers.common import read_metrics

    results = {}
    for spec in specs:
        strategy, steps, name = spec.split(":")
        tr, before = _run(strategy, int(steps), os.path.join(root, name))
        ref = _full(tr.reference)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in tr.reference.parameters())
        if tr.ctx.is_main:
            torch.save(ref, os.path.join(root, name + ".ref.pt"))
            results[spec] = {"log": read_metrics(tr.run.path), "world": tr.ctx.world_size,
                             "ref_moved": any(not torch.equal(before[k], ref[k]) for k in ref),
                             "ref_local_fraction": local / sum(p.numel() for p in tr.reference.parameters())}
    return results


def _launch(root, nproc, specs):
    return launch(__file__, root, nproc, specs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dpo_sync"))
    # fsdp2:2:resumed first runs 2 steps, its checkpoint (the sharded reference too) at the end;
    # fsdp2:3:resumed then goes on in the same folder to step 3
    two = _launch(root, 2, ["fsdp2:3:fsdp2", "ddp:3:ddp", "fsdp2:2:resumed", "fsdp2:3:resumed"])
    one = _launch(root, 1, ["none:3:one"])
    return root, {**two, **one}


def _ref(root, name):
    return torch.load(os.path.join(root, name + ".ref.pt"))


@pytest.mark.parametrize("name", ["fsdp2", "ddp"])
def test_moving_reference_two_ranks_match_one(runs, name):
    root, r = runs
    two, one = r[f"{name}:3:{name}"], r["none:3:one"]
    assert two["world"] == 2 and one["world"] == 1
    if name == "fsdp2":  # each rank holds (about) half of the reference
        assert 0.3 < two["ref_local_fraction"] < 0.7
    for k in KEYS:
        a = [m[k] for m in two["log"] if k in m]
        b = [m[k] for m in one["log"] if k in m]
        assert len(a) == len(b) == 3 and a == pytest.approx(b, rel=1e-4, abs=1e-6), k
    ra, rb = _ref(root, name), _ref(root, "one")
    assert ra.keys() == rb.keys()
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], rtol=1e-4, atol=1e-5, msg=k)
    assert two["ref_moved"] and one["ref_moved"]


def test_sharded_moving_reference_resumes_exactly(runs):
    root, r = runs
    straight, resumed = r["fsdp2:3:fsdp2"], r["fsdp2:3:resumed"]
    assert [m["step"] for m in resumed["log"]][-1] == 3
    assert os.path.isdir(os.path.join(root, "resumed", "checkpoints", "reference_step_00000002"))
    late = lambda log: [{k: m[k] for k in KEYS} for m in log if m["step"] == 3]  # noqa: E731
    assert late(resumed["log"]) == late(straight["log"])
    ra, rb = _ref(root, "resumed"), _ref(root, "fsdp2")
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


if __name__ == "__main__":
    main(worker)
