"""Two gloo processes under torchrun give the same losses and weights as one process, for
SFT and the GRPO policy update, under DDP and FSDP2; a sharded checkpoint written by two
ranks resumes on one. (Each launch runs several configurations to keep process start-ups few.)"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "worker.py")
COMBOS = [f"{s}:{m}" for s in ("ddp", "fsdp2") for m in ("sft", "grpo")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, nproc, runs):
    out = str(tmp_path / f"{name}.json")
    cmd = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), WORKER]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--out", out, "--runs", ",".join(runs)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(out))
    return [(res["runs"][spec], torch.load(f"{out}.{i}.pt")) for i, spec in enumerate(runs)], res["world_size"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ck = str(tmp / "ck")
    one, _ = _run(tmp, "one", 1, ["none:sft", "none:grpo", "none:sft:3"])
    two, world = _run(tmp, "two", 2, COMBOS + [f"fsdp2:sft:2::{ck}"])
    resumed, _ = _run(tmp, "resumed", 1, [f"none:sft:1:{ck}"])
    return {"one": one, "two": two, "world": world, "resumed": resumed[0], "ck": ck}


def _close(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-6)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("i", range(len(COMBOS)), ids=COMBOS)
def test_two_ranks_match_one(runs, i):
    assert runs["world"] == 2
    mode = COMBOS[i].split(":")[1]
    one = runs["one"][0 if mode == "sft" else 1]
    _close(one, runs["two"][i])
    assert one[0][0] != one[0][-1]  # and training did something


def test_sharded_checkpoint_resumes_on_fewer_ranks(runs):
    ck = runs["ck"]
    assert os.path.isfile(os.path.join(ck, "extra.json")) and not os.path.exists(ck + ".tmp")
    straight = runs["one"][2]  # 3 uninterrupted steps on one process
    losses, weights = runs["resumed"]  # 2 steps on 2 ranks, saved, 1 step on one process
    assert losses[0] == pytest.approx(straight[0][2], rel=1e-4)
    for k in straight[1]:
        torch.testing.assert_close(weights[k], straight[1][k], rtol=1e-4, atol=1e-5, msg=k)
