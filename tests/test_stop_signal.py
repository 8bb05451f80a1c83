"""A stop signal (SIGTERM, SIGUSR1: what Slurm, Kubernetes and torchrun send before a kill)
ends a training run at the end of its step with a checkpoint, and the resumed run equals an
uninterrupted one: in-process for SFT and RL, through the CLI in a subprocess (exit 128 +
signal, one line), and on two torchrun ranks of which only one got the signal."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.trainers.checkpoint import latest_checkpoint
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.stop import StopOnSignal, TrainingStopped
from tests.test_sft import TINY, _cfg, tok  # noqa: F401 (the tokenizer fixture)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_the_handler_notes_the_signal_and_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # noted, not fatal
        assert stop.signum == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    e = TrainingStopped(signal.SIGTERM, 7, "runs/x", "--resume runs/x")
    assert str(e) == "stopped by SIGTERM at step 7; checkpoint saved in runs/x; continue with --resume runs/x"


@pytest.mark.parametrize("error", [ValueError, TrainingStopped, None])
def test_a_signal_noted_while_the_run_fails_takes_its_usual_effect(error):
    """A stop signal noted inside the block, then an error (a collective that lost the peer
    torchrun is stopping): on exit the signal goes to the handler that was there before (by
    default: the process ends, quietly). Not after TrainingStopped (the stop was honoured) nor
    after a clean exit (the trainer read the signal and stopped)."""
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(error or ()) if error else contextlib.nullcontext():
            with StopOnSignal() as stop:
                os.kill(os.getpid(), signal.SIGUSR1)
                assert stop.signum == signal.SIGUSR1 and seen == []
                if error is TrainingStopped:
                    raise TrainingStopped(signal.SIGUSR1, 1, "run", "resume")
                if error is not None:
                    raise error("lost its peer")
        assert seen == ([signal.SIGUSR1] if error is ValueError else [])
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sft_stops_at_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, tok):  # noqa: F811
    from rlhf_fast.trainers.sft import SFTTrainer, synthetic_sft_records

    recs = synthetic_sft_records(40)

    def trainer(name, signal_at=None):
        t = SFTTrainer(_cfg(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_every=4),
                       train_records=recs, eval_records=[], tokenizer=tok)
        if signal_at is not None:
            step = t.train_step

            def signalled():  # the signal arrives in the middle of a step
                if t.step + 1 == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return step()

            t.train_step = signalled
        return t

    full = trainer("full")
    full.train()
    stopped = trainer("stopped", signal_at=3)
    with pytest.raises(TrainingStopped) as e:
        stopped.train()
    assert e.value.step == 3 and e.value.signum == signal.SIGTERM
    run = str(tmp_path / "stopped")
    assert latest_checkpoint(run).endswith("step_00000003")  # saved though save_every is 4
    assert not os.path.exists(os.path.join(run, "final"))
    resumed = trainer("stopped")
    resumed.train()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [m["loss"] for m in read_metrics(str(tmp_path / "full"))] == [m["loss"] for m in read_metrics(run)]


def test_rl_stops_at_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path):
    from rlhf_fast.trainers.rl import RLTrainer
    from tests.test_rl_learning import PROMPTS, frac_a
    from tests.test_rl_trainer import _trainer

    calls = []

    def signalling(prompts, completions):  # frac_a, with SIGTERM during the 2nd step's scoring
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return frac_a(prompts, completions)

    signalling.__name__ = "frac_a"  # the same metric names as the uninterrupted run
    a = _trainer(tmp_path / "a", steps=4, save_every=0)
    a.train()
    b = _trainer(tmp_path / "b", reward_fns=(signalling,), steps=4, save_every=0)
    with pytest.raises(TrainingStopped) as e:
        b.train()
    out = b.config.output_dir
    assert e.value.step == 2 and f"--resume {out}" in str(e.value)
    assert latest_checkpoint(out).endswith("step_00000002") and not os.path.exists(os.path.join(out, "final"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone
    cfg = b.config
    cfg.resume = out
    from tests.test_rl_learning import make_policy

    pol, tk = make_policy()
    c = RLTrainer(cfg, pol, tk, reward_fns=[frac_a], prompts=PROMPTS)
    c.train()
    assert os.path.isdir(os.path.join(out, "final"))

    def rows(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per"))} for ln in f]

    assert rows(a.config.output_dir) == rows(out)
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def _sft_config(tmp_path, steps):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n"
                            for w in ["yes", "no", "cat", "dog", "sun", "sky", "one", "two"]))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: '{TINY}'\ndata: {data}\nmax_steps: {steps}\nbatch_size: 2\neval_fraction: 0\n"
                   "save_every: 0\nlog_every: 1\n")
    return cfg


def _wait_for_first_step(proc, run):
    """Until the run has logged a step (its loop, and so its handler, is running)."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(run, "metrics.jsonl")) and read_metrics(run):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step logged (exit code {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")


