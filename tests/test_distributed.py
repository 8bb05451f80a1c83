"""Two gloo processes under torchrun give the same losses and weights as one process, for
SFT and the GRPO policy update (also under activation checkpointing), under DDP and FSDP2;
sampling from an FSDP2 model (gathered for generation, ranks decoding for different numbers
of steps) gives one process's tokens; a sharded checkpoint written by two ranks resumes on
one. (Each launch runs several configurations to keep process start-ups few.)"""

import json
import os
import subprocess
import sys

import pytest
import torch
from tests.torchrun_launch import free_port  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "worker.py")
COMBOS = [f"{s}:{m}" for s in ("ddp", "fsdp2") for m in ("sft", "grpo", "grpo_ckpt")]
# sampling with per-sample seeds from an FSDP2 model (gathered for generation): llama takes
# the preallocated-KV decoder, gpt2 the generic transformers forward
GEN = ["fsdp2:gen_llama", "fsdp2:gen_gpt2"]


def _run(tmp_path, name, nproc, runs):
    out = str(tmp_path / f"{name}.json")
    cmd = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), WORKER]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--out", out, "--runs", ",".join(runs)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out))
    return ([(res["runs"][spec], torch.load(f"{out}.{i}.pt")) for i, spec in enumerate(runs)], res["world_size"],
            res["fast_calls"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ck = str(tmp / "ck")
    one, _, _ = _run(tmp, "one", 1, ["none:sft", "none:grpo", "none:sft:3"]
                  + [g.replace("fsdp2", "none") for g in GEN])
    two, world, fast_calls = _run(tmp, "two", 2, COMBOS + [f"fsdp2:sft:2::{ck}"] + GEN)
    resumed, _, _ = _run(tmp, "resumed", 1, [f"none:sft:1:{ck}"])
    return {"one": one, "two": two, "world": world, "resumed": resumed[0], "ck": ck, "fast_calls": fast_calls}


def _close(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-6)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("i", range(len(COMBOS)), ids=COMBOS)
def test_two_ranks_match_one(runs, i):
    assert runs["world"] == 2
    mode = COMBOS[i].split(":")[1]
    one = runs["one"][0 if mode == "sft" else 1]  # grpo_ckpt: activation checkpointing, the same numbers
    _close(one, runs["two"][i])
    assert one[0][0] != one[0][-1]  # and training did something
    # our Llama training forward ran inside DDP's / FSDP2's forward calls (the equality above
    # proves gathering and gradient reduction still happened)
    assert runs["fast_calls"][COMBOS[i]] > 0


@pytest.mark.parametrize("i", range(len(GEN)), ids=GEN)
def test_fsdp2_generation_matches_one_process(runs, i):
    one, two = runs["one"][3 + i], runs["two"][len(COMBOS) + 1 + i]
    _close(one, two)  # the same tokens and behaviour log-probs, row by row; the weights untouched
    assert one[0][-1] == float(GEN[i].endswith("llama"))  # which decode path ran
    lengths = one[0][1:-1:3]
    assert max(lengths[:4]) != max(lengths[4:])  # the two ranks decoded for different numbers of steps


def test_sharded_checkpoint_resumes_on_fewer_ranks(runs):
    ck = runs["ck"]
    assert os.path.isfile(os.path.join(ck, "extra.json")) and not os.path.exists(ck + ".tmp")
    straight = runs["one"][2]  # 3 uninterrupted steps on one process
    losses, weights = runs["resumed"]  # 2 steps on 2 ranks, saved, 1 step on one process
    assert losses[0] == pytest.approx(straight[0][2], rel=1e-4)
    for k in straight[1]:
        torch.testing.assert_close(weights[k], straight[1][k], rtol=1e-4, atol=1e-5, msg=k)


def _tiny_rl(strategy, **rollout):
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import PPOConfig, RLConfig, RolloutConfig

    cfg = RLConfig(steps=1, progress=False,
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, **rollout),
                   ppo=PPOConfig(mini_batch_size=4, micro_batch_size=2, trpo=True),
                   distributed=DistributedConfig(strategy=strategy))
    return RLTrainer(cfg, reward_fns=[lambda prompts, completions: [float(len(c)) for c in completions]])


def test_rl_per_sample_seeds_default_and_what_is_refused(monkeypatch):
    """FSDP2 and the TRPO line search are accepted (tests/test_distributed_trainers.py runs
    them on two ranks); per-sample seeds are on by default exactly when a strategy is set
    (so a one-process run of that strategy samples what N ranks sample); strategy "none"
    under torchrun is still refused (every rank would train its own copy)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _tiny_rl("fsdp2").per_sample_seeds and _tiny_rl("ddp").per_sample_seeds
    assert not _tiny_rl("none").per_sample_seeds
    assert not _tiny_rl("ddp", per_sample_seeds=False).per_sample_seeds
    assert _tiny_rl("none", per_sample_seeds=True).per_sample_seeds
    t = _tiny_rl("none", per_sample_seeds=True)
    assert t.step()["reward/total"] > 0  # a whole step on the per-sample path
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="strategy"):
        _tiny_rl("none")


def test_gathered_params_leaves_unsharded_models_alone():
    from rlhf_fast.distributed import fsdp_units, gathered_params, reshard
    from rlhf_fast.models.tiny import tiny_causal_lm

    m = tiny_causal_lm(96, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert fsdp_units(m) == []
    with gathered_params(m) as gathered:
        assert gathered is False
    reshard(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_strategy_without_torchrun_says_it_trains_on_one_process(monkeypatch, capsys):
    """``distributed.strategy: ddp|fsdp2`` without torchrun's environment runs one process (the
    same numbers as its N-rank run), with one line saying so rather than silently."""
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.sft import setup_distributed

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx, device = setup_distributed(DistributedConfig(strategy="fsdp2"), "cpu")
    assert ctx.world_size == 1 and device.type == "cpu"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'fsdp2'" in err[0] and "not started by torchrun" in err[0] and "one process" in err[0]
    setup_distributed(DistributedConfig(strategy="none"), "cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: what was asked for
    setup_distributed(DistributedConfig(strategy="ddp"), "cpu")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("field,value", [("timeout_s", 0), ("timeout_s", float("nan")), ("timeout_s", "10"),
                                         ("timeout_s", True), ("mixed_precision", "yes"),
                                         ("offload_reference", 1)])
def test_distributed_config_refuses_bad_values(field, value):
    from rlhf_fast.distributed import DistributedConfig

    with pytest.raises(ValueError, match=f"distributed.{field} must be"):
        DistributedConfig(**{field: value})


def test_sharded_checkpoint_is_complete_when_it_appears_and_leftovers_are_pruned(tmp_path, recwarn):
    """One process, strategy ddp (sharded format): the checkpoint folder holds COMPLETE from the
    moment it is renamed into place (it was written after the rename: a crash in between left
    a folder resume skipped), re-saving a step replaces it whole, DCP's "assuming a single
    process" warning is not repeated at every save, and what an interrupted sharded save left
    (step_N.tmp / step_N.old, a model copy each) is removed by the next prune."""
    from rlhf_fast.distributed import DistContext, save_sharded
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers.checkpoint import latest_checkpoint, prune_checkpoints

    m = tiny_causal_lm(96, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    ck = tmp_path / "checkpoints" / "step_00000001"
    calls = []
    import rlhf_fast.distributed as d

    real = d.os.replace

    def spy(src, dst):
        calls.append(os.path.isfile(os.path.join(src, "COMPLETE")) if os.path.isdir(src) else None)
        return real(src, dst)

    d.os.replace = spy
    try:
        save_sharded(str(ck), m, None, DistContext(), extra={"step": 1}, complete_marker=True)
        save_sharded(str(ck), m, None, DistContext(), extra={"step": 1}, complete_marker=True)
    finally:
        d.os.replace = real
    assert calls[0] is True and calls[-1] is True  # COMPLETE inside before the folder appears
    assert latest_checkpoint(str(tmp_path)) == str(ck)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001"]
    assert not [w for w in recwarn if "torch.distributed is disabled" in str(w.message)]
    for junk in ("step_00000002.tmp", "step_00000001.old"):
        (tmp_path / "checkpoints" / junk).mkdir()
        (tmp_path / "checkpoints" / junk / "__0_0.distcp").write_bytes(b"x")
    prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001"]
