"""``reward.calling_convention: trl``: TRL reward functions run unchanged.

The reward functions below are TRL's documentation examples (GRPOTrainer docs, "Using a
custom reward function": ``reward_len``, ``format_reward_func``, the ``trainer_state`` and
``log_metric`` / ``log_extra`` examples, a function returning None for the rows it does not
apply to). Each test scores one rollout of our trainer and calls TRL's own
``GRPOTrainer._calculate_rewards`` (trl/trainer/grpo_trainer.py) on a stand-in ``self`` with
the same rows: both must call every function with the same arguments and give the same
per-function rewards; the total is TRL's ``(rewards_per_func * reward_weights).nansum(dim=1)``
(``_generate_and_score_completions``)."""

import functools
import json
import math
import os
import re
import warnings
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

from rlhf_fast.algorithms.rewards import CombinedReward, RewardContext, RewardError, RewardLog, TRLRewardInputs
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (
    DataConfig,
    KLConfig,
    OptimConfig,
    PPOConfig,
    RewardConfig,
    RLConfig,
    RolloutConfig,
)
from tests.test_rl_tools import make_policy, tok  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

CALLS = defaultdict(list)  # function name -> the keyword arguments of each call


def recorded(fn):
    """``fn`` with each call's keyword arguments kept in CALLS (the signature is fn's own)."""
    @functools.wraps(fn)
    def wrapper(**kw):
        CALLS[fn.__name__].append(kw)
        return fn(**kw)
    return wrapper


# ------------------------------------------------------------------ TRL's documented examples

@recorded
def reward_len(completions, **kwargs):
    """TRL docs: "rewards completions that are close to 20 characters" (text completions)."""
    return [-abs(20 - len(completion)) for completion in completions]


@recorded
def reward_len_chat(completions, **kwargs):
    """The same on conversational completions (their first message's content)."""
    return [-abs(20 - len(completion[0]["content"])) for completion in completions]


