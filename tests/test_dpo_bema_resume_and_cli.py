"""Regressions found by review: a refused BEMA resume (bema turned on for a run written without
it: "no BEMA state") leaves the run folder as it was, its config.yaml and metrics.jsonl
untouched (the state kept beside a checkpoint loads before resume_supervised rewrites the
folder); and ``--bema {}`` turns BEMA on from the command line with TRL's defaults, as the
docs say (a section given whole as YAML text)."""

import os

import pytest

from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.reward import synthetic_preference_records
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _trainer(tmp_path, tok, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / "run"), batch_size=4, lr=3e-2, warmup_steps=0, eval_every=0,
                log_every=1, max_len=48, max_steps=2, device="cpu", save_every=1)
    base.update(kw)
    return DPOTrainer(DPOConfig(**base), tokenizer=tok, eval_records=[],
                      train_records=synthetic_preference_records(12, seed=3))


def _read(path):
    with open(path) as f:
        return f.read()


def test_a_refused_bema_resume_leaves_the_run_folder_as_it_was(tmp_path):
    tok = preference_tokenizer()
    _trainer(tmp_path, tok).train()  # bema off (the default)
    run = tmp_path / "run"
    before = {name: _read(run / name) for name in ("config.yaml", "metrics.jsonl")}
    # the same run resumed with bema on, and further: refused (its checkpoints hold no BEMA state)
    with pytest.raises(ValueError, match="no BEMA state"):
        _trainer(tmp_path, tok, max_steps=4, bema={"update_freq": 1}).train()
    after = {name: _read(run / name) for name in ("config.yaml", "metrics.jsonl")}
    assert "bema: null" in before["config.yaml"]
    assert after == before, "the refused resume rewrote config.yaml (bema on, max_steps 4) for a run that has neither"
    assert sorted(os.listdir(run / "checkpoints"))[-1] == "step_00000002"


def test_bema_with_trls_defaults_from_the_command_line():
    """docs/from_trl.md's BEMA row: "null (the default) is off, `bema: {}` on with TRL's defaults".
    In a YAML file that works; on the command line (`rlhf-fast dpo cfg.yaml --bema {}`, as
    `--lora {}` turns LoRA on) the loader refuses the text: "config key 'bema': expected a mapping
    for BEMAConfig, got '{}'" (rlhf_fast/trainers/config.py reads a mapping's text as YAML for a
    dict field, not for an Optional[dataclass] one)."""
    from rlhf_fast.trainers.bema import BEMAConfig
    from rlhf_fast.trainers.config import load_config

    assert load_config(DPOConfig, None, ["--lora", "{}"]).lora == {}  # the pattern it follows
    assert load_config(DPOConfig, None, ["--bema", "{}"]).bema == BEMAConfig()
    assert load_config(DPOConfig, None, ["--bema", "{update_freq: 3}"]).bema == BEMAConfig(update_freq=3)
