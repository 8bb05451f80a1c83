"""Evaluation during RL training (``eval_every``, ``data.eval_*``, ``eval.*``; TRL GRPOTrainer's
eval_strategy / num_generations_eval): the metrics against ``rlhf-fast eval``'s
evaluate_policy and against the recorded answers, the seeding per answer (no batching or rank
count changes them), the held-out split, a run with evaluation on trains bit for bit as one
with it off (a reward that draws from every random stream), resume, the config errors; and two
gloo ranks against one process (this file is also the torchrun worker)."""

import json
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as the torchrun worker: tests/ itself must not shadow packages (tests/triton)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [os.path.dirname(HERE)]

import numpy as np
import pytest
import torch

from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import DataConfig, EvalConfig, PPOConfig, RLConfig, RolloutConfig

from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy  # noqa: E402
from tests.torchrun_launch import free_port  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = ["q: a", "x y", "0 1", "a"]


def n_chars(prompts, completions):
    """A dense reward: answers rarely tie."""
    return [float(len(c)) for c in completions]


def noisy(prompts, completions):
    """A reward drawing from torch's, random's and numpy's global streams: an evaluation that
    left them moved would change every later training reward."""
    return [len(c) + 1e-3 * (float(torch.rand(())) + random.random() + float(np.random.rand())) for c in completions]


def _trainer(tmp_path, rewards=(n_chars,), eval_prompts=None, **kw):
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    kw.setdefault("ppo", PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8))
    cfg = make_config(tmp_path, "grpo", **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=list(rewards), prompts=PROMPTS, eval_prompts=eval_prompts)


def _rows(run, drop=("time/", "tokens_per")):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith(drop)} for ln in f]


def test_metrics_are_evaluate_policys(tmp_path):
    """Greedy, one answer per prompt: the reward, per-source and length means of ``rlhf-fast
    eval``'s evaluate_policy on the same policy; evaluating moves no training state."""
    from rlhf_fast.trainers.evaluate import evaluate_policy

    tr = _trainer(tmp_path, rewards=(n_chars, frac_a), steps=1, eval_prompts=EVAL)
    tr.step()  # not the initial policy
    pos, step = tr.prompt_pos, tr.global_step
    m = tr.evaluate()
    want = evaluate_policy(tr.policy, tr.tokenizer, EVAL, tr.reward, max_new_tokens=5, temperature=0.0, n=1)
    assert sorted(m) == ["eval/response_length", "eval/reward/frac_a", "eval/reward/n_chars", "eval/reward/total"]
    assert m["eval/reward/total"] == pytest.approx(want["reward/mean"], rel=1e-6)
    assert m["eval/reward/n_chars"] == pytest.approx(want["reward/n_chars"], rel=1e-6)
    assert m["eval/reward/frac_a"] == pytest.approx(want["reward/frac_a"], rel=1e-6, abs=1e-9)
    assert m["eval/response_length"] == pytest.approx(want["length/mean"])
    assert m["eval/reward/total"] > 0
    assert (tr.prompt_pos, tr.global_step) == (pos, step) and tr.evaluate() == m  # greedy: the same again


def test_groups_are_seeded_per_answer(tmp_path):
    """group_size 3 sampled at temperature 1: the metrics are those of the answers the reward
    saw (the mean unbiased std of each prompt's three totals), and do not depend on how many
    prompts a generate call takes (a larger rollout batch: fewer calls)."""
    seen = []

    def record(prompts, completions):
        seen.append((list(prompts), list(completions)))
        return n_chars(prompts, completions)

    ev = EvalConfig(group_size=3, temperature=1.0)
    tr = _trainer(tmp_path / "a", rewards=(record,), eval_prompts=EVAL, eval=ev,
                  rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=5),
                  ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    m = tr.evaluate()
    assert len(seen) == 4  # a rollout's 4 rows per call: one prompt of 3 answers per call
    prompts = [p for ps, _ in seen for p in ps]
    comps = [c for _, cs in seen for c in cs]
    assert prompts == [p for p in EVAL for _ in range(3)]
    totals = torch.tensor(n_chars(prompts, comps), dtype=torch.float64)
    assert m["eval/reward/total"] == pytest.approx(float(totals.mean()), rel=1e-9)
    std = totals.view(4, 3).std(dim=1)
    assert float(std.mean()) > 0 and m["eval/reward_std"] == pytest.approx(float(std.mean()), rel=1e-9)
    # every prompt in one call (a rollout batch of 16 rows): the same answers
    seen.clear()
    tr2 = _trainer(tmp_path / "b", rewards=(record,), eval_prompts=EVAL, eval=ev,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=5))
    assert tr2.evaluate() == pytest.approx(m, rel=1e-9) and len(seen) == 1
    assert seen[0][1] == comps


