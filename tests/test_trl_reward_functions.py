"""TRL 1.16's own reward functions (``trl.rewards``) run unchanged through ``RLTrainer``.

A TRL user writes ``GRPOTrainer(reward_funcs=[think_format_reward, ...])``; ours is
``RLTrainer(reward_fns=[...])`` (or ``reward.functions: ["trl.rewards:think_format_reward"]``)
with ``reward.calling_convention: trl``. Each test scores one rollout whose completions are
scripted (a ``rollout_func``: think-formatted, wrong, cut, repetitive and empty answers, so every
function gives different rewards) or sampled from a tiny model, and checks the reward each
function gets in our trainer equals the TRL function called directly on TRL-shaped inputs built
here from the rollout's token ids (``completion_ids`` up to and including the first EOS, texts
decoded with ``skip_special_tokens=True``, ``[{"role": "assistant", "content": text}]`` for chat
prompts, the dataset columns such as ``solution``), as TRL's ``_generate`` /
``_calculate_rewards`` build them. ``accuracy_reward`` / ``reasoning_accuracy_reward`` /
``get_cosine_scaled_reward`` need ``math_verify``: without it, the real TRL functions run on a
stand-in of its ``parse`` / ``verify`` (the call shape, ``log_extra`` and the None rows are then
still checked); with it, on the real package."""

import json
import math
import os
import re
import warnings

import pytest

from rlhf_fast.algorithms.rewards import RewardError
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (DataConfig, KLConfig, OptimConfig, PPOConfig, RewardConfig,
                                          RLConfig, RolloutConfig)
from tests.test_rl_tools import ids_of, make_policy, tok  # noqa: F401 - fixture

trl_rewards = pytest.importorskip("trl.rewards")
pytestmark = pytest.mark.usefixtures("one_thread_per_module")

G, MAX_NEW = 4, 48
# the last record's solution is no formula math_verify can parse: TRL's accuracy reward is None there
CHAT = [{"prompt": [{"role": "user", "content": f"add {a} and {b}"}], "solution": s}
        for a, b, s in ((1, 2, "3"), (3, 4, "7"), (5, 6, "11"), (7, 8, "-"))]
TEXT = [{"prompt": r["prompt"][0]["content"], "solution": r["solution"]} for r in CHAT]


def _has_math_verify() -> bool:
    from trl.import_utils import is_math_verify_available

    return is_math_verify_available()


class ThinkRollout:
    """A rollout function (TRL's ``rollout_func``): answer k of each group of G is pattern k — 0:
    think-formatted, correct boxed answer, eos; 1: think-formatted, wrong answer, eos; 2: no
    think block, correct answer, cut (no eos); 3: repetitive text, eos. ``completion_ids``: the
    ids given, as TRL takes them."""

    def __init__(self, tok, records):
        self.tok, self.solution = tok, {self.key(r["prompt"]): r["solution"] for r in records}
        self.completion_ids = []

    @staticmethod
    def key(prompt):
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]

    def text(self, k, sol):
        return (f"<think>\nadd them\n</think>\nThe answer is \\boxed{{{sol}}}",
                "<think>\nguess</think>\n\\boxed{0}",
                f"so it is \\boxed{{{sol}}} or",
                "ab ab ab ab ab ab ab ab")[k]

    def __call__(self, prompts, trainer):
        eos = [self.tok.eos_token_id]
        comp = [ids_of(self.tok, self.text(r % G, self.solution[self.key(p)])) + ([] if r % G == 2 else eos)
                for r, p in enumerate(prompts)]
        self.completion_ids.append(comp)
        render = self.tok.apply_chat_template
        pids = [ids_of(self.tok, p if isinstance(p, str) else
                       render(p, tokenize=False, add_generation_prompt=True)) for p in prompts]
        return {"prompt_ids": pids, "completion_ids": comp,
                "logprobs": [[-0.1] * len(c) for c in comp]}


def _config(tmp_path, convention="trl", **reward):
    return RLConfig(estimator="grpo", steps=1, output_dir=str(tmp_path / "run"), progress=False,
                    sample_every=1,
                    rollout=RolloutConfig(prompts_per_step=4, group_size=G, max_new_tokens=MAX_NEW),
                    ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=16, old_logp="behaviour"),
                    optim=OptimConfig(lr=1e-3), kl=KLConfig(coef=0.0), data=DataConfig(shuffle=False),
                    reward=RewardConfig(calling_convention=convention, **reward))


