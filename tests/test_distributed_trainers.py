"""The SFT and reward trainers under torchrun: two gloo processes give the same per-step losses,
eval metrics and final weights as one process on the same global batch and seed (SFT under DDP
and FSDP2, with and without gradient accumulation; reward under DDP and FSDP2), a sharded SFT
checkpoint written by two ranks resumes on one process as if the run had never stopped.
The RL trainer under DDP: GRPO updates on a fixed global rollout batch match one process;
whole GRPO and PPO steps (sampling differs per rank) keep the replicas identical, log once
and write sharded checkpoints that one process resumes.
Two launches in all (one of two ranks, one of one process) to keep start-ups few."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "trainer_worker.py")
# (2-rank spec, the 1-process spec it must match)
PAIRS = [
    ("sft:ddp:3:sft_ddp", "sft:none:3:sft_one"),
    ("sft:fsdp2:3:sft_fsdp2", "sft:none:3:sft_one"),
    ("sft:ddp:2:sft_ddp_ga:2", "sft:none:2:sft_one_ga:2"),
    ("reward:ddp:3:rw_ddp", "reward:none:3:rw_one"),
    ("reward:fsdp2:3:rw_fsdp2", "reward:none:3:rw_one"),
]
SAVE = "sft:fsdp2:2:resume"  # 2 steps on 2 ranks, sharded checkpoint at the end
RESUME = "sft:none:3:resume"  # the same folder on one process: resumes at step 2, runs step 3
RL_UPDATE = ("grpo_update:ddp:3:rlu_ddp", "grpo_update:none:3:rlu_one")
RL_RUNS = ["grpo:ddp:2:rl_grpo", "gae:ddp:2:rl_ppo"]
RL_RESUME = "grpo_resume:none:3:rl_grpo"  # one process continues the 2-rank GRPO run to step 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root, name, nproc, runs):
    out = os.path.join(root, f"{name}.json")
    cmd = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), WORKER]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd + ["--runs", ",".join(runs), "--root", root, "--out", out], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.load(open(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist_trainers"))
    two = _launch(root, "two", 2, [p[0] for p in PAIRS] + [SAVE, RL_UPDATE[0]] + RL_RUNS)
    one = _launch(root, "one", 1, sorted({p[1] for p in PAIRS}) + [RESUME, RL_UPDATE[1], RL_RESUME])
    assert two["world_size"] == 2 and one["world_size"] == 1
    return {"root": root, **two["runs"], **one["runs"]}


def _series(records, key):
    return [(r["step"], r[key]) for r in records if key in r]


def _weights(root, spec):
    from safetensors.torch import load_file

    return load_file(os.path.join(root, spec.split(":")[3], "final", "model.safetensors"))


@pytest.mark.parametrize("pair", PAIRS, ids=[p[0] for p in PAIRS])
def test_two_ranks_match_one(runs, pair):
    two, one = runs[pair[0]], runs[pair[1]]
    for key in ("loss", "eval_loss", "eval_accuracy"):
        a, b = _series(two, key), _series(one, key)
        assert [s for s, _ in a] == [s for s, _ in b], key
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4, abs=1e-6), key
    losses = [v for _, v in _series(one, "loss")]
    assert len(losses) >= 2 and losses[0] != losses[-1]  # and training did something
    assert runs[pair[0] + "|in_sync"]  # DDP replicas end bit-identical
    wa, wb = _weights(runs["root"], pair[0]), _weights(runs["root"], pair[1])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_only_rank0_writes_and_config_has_strategy(runs):
    folder = os.path.join(runs["root"], "sft_fsdp2")
    lines = open(os.path.join(folder, "metrics.jsonl")).read().splitlines()
    assert len(lines) == len(runs[PAIRS[1][0]])  # one writer: no duplicated records
    assert "strategy: fsdp2" in open(os.path.join(folder, "config.yaml")).read()


def test_sharded_checkpoint_resumes_on_one_process(runs):
    ck = os.path.join(runs["root"], "resume", "checkpoints", "step_00000002")
    assert os.path.isfile(os.path.join(ck, ".metadata")) and os.path.isfile(os.path.join(ck, "COMPLETE"))
    assert not os.path.exists(ck + ".tmp")
    straight, resumed = runs["sft:none:3:sft_one"], runs[RESUME]
    # the resumed log keeps the 2-rank run's records up to step 2 (its end-of-run eval too)
    loss_s, loss_r = dict(_series(straight, "loss")), dict(_series(resumed, "loss"))
    assert sorted(loss_r) == sorted(loss_s) == [1, 2, 3]
    assert [loss_r[k] for k in (1, 2, 3)] == pytest.approx([loss_s[k] for k in (1, 2, 3)], rel=1e-4)
    assert dict(_series(resumed, "eval_loss"))[3] == pytest.approx(dict(_series(straight, "eval_loss"))[3], rel=1e-4)
    wa, wb = _weights(runs["root"], RESUME), _weights(runs["root"], "sft:none:3:sft_one")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_rl_update_two_ranks_match_one(runs):
    two, one = runs[RL_UPDATE[0]], runs[RL_UPDATE[1]]
    for key in ("grad_norm", "loss", "approx_kl"):  # grad_norm: the all-reduced gradient itself
        assert [v for _, v in _series(two, key)] == pytest.approx([v for _, v in _series(one, key)], rel=1e-4, abs=1e-6)
    assert runs[RL_UPDATE[0] + "|in_sync"]
    wa = torch.load(os.path.join(runs["root"], "rlu_ddp.weights.pt"))
    wb = torch.load(os.path.join(runs["root"], "rlu_one.weights.pt"))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    losses = [v for _, v in _series(one, "loss")]
    assert losses[0] != losses[-1]


@pytest.mark.parametrize("spec", RL_RUNS)
def test_rl_steps_under_ddp(runs, spec):
    folder = os.path.join(runs["root"], spec.split(":")[3])
    if spec == RL_RUNS[0]:
        recs = [r for r in runs[spec]]  # this folder was resumed later: read the 2-rank records
    else:
        recs = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2]  # rank 0 alone logs
    assert all(r["reward/total"] == r["reward/total"] for r in recs)  # finite (not NaN)
    assert runs[spec + "|in_sync"]
    ck = os.path.join(folder, "checkpoints", "step_00000002")
    assert os.path.isfile(os.path.join(ck, "policy", ".metadata")) and os.path.isfile(os.path.join(ck, "COMPLETE"))
    if spec.startswith("gae"):
        assert os.path.isfile(os.path.join(ck, "critic", ".metadata"))
        assert os.path.isdir(os.path.join(folder, "final", "critic"))
    assert os.path.isfile(os.path.join(folder, "final", "policy", "config.json"))


def test_rl_sharded_checkpoint_resumes_on_one_process(runs):
    two, resumed = runs[RL_RUNS[0]], runs[RL_RESUME]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(two, resumed[:2]):  # the log up to the checkpoint is kept as it was
        assert a["policy/loss"] == b["policy/loss"]
    assert resumed[2]["policy/loss"] == resumed[2]["policy/loss"]