def test_evaluation_changes_nothing_of_training(tmp_path):
    """eval_every 1 (a held-out fifth of the prompts, two sampled answers each, a reward that
    draws from every random stream) against eval_every 0: the same training metrics, samples
    and weights, bit for bit; the evaluation's keys at every step and only there."""
    runs = []
    for name, every in (("on", 1), ("off", 0)):
        tr = _trainer(tmp_path / name, rewards=(noisy,), steps=3, eval_every=every, sample_every=1,
                      data=DataConfig(eval_fraction=0.25), eval=EvalConfig(group_size=2, temperature=1.0))
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        tr.train()
        runs.append(tr)
    on, off = runs
    assert on.prompts == off.prompts and len(on.prompts) == 3 and len(on.eval_prompts) == 1
    ra, rb = _rows(on.config.output_dir), _rows(off.config.output_dir)
    assert all("eval/reward/total" in r and "eval/reward_std" in r for r in ra)
    assert not any(k.startswith("eval/") for r in rb for k in r)
    assert [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in ra] == rb
    for p, q in zip(on.policy.parameters(), off.policy.parameters()):
        assert torch.equal(p, q)
    with open(os.path.join(on.config.output_dir, "samples.jsonl")) as f, \
            open(os.path.join(off.config.output_dir, "samples.jsonl")) as g:
        assert f.read() == g.read()


def test_held_out_split_and_sources(tmp_path):
    """eval_fraction holds out max(1, round(f·n)) prompts by a seeded permutation, never
    trained on; a file source reads like data.prompts_file (fields reach the rewards);
    eval.max_prompts keeps the first ones."""
    tr = _trainer(tmp_path / "a", data=DataConfig(eval_fraction=0.5))
    assert sorted(tr.prompts + tr.eval_prompts) == sorted(PROMPTS) and len(tr.eval_prompts) == 2
    g = torch.Generator().manual_seed(0 * 1_000_003 + 999_999_937)
    held = sorted(torch.randperm(4, generator=g)[:2].tolist())
    assert tr.eval_prompts == [PROMPTS[i] for i in held]
    for _ in range(4):  # a pass and more over the training prompts: none of the held-out ones
        assert all(tr.prompts[i] not in tr.eval_prompts for i in tr._next_prompts())
    others = {tuple(_trainer(tmp_path / f"s{s}", seed=s, data=DataConfig(eval_fraction=0.5)).eval_prompts)
              for s in range(1, 6)}
    assert len(others) > 1  # the seed picks them
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "target": i}) + "\n" for i, p in enumerate(EVAL)))
    got = []

    def with_target(prompts, completions, target):
        got.extend(target)
        return [0.0] * len(completions)

    tr = _trainer(tmp_path / "f", rewards=(with_target,), data=DataConfig(eval_prompts_file=str(path)),
                  eval=EvalConfig(max_prompts=3))
    assert tr.eval_prompts == EVAL[:3] and tr.prompts == PROMPTS
    tr.evaluate()
    assert got == [0, 1, 2]


def test_schedule_log_and_resume(tmp_path):
    """eval_every 2 of 5 steps: evaluated at steps 2, 4 and the last; metrics.jsonl holds them
    and a run stopped at step 2 and resumed logs the same rows and ends with the same weights."""
    kw = dict(steps=5, save_every=2, eval_every=2, data=DataConfig(eval_prompts=EVAL[:2]))
    a = _trainer(tmp_path / "a", **kw)
    a.train()
    ra = _rows(a.config.output_dir)
    assert [r["step"] for r in ra if "eval/reward/total" in r] == [2, 4, 5]
    b = _trainer(tmp_path / "b", **kw)
    b.train(steps=2)
    cfg = b.config
    cfg.resume = cfg.output_dir
    pol, tok = make_policy()
    c = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    c.train()
    assert _rows(cfg.output_dir) == ra
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def test_defaults_evaluate_nothing(tmp_path):
    d = RLConfig()
    assert d.eval_every == 0 and d.data.eval_source() is None and d.ppo.is_cap_min is None
    assert (d.eval.group_size, d.eval.temperature, d.eval.max_prompts) == (1, 0.0, None)
    tr = _trainer(tmp_path, steps=1)
    assert tr.eval_prompts == [] and not any(k.startswith(("eval/", "time/eval")) for k in tr.train()[-1])


