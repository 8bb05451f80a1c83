"""UX fixes (helper ux).

- DPO ``use_margin: true`` with ``loss_type: sft`` alone (or ``[sft]``) is refused at config time:
  ``sft`` has no βδ, so the margin would be read and silently unused.
- ``load_callable``'s errors name the kind of callable (tool, environment, rollout function,
  judge), not "reward function" for all of them; the default wording is unchanged.
- The per-row refusal of a ``chat_template_kwargs`` column names the config keys that set
  template variables.
"""

import pytest

from rlhf_fast.algorithms.rewards import load_callable
from rlhf_fast.feedback.formats import check_unrendered_fields
from rlhf_fast.trainers.dpo import DPOConfig

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"


def _dpo(tmp_path, **kw):
    return DPOConfig(model=TINY, output_dir=str(tmp_path / "run"), device="cpu", max_steps=1, **kw)


@pytest.mark.parametrize("loss_type", ["sft", ["sft"]])
def test_dpo_use_margin_with_sft_only_is_refused(tmp_path, loss_type):
    with pytest.raises(ValueError, match=r"use_margin.*loss_type|loss_type.*use_margin"):
        _dpo(tmp_path, loss_type=loss_type, use_margin=True)


def test_dpo_use_margin_with_sft_and_a_margin_loss_is_accepted(tmp_path):
    cfg = _dpo(tmp_path, loss_type=["sigmoid", "sft"], use_margin=True)
    assert cfg.use_margin


def test_load_callable_default_wording_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward function file"):
        load_callable(str(tmp_path / "missing.py") + ":f")
    with pytest.raises(ValueError, match="cannot import reward module"):
        load_callable("no_such_module_ux39:f")


def test_load_callable_names_the_kind(tmp_path):
    with pytest.raises(FileNotFoundError, match="tool file"):
        load_callable(str(tmp_path / "missing.py") + ":f", what="tool")
    with pytest.raises(ValueError, match="cannot import judge module"):
        load_callable("no_such_module_ux39:f", what="judge")


def test_loaders_name_their_kind(tmp_path):
    from rlhf_fast.rollout.custom_rollout import load_rollout_func
    from rlhf_fast.rollout.environments import load_factories
    from rlhf_fast.rollout.tools import load_tools
    from rlhf_fast.trainers.online_dpo import load_pairwise_judge

    missing = str(tmp_path / "missing.py") + ":f"
    for call, word in ((lambda: load_tools([missing]), "tool file"),
                       (lambda: load_factories(missing), "environment file"),
                       (lambda: load_rollout_func(missing), "rollout function file"),
                       (lambda: load_pairwise_judge("no_such_module_ux39:J"), "cannot import judge module")):
        with pytest.raises(ValueError) as e:
            call()
        assert word in str(e.value) and "reward" not in str(e.value), str(e.value)


def test_chat_template_kwargs_refusal_names_the_config_keys():
    problems = []
    check_unrendered_fields({"chat_template_kwargs": {"enable_thinking": False}}, problems,
                            lambda name, msg: f"{name}: {msg}")
    assert len(problems) == 1
    assert "data.chat_template_kwargs" in problems[0]
    assert "reward" in problems[0] and "drop the field" in problems[0]
    tools = []
    check_unrendered_fields({"tools": [{"type": "function"}]}, tools, lambda name, msg: f"{name}: {msg}")
    assert "data.chat_template_kwargs" not in tools[0]
