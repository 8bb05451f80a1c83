"""Review of what the documentation and ``--help`` tell a user about configuration, and of how
config files and ``--key value`` overrides are read (rlhf_fast/trainers/config.py, rl_cli.py)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from rlhf_fast.trainers.config import _is_optional, load_config, to_dict

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _key_type(cls, dotted: str):
    """The annotated type of the settable key ``a.b`` of the dataclass ``cls`` (sections walked;
    ``map.NAME`` of a mapping field: its value type), or None when it is no such key."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        if part not in fields:
            return None
        hint = typing.get_type_hints(cls)[part]
        tp = _is_optional(hint)[1]
        if i == len(parts) - 1:
            return None if dataclasses.is_dataclass(tp) else hint
        if typing.get_origin(tp) is dict or tp is dict:
            return (typing.get_args(tp) or (None, typing.Any))[1] if i == len(parts) - 2 else None
        if not dataclasses.is_dataclass(tp):
            return None
        cls = tp
    return None


def _key_exists(cls, dotted: str) -> bool:
    return _key_type(cls, dotted) is not None


# ----------------------------------------------------------------------------- reading YAML values


def test_exponent_numbers_without_a_dot_are_numbers_in_free_form_mappings(tmp_path):
    """PyYAML (YAML 1.1) reads ``5e-2`` as the text '5e-2'. Typed keys convert it, but the values
    of a free-form mapping stayed text: ``lora: {lora_dropout: 5e-2}`` was refused ("must be a
    number in [0, 1], got '5e-2'"; given to peft, a TypeError at model build) and so was
    ``rollout.generation_kwargs: {min_p: 5e-2}``."""
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.rl_config import RLConfig

    p = tmp_path / "dpo.yaml"
    p.write_text("lora: {r: 8, lora_dropout: 5e-2}\n", encoding="utf-8")
    assert load_config(DPOConfig, str(p)).lora["lora_dropout"] == 0.05
    assert load_config(DPOConfig, None, ["--lora.lora_dropout", "5e-2"]).lora["lora_dropout"] == 0.05
    p = tmp_path / "rl.yaml"
    p.write_text("rollout:\n  generation_kwargs: {min_p: 5e-2}\n", encoding="utf-8")
    assert load_config(RLConfig, str(p)).rollout.min_p == 0.05
    assert load_config(RLConfig, None, ["--rollout.generation_kwargs.min_p", "5e-2"]).rollout.min_p == 0.05


def test_a_list_key_given_as_a_yaml_sequence_on_the_command_line():
    """Lists come from comma-separated text, and a mapping from YAML text (``--lora '{r: 8}'``);
    a list written as a YAML sequence (``--data.prompts '[a, b]'``) gave the prompts '[a' and
    'b]' without a word (and ``--loss_weights '[0.8, 0.2]'`` an error about '[0.8')."""
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.rl_config import RLConfig

    assert load_config(RLConfig, None, ["--data.prompts", "[a, b]"]).data.prompts == ["a", "b"]
    cfg = load_config(DPOConfig, None, ["--loss_type", "[sigmoid, sft]", "--loss_weights", "[0.8, 0.2]"])
    assert cfg.loss_weights == [0.8, 0.2]
    # comma-separated text still works, and a one-item list that merely holds a bracket stays text
    assert load_config(RLConfig, None, ["--data.prompts", "a,b"]).data.prompts == ["a", "b"]
    assert load_config(RLConfig, None, ["--data.prompts", "[x"]).data.prompts == ["[x"]


