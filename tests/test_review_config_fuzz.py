"""Review of the configs' bad-input handling, found by a systematic fuzz (every key of every
config dataclass, nested sections walked, given wrong-typed / out-of-range values through YAML,
``--key value`` overrides and Python construction).

``load_config`` (YAML and the CLI) converts every value to its annotated type and refuses the
rest with a ValueError naming the key. The defects were in configs built from Python, where no
such conversion ran — a value of the wrong type reached a range check (an unrelated TypeError),
a method call (AttributeError) or was kept silently (``both_orders="false"`` is truthy), a
section given as a mapping crashed — now ``config.typed_config``; in YAML 1.1's integers
(``010`` octal, ``10:30`` base 60, unlike the command line); and in JudgeConfig.max_tokens <= 0.
Each test failed before its fix."""

import pytest

from rlhf_fast.feedback.judge import JudgeConfig
from rlhf_fast.models.merge import MergeConfig
from rlhf_fast.trainers import rl_config as rlc
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.reward import RewardConfig as RewardModelConfig
from rlhf_fast.trainers.sft import SFTConfig


def _refused_naming(build, key):
    """``build()`` raises ValueError / TypeError whose message names ``key``."""
    with pytest.raises((ValueError, TypeError)) as e:
        build()
    assert key in str(e.value), str(e.value)


# the sections of RLConfig that took a scalar from Python (distill, online_dpo, a2po, sdpo and
# sdft already went through section_config, which refuses one naming the section)
RL_SECTIONS = ["model", "data", "rollout", "reward", "kl", "ppo", "optim", "distributed", "eval"]


@pytest.mark.parametrize("section", RL_SECTIONS)
def test_rl_section_given_a_scalar_is_refused_naming_it(section):
    _refused_naming(lambda: rlc.RLConfig(**{section: 5}), section)


@pytest.mark.parametrize("section", ["model", "data", "rollout", "reward", "kl", "ppo", "optim", "distributed",
                                     "eval", "distill", "sdpo"])
def test_rl_section_given_a_mapping_is_built(section):
    cfg = rlc.RLConfig(**{section: {}})  # every key at its default
    assert type(getattr(cfg, section)) is type(getattr(rlc.RLConfig(), section))


def test_rl_section_mapping_with_a_misspelt_key_suggests_the_right_one():
    _refused_naming(lambda: rlc.RLConfig(rollout={"group_sise": 4}), "rollout.group_size")


# (config class, key, value): a wrong-typed value from Python, and how it went before the fix
WRONG_TYPES = [
    (SFTConfig, "model", [1]),                     # AttributeError: 'list' object has no attribute 'startswith'
    (rlc.PPOConfig, "gamma", "abc"),               # TypeError: '<=' not supported between 'int' and 'str'
    (rlc.PPOConfig, "gamma", True),                # kept: a bool as a discount
    (rlc.PPOConfig, "dual_clip", "abc"),           # TypeError: '>' not supported
    (rlc.RewardConfig, "weights", 5),              # TypeError: object of type 'int' has no len()
    (RewardModelConfig, "label_smoothing", "abc"),  # TypeError: '<=' not supported
    (JudgeConfig, "max_tokens", "abc"),            # kept: text as the token budget sent to the endpoint
    (JudgeConfig, "max_retries", "abc"),           # TypeError: '<' not supported
    (JudgeConfig, "pair_template", True),          # TypeError: argument of type 'bool' is not iterable
    (JudgeConfig, "both_orders", "false"),         # kept: truthy text, so both orders are asked
    (JudgeConfig, "max_retries", 2.5),             # kept: range(2.5 + 1) fails at the first request
    (MergeConfig, "dtype", [1]),                   # TypeError: unhashable type: 'list'
]


@pytest.mark.parametrize("cls,key,value", WRONG_TYPES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_wrong_typed_value_from_python_is_refused_naming_the_key(cls, key, value):
    _refused_naming(lambda: cls(**{key: value}), key)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_judge_max_tokens_must_be_positive(value):
    _refused_naming(lambda: load_config(JudgeConfig, None, ["--max_tokens", value]), "max_tokens")


@pytest.mark.parametrize("key,text", [("seed", "010"), ("max_steps", "0100"), ("run_name", "10:30"),
                                      ("run_name", "1:30:00")])
def test_a_config_file_reads_a_value_as_the_command_line_does(tmp_path, key, text):
    p = tmp_path / "c.yaml"
    p.write_text(f"{key}: {text}\n")
    from_file = getattr(load_config(SFTConfig, str(p)), key)
    assert from_file == getattr(load_config(SFTConfig, None, [f"--{key}", text]), key)
    assert from_file == (text if key == "run_name" else int(text))


def test_offline_data_may_still_hold_the_rows():
    # (data / eval_data are the fields typed_config leaves to common._check_data_source)
    rows = [{"prompt": "a", "completion": "b"}]
    assert SFTConfig(data=rows, eval_data=tuple(rows)).data == rows