@recorded
def format_reward_func(completions, **kwargs):
    """TRL docs: "checks if the completion has a specific format" (conversational)."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


@recorded
def scheduled_reward(completions, trainer_state, **kwargs):
    """TRL docs: a reward whose weight depends on training progress (trainer_state)."""
    progress = trainer_state.global_step / trainer_state.max_steps
    return [progress * 0.5 + 0.1 * len(c if isinstance(c, str) else c[0]["content"]) for c in completions]


@recorded
def math_only(completions, task, **kwargs):
    """TRL docs (multi-task): None for the rows of another task."""
    return [float(len(c if isinstance(c, str) else c[0]["content"]) % 3) if t == "math" else None
            for c, t in zip(completions, task)]


@recorded
def logging_reward(prompts, completions, completion_ids, log_metric, log_extra, **kwargs):
    """TRL docs: log a scalar metric and an extra column of the completions table."""
    lengths = [len(ids) for ids in completion_ids]
    log_metric("mean_completion_ids", sum(lengths) / len(lengths))
    log_extra("n_ids", lengths)
    return [0.01 * n for n in lengths]


CHAT = [{"prompt": [{"role": "user", "content": f"add {a} and {b}"}], "task": t, "solution": str(a + b)}
        for a, b, t in ((1, 2, "math"), (3, 4, "chat"), (5, 6, "math"), (7, 8, "chat"))]
TEXT = [{"prompt": f"count to {n}", "task": t} for n, t in ((3, "math"), (5, "chat"), (7, "math"), (9, "chat"))]


def _config(tmp_path, steps=1, **kw):
    return RLConfig(estimator="grpo", steps=steps, output_dir=str(tmp_path / "run"), progress=False,
                    rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=8, temperature=1.0),
                    ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=1e-3),
                    kl=KLConfig(coef=0.0), data=DataConfig(shuffle=False),
                    reward=RewardConfig(calling_convention="trl", **kw), sample_every=1)


def _trainer(tmp_path, tok, fns, records, weights=None, steps=1, **kw):
    return RLTrainer(_config(tmp_path, steps=steps, **kw), make_policy(tok), tok, reward_fns=list(fns),
                     reward_weights=weights, prompts=records)


def trl_completion_ids(batch, eos_id):
    """TRL's ``_generate_single_turn`` (transformers path): each answer up to and including its
    first EOS ("Mask everything after the first EOS token"), as lists."""
    P = batch.prompt_length
    completion_ids = batch.input_ids[:, P:]
    is_eos = completion_ids == eos_id
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    sequence_indices = torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1)
    completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
    return [c[m].tolist() for c, m in zip(completion_ids, completion_mask.bool())]


def trl_rewards(funcs, weights, records, rows, batch, tok, state):
    """TRL's ``_calculate_rewards`` on a stand-in ``self`` for ``rows`` (each row's record):
    ``(rewards_per_func [B, K], total [B], pending metrics, pending extra columns)``."""
    from trl.data_utils import is_conversational
    from trl.trainer.grpo_trainer import GRPOTrainer

    me = SimpleNamespace(accelerator=SimpleNamespace(device="cpu", is_main_process=True), reward_funcs=funcs,
                         reward_processing_classes=[None] * len(funcs), reward_func_names=[f.__name__ for f in funcs],
                         environments=None, state=state, args=SimpleNamespace(report_to=[]),
                         _pending_extra_logs=defaultdict(list), _pending_metrics=defaultdict(list))
    me._log_completion_extra = MethodType(GRPOTrainer._log_completion_extra, me)
    me._log_metric = MethodType(GRPOTrainer._log_metric, me)
    inputs = [dict(records[g]) for g in rows]
    prompts = [x["prompt"] for x in inputs]
    completion_ids = trl_completion_ids(batch, tok.eos_token_id)
    # TRL's _generate: decode; conversational prompts get [{"role": "assistant", "content": ...}]
    contents = tok.batch_decode(completion_ids, skip_special_tokens=True)
    if is_conversational({"prompt": prompts[0]}):
        completions = [[{"role": "assistant", "content": content}] for content in contents]
    else:
        completions = contents
    rpf = GRPOTrainer._calculate_rewards(me, inputs, prompts, completions, completion_ids)
    # TRL's _generate_and_score_completions (the logged reward)
    total = (rpf * torch.tensor(weights, dtype=torch.float32).unsqueeze(0)).nansum(dim=1)
    return rpf, total, me._pending_metrics, me._pending_extra_logs


def _without_callables(kw):
    return {k: v for k, v in kw.items() if k not in ("log_extra", "log_metric", "trainer_state")}


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_functions_get_trl_arguments_and_rewards(tmp_path, tok, kind):
    records = CHAT if kind == "chat" else TEXT
    fns = ([reward_len_chat, format_reward_func] if kind == "chat" else [reward_len]) + \
        [scheduled_reward, math_only, logging_reward]
    weights = [0.5, 2.0, 1.0, 1.5, 1.0][-len(fns):]
    CALLS.clear()
    tr = _trainer(tmp_path, tok, fns, records, weights=weights, steps=4)
    tr.global_step = 2  # trainer_state reads the run's progress
    batch, fields, extra = tr._generate(0)
    out = tr._score(batch, fields, extra)
    ours = {k: v[-1] for k, v in CALLS.items()}
    CALLS.clear()
    rows = batch.group_index.tolist()  # prompts 0 and 1 (no shuffle), 4 answers each
    state = ours["scheduled_reward"]["trainer_state"]
    rpf, total, metrics, columns = trl_rewards(fns, weights, records, rows, batch, tok, state)
    theirs = {k: v[-1] for k, v in CALLS.items()}
    assert sorted(ours) == sorted(theirs) == sorted(f.__name__ for f in fns)
    for name in ours:  # the same arguments, by name: prompts, completions, completion_ids, columns
        assert _without_callables(ours[name]) == _without_callables(theirs[name]), name
        assert set(ours[name]) == set(theirs[name]), name
        assert callable(ours[name]["log_extra"]) and callable(ours[name]["log_metric"])
    got = ours["logging_reward"]
    if kind == "chat":
        assert got["prompts"][0] == CHAT[0]["prompt"] and got["completions"][0][0]["role"] == "assistant"
    else:
        assert got["prompts"][0] == TEXT[0]["prompt"] and isinstance(got["completions"][0], str)
    assert got["task"] == [records[g]["task"] for g in rows]
    # a real transformers.TrainerState with the run's progress
    from transformers import TrainerState

    assert isinstance(state, TrainerState)
    assert (state.global_step, state.max_steps) == (2, 4)
    assert state.epoch == pytest.approx(2 * 2 / 4)  # 2 steps of 2 prompts over 4 prompts
    # per-function rewards (None -> NaN) and the NaN-skipping weighted total, as TRL's
    per = torch.stack([out.per_source[f.__name__] for f in fns], dim=1)
    torch.testing.assert_close(per, rpf.float(), equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out.per_source["math_only"]).sum() == 4  # the "chat" task's answers
    assert out.valid.all()
    torch.testing.assert_close(out.total, total, rtol=0, atol=0)
    # log_extra: one column of B values, as TRL's pending extra logs
    assert out.columns == {"n_ids": columns["n_ids"]}


def test_training_logs_metrics_and_columns(tmp_path, tok):
    CALLS.clear()
    tr = _trainer(tmp_path, tok, [reward_len_chat, scheduled_reward, math_only, logging_reward], CHAT, steps=2)
    tr.train()
    steps = [c["trainer_state"].global_step for c in CALLS["scheduled_reward"]]
    assert steps == [0, 1]  # the state at each rollout, as TRL's self.state
    with open(os.path.join(tr.run_dir.path, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    logs = [r for r in logs if "reward/total" in r]
    assert len(logs) == 2
    for r, calls in zip(logs, CALLS["logging_reward"]):
        ids = calls["completion_ids"]
        assert r["reward_fn/mean_completion_ids"] == pytest.approx(sum(map(len, ids)) / len(ids))
        # the function's mean over the completions it scored (TRL's nanmean)
        assert math.isfinite(r["reward/math_only"])
    tr._reward_log.log_metric("m", 1.0)  # several calls in a step: their mean (TRL's sum / count)
    tr._reward_log.log_metric("m", 2.0)
    assert tr._reward_fn_metrics() == {"reward_fn/m": 1.5} and tr._reward_fn_metrics() == {}
    with open(os.path.join(tr.run_dir.path, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert samples and all(isinstance(s["n_ids"], int) for s in samples)
    last = CALLS["logging_reward"][-1]["completion_ids"]
    assert [s["n_ids"] for s in samples if s["step"] == 2] == [len(i) for i in last][:len(
        [s for s in samples if s["step"] == 2])]


def _ctx(B):
    return RewardContext(trl=TRLRewardInputs(["p"] * B, ["c"] * B, [[1]] * B))


def test_none_handling_as_trl():
    def half(completions, **kw):
        return [1.0, None, None, 4.0]

    def other(completions, **kw):
        return [None, 2.0, None, float("nan")]  # TRL: NaN is None

    r = CombinedReward([(half, 2.0), (other, 0.5)], convention="trl")
    with pytest.warns(RuntimeWarning, match="All reward functions returned None for sample 2"):
        out = r(["p"] * 4, ["c"] * 4, _ctx(4))
    rpf = torch.tensor([[1.0, math.nan], [math.nan, 2.0], [math.nan, math.nan], [4.0, math.nan]])
    trl_total = (rpf * torch.tensor([2.0, 0.5]).unsqueeze(0)).nansum(dim=1)  # TRL's, transcribed
    assert out.valid.tolist() == [True, True, False, True]  # the unscorable row: invalid
    assert out.total.tolist() == [trl_total[0], trl_total[1], 0.0, trl_total[3]]
    assert out.dropped == {"half": 0, "other": 0}
    # infinities and exceptions stay bad rewards (on_bad_reward)
    with pytest.raises(RewardError, match="infinite"):
        CombinedReward([lambda completions, **kw: [math.inf] * 4], convention="trl")(["p"] * 4, ["c"] * 4, _ctx(4))

    def boom(completions, **kw):
        if len(completions) > 1:
            raise ValueError("boom")
        return [1.0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = CombinedReward([boom, half], on_bad_reward="drop", convention="trl")(["p"] * 4, ["c"] * 4, _ctx(4))
    assert out.dropped["boom"] == 0 and out.valid.all()  # each row alone scores
    # our convention is unchanged: None is a bad reward
    with pytest.raises(RewardError, match="must return a list"):
        CombinedReward([lambda p, c: [None] * 4])(["p"] * 4, ["c"] * 4)


def test_reward_log_and_bad_input():
    log = RewardLog()
    log.log_metric("a", 1)
    log.log_metric("a", torch.tensor(3.0))
    assert log.pop_metrics() == {"a": (4.0, 2.0)} and log.pop_metrics() == {}
    log.log_extra("x", [1, 2])
    with pytest.raises(RewardError, match="2 values for 3 completions"):
        log.pop_extra(3)
    with pytest.raises(ValueError, match="samples table"):
        log.log_extra("reward", [1])
    with pytest.raises(TypeError, match="must be a list"):
        log.log_extra("x", 3)
    with pytest.raises(ValueError, match="reward.calling_convention"):
        RewardConfig(calling_convention="TRL")
    with pytest.raises(RewardError, match="needs the argument"):
        CombinedReward([lambda completions, answer: [1.0]], convention="trl")(["p"], ["c"], _ctx(1))
    with pytest.raises(RewardError, match="no TRL inputs"):
        CombinedReward([lambda completions, **kw: [1.0]], convention="trl")(["p"], ["c"])


def test_evaluate_policy_uses_trl_convention(tok):
    from rlhf_fast.feedback.formats import render_prompt
    from rlhf_fast.trainers.evaluate import evaluate_policy

    CALLS.clear()
    chats = [r["prompt"] for r in CHAT[:2]]
    res = evaluate_policy(make_policy(tok), tok, [render_prompt(c, tok) for c in chats],
                          CombinedReward([reward_len_chat, logging_reward], convention="trl"), max_new_tokens=4,
                          n=2, data_prompts=chats)
    got = CALLS["logging_reward"][0]
    assert got["prompts"] == [chats[0]] * 2 + [chats[1]] * 2
    assert got["completions"][0][0]["role"] == "assistant"
    assert res["reward_fn/mean_completion_ids"] == pytest.approx(sum(map(len, got["completion_ids"])) / 4)