def test_a_tab_in_a_config_file_is_reported_with_its_line(tmp_path):
    """A tab indenting a YAML file gave "invalid YAML: while scanning for the next token": the
    cause (a tab) and its line were cut off."""
    from rlhf_fast.trainers.rl_config import RLConfig

    p = tmp_path / "tab.yaml"
    p.write_text("steps: 3\nppo:\n\tepochs: 2\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_config(RLConfig, str(p))
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "tab" in msg.lower(), msg


def test_a_config_file_that_is_not_utf8_is_refused_naming_it(tmp_path):
    from rlhf_fast.trainers.sft import SFTConfig

    p = tmp_path / "utf16.yaml"
    p.write_bytes("lr: 0.1\n".encode("utf-16"))
    with pytest.raises(ValueError) as e:
        load_config(SFTConfig, str(p))
    assert str(p) in str(e.value) and "UTF-8" in str(e.value), str(e.value)


def test_an_unknown_key_suggests_the_nearest_key():
    """A misspelt key, or a key of a section given at the top level (TRL users' ``--lr`` in an
    RL config, whose learning rate is ``optim.lr``), is named with the likely key."""
    from rlhf_fast.trainers.rl_config import RLConfig

    for overrides, want in ((["--ppo.clip_lo", "0.1"], "did you mean 'ppo.clip_low'"),
                            (["--lr", "1e-5"], "did you mean 'optim.lr'"),
                            (["--clip_high", "0.28"], "did you mean 'ppo.clip_high'")):
        with pytest.raises(ValueError) as e:
            load_config(RLConfig, None, overrides)
        assert want in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- what --help and the README say


def _help_defaults(command: str):
    """{dotted key: default} as ``rlhf-fast COMMAND --help`` lists them (values that are Python
    literals only)."""
    from rlhf_fast.trainers import rl_cli

    parser = argparse.ArgumentParser(prog=f"rlhf-fast {command}")
    rl_cli.add_arguments(parser)
    out = {}
    for line in parser.epilog.splitlines():
        m = re.match(r"^  (\S+)\s+.+? = (.*)$", line)
        if m:
            try:
                out[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                pass
    return out


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo", "distill", "online-dpo", "a2po", "sdft", "sdpo"])
def test_rl_help_states_the_defaults_the_command_runs_with(command, tmp_path, monkeypatch):
    """Every default ``rlhf-fast COMMAND --help`` states is the value ``rlhf-fast COMMAND none``
    runs with (online-dpo runs rollout.group_size 2 and a2po group_size 1 with 8 prompts per
    step; their --help said 4 and 4, values the commands refuse)."""
    from rlhf_fast.trainers.rl_cli import build_config

    monkeypatch.chdir(tmp_path)
    effective = to_dict(build_config(command, ["none"]))
    wrong = []
    for key, stated in _help_defaults(command).items():
        value = effective
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        section = effective.get(key.split(".")[0]) if "." in key else {}
        if section is None:  # an optional section (merge) that is off: its keys' defaults apply once set
            continue
        if isinstance(stated, tuple):
            stated = list(stated)
        if value != stated:
            wrong.append(f"{key}: --help says {stated!r}, the command runs {value!r}")
    assert not wrong, "\n".join(wrong)


def test_readme_optimizer_keys_exist_in_every_trainer():
    """README's "Optimizers and schedules, every trainer (`optim.*` for RL)" sentence: each key
    it names is a key of every offline trainer config, and ``optim.KEY`` of the RL config, or it
    names the RL spelling (```X` is `optim.Y```)."""
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.prm import PRMConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    start = README.index("Optimizers and schedules, every trainer")
    sentence = README[start:README.index("A resume", start)]
    renamed = dict(re.findall(r"`(\w+)` is `optim\.(\w+)`", sentence))
    keys = [k for k in re.findall(r"`(\w+)`", sentence) if _key_exists(SFTConfig, k)]
    assert {"optim", "lr_schedule", "warmup_ratio", "optim_args"} <= set(keys), keys
    bad = []
    for k in keys:
        for cls in (SFTConfig, RewardConfig, DPOConfig, KTOConfig, PRMConfig):
            if not _key_exists(cls, k):
                bad.append(f"{k} is no key of {cls.__name__}")
        if not _key_exists(RLConfig, f"optim.{renamed.get(k, k)}"):
            bad.append(f"optim.{renamed.get(k, k)} is no key of RLConfig")
    assert not bad, bad


def test_a_mapping_entry_set_on_the_command_line_keeps_its_name():
    """``--key-name`` may spell a config key with dashes, but the NAME of ``--annotator_weights.NAME``
    is data (an annotator id such as 'gpt-4o'): it became 'gpt_4o', and the annotator the user
    meant silently kept weight 1."""
    from rlhf_fast.trainers.dpo import DPOConfig

    cfg = load_config(DPOConfig, None, ["--annotator-weights.gpt-4o", "2", "--max-len", "64"])
    assert cfg.annotator_weights == {"gpt-4o": 2.0} and cfg.max_len == 64
    # a mapping of keyword arguments still reads dashes as underscores, as any config key
    assert load_config(DPOConfig, None, ["--lora.lora-dropout", "0.1"]).lora == {"lora_dropout": 0.1}


# ----------------------------------------------------------------------------- every dotted key the docs name

# backticked dotted names in the docs that are Python attributes, not config keys
NOT_CONFIG_KEYS = {"model.generate", "model.lm_head.weight"}


# `section.key`, `section.key: value` or `--section.key value`
_DOTTED = re.compile(r"^(?:--)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?:\s*:\s*(.*)|\s+(\S.*))?$")


def _documented_dotted_keys():
    """[(doc, line, key, value or None)] for every backticked ``section.key`` / ``section.key: value``
    / ``--section.key value`` of README.md and docs/*.md whose section is one of RLConfig's."""
    from rlhf_fast.trainers.config import config_keys
    from rlhf_fast.trainers.rl_config import RLConfig

    sections = {k.split(".")[0] for k, _, _ in config_keys(RLConfig) if "." in k}
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for item in re.findall(r"`([^`]+)`", line):
                m = _DOTTED.match(item.strip())
                if m and m.group(1).split(".")[0] in sections and m.group(1) not in NOT_CONFIG_KEYS:
                    value = m.group(2) if m.group(2) is not None else m.group(3)
                    out.append((doc.name, n, m.group(1), value))
    return out


def test_every_dotted_key_the_docs_name_exists_and_takes_the_value_shown():
    """A renamed or misspelt ``section.key`` anywhere in README.md or docs/*.md (prose included,
    which the table checks of test_docs_from_trl / test_docs_performance do not read) fails here,
    and so does a ``key: value`` whose value is not of the key's type. Keys of the offline
    trainers' sections (``bema.*``, ``lora.*``, ``merge.*``) count too; placeholders (N, `a | b`,
    ``[min, max]``) are not checked as values."""
    import yaml

    from rlhf_fast.trainers.config import _convert
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.prm import PRMConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    classes = (RLConfig, SFTConfig, RewardConfig, DPOConfig, KTOConfig, PRMConfig)
    found = _documented_dotted_keys()
    assert len(found) > 200 and any(k == "ppo.clip_low" for _, _, k, _ in found)
    bad = []
    for doc, n, key, value in found:
        owners = [c for c in classes if _key_exists(c, key)]
        if not owners:
            bad.append(f"{doc}:{n}: {key!r} is no config key")
            continue
        if value is None or re.search(r"[|<>…]|\bN\b|\.\.\.|^\[?[a-z]+, [a-z]+\]?$|^[a-z]$", value):
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        try:
            _convert(parsed, _key_type(owners[0], key), key, from_string=isinstance(parsed, str))
        except ValueError as e:
            bad.append(f"{doc}:{n}: `{key}: {value}`: {e}")
    assert not bad, "\n".join(bad)


def test_from_trl_intro_defaults_hold_for_every_offline_trainer():
    """docs/from_trl.md's "The defaults differ from TRL's. Ours are ..." sentence: each
    ``key`` value it states is every offline trainer's default, or the sentence names the
    command that differs (``prm``: 1024)."""
    import yaml

    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.prm import PRMConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.sft import SFTConfig

    text = (ROOT / "docs" / "from_trl.md").read_text(encoding="utf-8")
    start = text.index("The defaults differ from TRL's")
    para = " ".join(text[start:text.index("**Set them", start)].split())
    # (the parentheses name the commands that differ)
    offline = re.sub(r"\([^)]*\)", "", para.split("RL `")[0])
    stated = re.findall(r"`(\w+)(?::\s*([^`]+))?`\s?([^,(`]*)", offline)

    def read(text):
        value = yaml.safe_load(text)
        try:
            return float(value) if isinstance(value, str) else value  # 1e-3, text to YAML 1.1
        except ValueError:
            return value

    pairs = [(k, read(v1 or v2.strip())) for k, v1, v2 in stated if v1 or v2.strip()]
    assert {k for k, _ in pairs} >= {"lr", "max_len", "max_steps", "lr_schedule"}, pairs
    bad = []
    for cmd, cls in (("sft", SFTConfig), ("reward", RewardConfig), ("dpo", DPOConfig), ("kto", KTOConfig),
                     ("prm", PRMConfig)):
        for key, value in pairs:
            got = getattr(cls(), key)
            if got != value and f"`{cmd}`: {got}" not in para:
                bad.append(f"{key}: the doc says {value!r}, rlhf-fast {cmd}'s default is {got!r}")
    assert not bad, bad