@pytest.mark.parametrize("make,match", [
    (lambda: RLConfig(eval_every=-1), "eval_every must be an int >= 0"),
    (lambda: EvalConfig(group_size=0), "eval.group_size must be an int > 0"),
    (lambda: EvalConfig(temperature=-0.5), "eval.temperature"),
    (lambda: EvalConfig(max_prompts=0), "eval.max_prompts must be an int > 0"),
    (lambda: DataConfig(eval_fraction=1.0), r"data.eval_fraction must be a number in \[0, 1\)"),
    (lambda: DataConfig(eval_fraction=float("nan")), "data.eval_fraction"),
    (lambda: DataConfig(eval_prompts=["a", ""]), "data.eval_prompts must be a list of non-empty strings"),
    (lambda: DataConfig(eval_prompts=["a"], eval_fraction=0.2),
     "data.eval_prompts and data.eval_fraction are both set"),
    (lambda: PPOConfig(is_cap_min=0.5), "ppo.is_cap_min .* needs ppo.is_cap"),
    (lambda: PPOConfig(is_cap=2.0, is_cap_min=2.0), r"ppo.is_cap_min \(2.0\) must be less than ppo.is_cap"),
    (lambda: PPOConfig(is_cap=2.0, is_cap_min=-0.1), "ppo.is_cap_min must be"),
])
def test_config_errors_name_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_trainer_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"eval_every \(2\) needs evaluation prompts"):
        _trainer(tmp_path / "a", eval_every=2)
    with pytest.raises(ValueError, match=r"data.eval_fraction \(0.9\) holds out 4 of the 4 prompts"):
        _trainer(tmp_path / "b", data=DataConfig(eval_fraction=0.9))
    with pytest.raises(ValueError, match="eval_prompts=.* and data.eval_fraction are both given"):
        _trainer(tmp_path / "c", data=DataConfig(eval_fraction=0.5), eval_prompts=EVAL)
    with pytest.raises(FileNotFoundError, match="data.eval_prompts_file not found"):
        _trainer(tmp_path / "d", data=DataConfig(eval_prompts_file=str(tmp_path / "none.txt")))


# --------------------------------------------------------------------------- two gloo ranks


def _dist_run(strategy: str, out_dir: str) -> dict:
    """Two GRPO steps evaluated after each (3 prompts, two sampled answers each: uneven shares
    over two ranks), then an evaluation of one prompt (one rank's share empty)."""
    from rlhf_fast.distributed import DistributedConfig

    import pathlib

    cfg = make_config(pathlib.Path(out_dir), "grpo", steps=2,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5, per_sample_seeds=True),
                      ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=4), eval_every=1,
                      eval=EvalConfig(group_size=2, temperature=1.0), distributed=DistributedConfig(strategy=strategy))
    pol, tok = make_policy()
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS, eval_prompts=EVAL[:3])
    hist = tr.train()
    tr.eval_prompts, tr.eval_fields = tr.eval_prompts[:1], tr.eval_fields[:1]
    return {"hist": hist, "one": tr.evaluate(), "world": tr.ctx.world_size}


def test_two_ranks_evaluate_as_one(tmp_path):
    """FSDP2 on two gloo ranks (each generate call gathers the sharded weights on both: a rank
    whose share is empty still makes its calls) against one process: the same eval metrics."""
    outs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    for n in (2, 1):
        out = str(tmp_path / f"r{n}.json")
        launch = [sys.executable] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]
        r = subprocess.run(launch + [os.path.abspath(__file__), "fsdp2" if n == 2 else "none", str(tmp_path / f"run{n}"),
                                     out], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs[n] = json.load(open(out))
    two, one = outs[2], outs[1]
    assert (two["world"], one["world"]) == (2, 1)
    keys = ["eval/reward/total", "eval/reward/n_chars", "eval/response_length", "eval/reward_std"]
    for a, b in zip(two["hist"], one["hist"]):
        assert all(k in b for k in keys)
        assert [a[k] for k in keys + ["reward/total"]] == pytest.approx([b[k] for k in keys + ["reward/total"]],
                                                                         rel=1e-6)
    assert two["one"] == pytest.approx(one["one"], rel=1e-6) and "eval/reward/total" in one["one"]


if __name__ == "__main__":  # the worker: STRATEGY RUN_DIR OUT_JSON (rank 0 writes)
    torch.set_num_threads(1)
    res = _dist_run(sys.argv[1], sys.argv[2])
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[3], "w") as f:
            json.dump(res, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
