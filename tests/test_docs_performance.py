"""docs/performance.md stays true: every key of its table is a key of the config class the row
names (dotted RL keys walked through RLConfig's sections) with the default the row states, and
every RL key the prose names in backticks exists."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def _classes():
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    return {c.__name__: c for c in (SFTConfig, DPOConfig, RewardConfig, KTOConfig, RLConfig)}


def _default(cls, dotted: str):
    """The default of ``dotted`` in ``cls`` (sections instantiated with their defaults);
    KeyError for a key the class does not have."""
    obj = cls()
    for part in dotted.split("."):
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            raise KeyError(f"{cls.__name__} has no key {dotted!r}")
        obj = getattr(obj, part)
    return obj


def _rows():
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[0] != "config":
            rows.append(tuple(c.strip("`") for c in cells[:3]))
    return rows


def test_the_table_has_rows():
    assert len(_rows()) >= 10


@pytest.mark.parametrize("cls,key,default", _rows())
def test_each_key_exists_with_its_stated_default(cls, key, default):
    got = _default(_classes()[cls], key)
    assert got == yaml.safe_load(default), (cls, key, got, default)


def test_the_rl_keys_named_in_the_prose_exist():
    from rlhf_fast.trainers.rl_config import RLConfig

    text = DOC.read_text()
    named = set(re.findall(r"`((?:rollout|ppo|model|distributed|distill)\.[a-z_]+)", text))
    assert "rollout.cuda_graphs" in named
    for key in named:
        _default(RLConfig, key)