def test_cli_exits_128_plus_the_signal_with_one_line(tmp_path):
    run = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_fast.cli", "sft", str(_sft_config(tmp_path, 100000)),
                             "--output_dir", run], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_first_step(proc, run)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.splitlines() if ln.startswith("rlhf-fast")]
    assert len(lines) == 1 and lines[0].startswith("rlhf-fast sft: stopped by SIGTERM at step "), err
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert "continue with the same command" in lines[0]
    assert latest_checkpoint(run).endswith(f"step_{step:08d}")
    assert read_metrics(run)[-1]["step"] == step


def test_main_reports_a_stop_as_one_line(monkeypatch, capsys):
    import rlhf_fast.env_report

    def stopped(args):
        raise TrainingStopped(signal.SIGUSR1, 5, "runs/r", "--resume runs/r")

    monkeypatch.setattr(rlhf_fast.env_report, "run", stopped)
    assert cli.main(["env"]) == 128 + signal.SIGUSR1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf-fast env: stopped by SIGUSR1 at step 5; checkpoint saved in runs/r; continue with "
                   "--resume runs/r"]


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _rank_of(pid):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_stop_together_when_one_is_signalled(tmp_path, strategy):
    """SIGUSR1 to rank 1 alone: both ranks end the same step and save it (a rank that went on
    alone would hang in the next collective)."""
    from tests.torchrun_launch import free_port

    run = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                             "-m", "rlhf_fast.cli", "sft", str(_sft_config(tmp_path, 100000)), "--output_dir", run,
                             "--distributed.strategy", strategy, "--distributed.timeout_s", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _wait_for_first_step(proc, run)
        rank1 = [p for p in _children(proc.pid) if _rank_of(p) == 1]
        assert len(rank1) == 1, _children(proc.pid)
        os.kill(rank1[0], signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        try:  # torchrun and its ranks, whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # all gone already
            pass
    assert proc.returncode != 0  # torchrun reports the workers' exit code 138 as a failure
    lines = [ln for ln in err.splitlines() if ln.startswith("rlhf-fast")]
    assert len(lines) == 1 and "stopped by SIGUSR1 at step " in lines[0], err
    step = int(lines[0].split("at step ")[1].split(";")[0])
    ck = latest_checkpoint(run)
    assert ck.endswith(f"step_{step:08d}") and os.path.isfile(os.path.join(ck, "COMPLETE"))
    assert err.count("exitcode  : 138") == 2, err  # both ranks: 128 + SIGUSR1


def test_a_stopped_demo_says_it_starts_afresh(monkeypatch, capsys):
    import rlhf_fast.demo.pipeline

    def stopped(cfg):
        raise TrainingStopped(signal.SIGTERM, 3, "runs/demo/sft", "the same command")

    monkeypatch.setattr(rlhf_fast.demo.pipeline, "run", stopped)
    assert cli.main(["demo", "--quick", "--no-progress"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf-fast demo: stopped by SIGTERM at step 3; checkpoint saved in runs/demo/sft; continue with "
                   "a new `rlhf-fast demo` (a demo starts afresh)"]