def _trainer(tmp_path, tok, fns, records, convention="trl", **reward):
    roll = ThinkRollout(tok, records)
    tr = RLTrainer(_config(tmp_path, convention, **reward), make_policy(tok), tok, reward_fns=list(fns),
                   prompts=records, rollout_func=roll)
    return tr, roll


def trl_inputs(tok, records, completion_ids):
    """What TRL's ``_calculate_rewards`` passes for the scripted rollout (records in order, G
    answers each): completions, completion_ids (up to and including the first eos) and the
    ``solution`` column."""
    eos = tok.eos_token_id
    ids = [c[:c.index(eos) + 1] if eos in c else list(c) for c in completion_ids]
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    chat = not isinstance(records[0]["prompt"], str)
    rows = [records[i // G] for i in range(len(ids))]
    return {"prompts": [r["prompt"] for r in rows],
            "completions": [[{"role": "assistant", "content": t}] for t in texts] if chat else texts,
            "completion_ids": ids, "solution": [r["solution"] for r in rows]}


def _nan_list(t):
    return [None if math.isnan(v) else v for v in t.tolist()]


@pytest.fixture
def fake_math_verify(monkeypatch):
    """The real TRL accuracy functions on a stand-in of math_verify's parse / verify (a boxed
    number for an answer, a bare one for the gold; the gold "-" does not parse): the call shape,
    log_extra and the None rows are checked whether or not math_verify is installed."""
    from trl.rewards import accuracy_rewards as A

    def parse(text, extraction_config=None, **kw):
        found = re.findall(r"\\boxed\{([^}]*)\}", text)[:1] if extraction_config is not None else [text]
        return [int(found[0])] if found and re.fullmatch(r"-?\d+", found[0].strip()) else []

    monkeypatch.setattr(A, "is_math_verify_available", lambda: True)
    monkeypatch.setattr(A, "parse", parse, raising=False)
    monkeypatch.setattr(A, "verify", lambda gold, answer, **kw: bool(answer) and gold[0] == answer[0],
                        raising=False)
    monkeypatch.setattr(A, "LatexExtractionConfig", lambda **kw: kw, raising=False)
    monkeypatch.setattr(A, "NormalizationConfig", lambda **kw: kw, raising=False)


def _functions():
    """name → (the TRL reward function, works on text prompts in TRL too)."""
    R = trl_rewards
    return {"think_format_reward": (R.think_format_reward, False),
            "repetition_penalty_reward": (R.get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0),
                                          True),
            "soft_overlong_punishment_reward": (R.get_soft_overlong_punishment(MAX_NEW, 32), True),
            "accuracy_reward": (R.accuracy_reward, False),
            "reasoning_accuracy_reward": (R.reasoning_accuracy_reward, False),
            "cosine_scaled_reward": (R.get_cosine_scaled_reward(max_len=MAX_NEW), False)}


NEEDS_MATH = ("accuracy_reward", "reasoning_accuracy_reward", "cosine_scaled_reward")


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("name", sorted(_functions()))
def test_trl_reward_function_runs_unchanged(tmp_path, tok, fake_math_verify, name, kind):
    fn, text_ok = _functions()[name]
    records = CHAT if kind == "chat" else TEXT
    tr, roll = _trainer(tmp_path, tok, [fn], records)
    batch, fields, extra = tr._generate(0)
    want = trl_inputs(tok, records, roll.completion_ids[-1])
    if kind == "text" and not text_ok:
        # TRL passes strings for text prompts and these read completion[0]["content"]: TRL's
        # own trainer fails the same way, so do we (naming the function)
        with pytest.raises(TypeError):
            fn(**want)
        with pytest.raises(RewardError, match=name):
            tr._score(batch, fields, extra)
        return
    logged = []
    direct = fn(**want, log_extra=lambda col, vals: logged.append((col, list(vals))),
                log_metric=lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no reward function scored" (the unparseable gold), as TRL's
        out = tr._score(batch, fields, extra)
    got = _nan_list(out.per_source[name])
    assert got == pytest.approx([None if d is None else float(d) for d in direct], nan_ok=True)
    assert len(set(v for v in got if v is not None)) > 1, "the scripted answers must tell rewards apart"
    if name in NEEDS_MATH:
        # None (the unparseable gold "-") is NaN, "does not apply": not a bad reward, not scored
        assert got[-G:] == [None] * G or name == "reasoning_accuracy_reward"
        assert not out.unscored[:-G].any() and out.valid[:-G].all()
    if logged:  # accuracy_reward's log_extra columns reach the samples table, one value per answer
        assert {c: v for c, v in logged} == out.columns


def test_default_convention_names_the_fix(tmp_path, tok):
    """With the default ``calling_convention: ours`` a TRL function would get (prompt texts,
    completion texts) positionally and fail at the first step with a bare TypeError: refused
    when the trainer is built, naming ``reward.calling_convention: trl``."""
    for fn in (trl_rewards.think_format_reward, trl_rewards.get_soft_overlong_punishment(8, 4)):
        with pytest.raises(ValueError, match="calling_convention"):
            _trainer(tmp_path, tok, [fn], CHAT, convention="ours")


def test_config_import_path_and_logged_rewards(tmp_path, tok, fake_math_verify):
    """``reward.functions`` by import path (TRL's functions that need no arguments), one training
    step: the logged ``reward/NAME`` is the mean of the function called directly (TRL's
    ``rewards/NAME/mean``, over the answers it scored) and samples.jsonl holds log_extra's columns."""
    names = ["think_format_reward", "accuracy_reward"]
    tr, roll = _trainer(tmp_path, tok, [], CHAT, functions=[f"trl.rewards:{n}" for n in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    want = trl_inputs(tok, CHAT, roll.completion_ids[0])
    with open(os.path.join(tr.run_dir.path, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f if "reward/total" in line][0]
    for n in names:
        vals = [v for v in getattr(trl_rewards, n)(**want) if v is not None]
        assert log[f"reward/{n}"] == pytest.approx(sum(vals) / len(vals)), n
    with open(os.path.join(tr.run_dir.path, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert samples and all("gold_parsed" in s and "answer_parsed" in s for s in samples)


def test_our_overlong_penalty_is_trls(tmp_path, tok):
    """``reward.overlong_buffer`` (documented as TRL's get_soft_overlong_punishment) gives the
    same rewards as TRL's function on TRL's completion_ids (eos counted, as TRL counts it)."""
    trl_fn = trl_rewards.get_soft_overlong_punishment(MAX_NEW, 32)
    tr, roll = _trainer(tmp_path, tok, [trl_fn], CHAT, overlong_buffer=32)
    out = tr._score(*tr._generate(0))
    want = trl_fn(completion_ids=trl_inputs(tok, CHAT, roll.completion_ids[-1])["completion_ids"])
    assert out.per_source["overlong_penalty"].tolist() == pytest.approx(want)
    assert out.per_source["soft_overlong_punishment_reward"].tolist() == pytest.approx(want)
    assert len(set(want)) > 1


@pytest.mark.skipif(not _has_math_verify(), reason="math_verify is not installed (trl.rewards' "
                    "accuracy_reward, reasoning_accuracy_reward and get_cosine_scaled_reward need it); their "
                    "call shape is checked on a stand-in in test_trl_reward_function_runs_unchanged")
@pytest.mark.parametrize("name", NEEDS_MATH)
def test_accuracy_rewards_with_math_verify(tmp_path, tok, name):
    fn = _functions()[name][0]
    tr, roll = _trainer(tmp_path, tok, [fn], CHAT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tr._score(*tr._generate(0))
    direct = fn(**trl_inputs(tok, CHAT, roll.completion_ids[-1]))
    assert _nan_list(out.per_source[name]) == pytest.approx([None if d is None else float(d) for d in direct],
                                                            nan_ok=True)


async def async_length_reward(completions, completion_ids, **kwargs):
    """TRL docs ("async reward functions"): an ``async def`` reward, awaited by the trainer."""
    return [None if len(ids) > 30 else 0.1 * len(ids) for ids in completion_ids]


def test_async_reward_function(tmp_path, tok):
    tr, roll = _trainer(tmp_path, tok, [async_length_reward], CHAT)
    with pytest.warns(RuntimeWarning, match="returned None"):  # TRL warns on answers no function scored
        out = tr._score(*tr._generate(0))
    import asyncio

    want = asyncio.run(async_length_reward(**trl_inputs(tok, CHAT, roll.completion_ids[-1])))
    got = _nan_list(out.per_source["async_length_reward"])
    assert got == pytest.approx(want, nan_ok=True) and None in got and len(set(got)) > 2


def test_async_reward_function_under_our_convention():
    """An ``async def`` reward called as ours ``(prompts, completions, **fields)`` is awaited too
    (it was returned unawaited, a coroutine the combination refused)."""
    from rlhf_fast.algorithms.rewards import CallableReward, RewardContext

    async def lengths(prompts, completions, answer):
        return [float(len(c)) + float(a) for c, a in zip(completions, answer)]

    src = CallableReward(lengths)
    out = src(["p", "q"], ["abc", "de"], RewardContext(fields={"answer": [1, 2]}))
    assert list(out) == [4.0, 4.0]
