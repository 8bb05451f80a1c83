"""Small fixes (stop 39):

- TRL's names of DPO's / KTO's reward metrics (``rewards/accuracies``, ``rewards/margins``; logged
  here as ``rewards/accuracy`` / ``rewards/margin``, docs/from_trl.md) are accepted by
  ``metric_for_best_model`` (``metric_to_step_on``: reduce_lr_on_plateau / greedy, and
  load_best_model_at_end, whose checkpointed state a resume with either name continues);
- ``rlhf-fast generate`` refuses a --n × prompts product whose output cannot fit in this machine's
  memory, in one line before the model is loaded (it was killed for memory building the seeds);
- ``rlhf-fast generate --prompts FOLDER`` says the folder is not a prompts file (it blamed --out);
- ``RolloutBatch.concat([])`` is a ValueError naming ``batches``.
"""

import argparse
import json
import os
import types
import warnings

import pytest

from rlhf_fast import cli
from rlhf_fast.rollout import generate_cli
from rlhf_fast.trainers.best_checkpoint import EXTRA_KEY, BestCheckpoint
from rlhf_fast.trainers.checkpoint import checkpoint_dir
from rlhf_fast.trainers.common import metric_to_step_on

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ---- 1. TRL's metric names -------------------------------------------------------------------------

def _mcfg(name, **kw):
    return types.SimpleNamespace(metric_for_best_model=name, greater_is_better=None,
                                 lr_schedule="reduce_lr_on_plateau", **kw)


DPO_EVAL = {"eval_loss": 0.69, "eval_rewards/accuracy": 0.75, "eval_rewards/margin": 0.125}


@pytest.mark.parametrize("name, value", [("rewards/accuracies", 0.75), ("eval_rewards/accuracies", 0.75),
                                         ("rewards/margins", 0.125), ("eval_rewards/margins", 0.125),
                                         ("rewards/accuracy", 0.75)])
def test_trl_metric_names_step_the_schedule(name, value):
    assert metric_to_step_on(_mcfg(name), DPO_EVAL) == value


def test_trl_name_logged_as_such_is_read_as_such_and_unknown_still_refused():
    # a metric logged under the TRL name itself is that one (online DPO's names)
    assert metric_to_step_on(_mcfg("rewards/margins"), {**DPO_EVAL, "eval_rewards/margins": 9.0}) == 9.0
    # KTO logs no accuracy: still refused, listing what it logged
    with pytest.raises(ValueError, match="metric_for_best_model 'rewards/accuracies'.*eval_rewards/margin"):
        metric_to_step_on(_mcfg("rewards/accuracies"), {"eval_loss": 0.5, "eval_rewards/margin": 0.1})


def test_best_checkpoint_reads_the_trl_name_and_resumes_with_either(tmp_path):
    trl = BestCheckpoint(_mcfg("rewards/accuracies", save_every=1, max_steps=4))
    trl.observe(1, DPO_EVAL)
    assert trl.at_checkpoint(1) and (trl.metric, trl.step) == (0.75, 1)
    os.makedirs(os.path.join(checkpoint_dir(str(tmp_path), 1)))
    open(os.path.join(checkpoint_dir(str(tmp_path), 1), "COMPLETE"), "w").close()
    for name in ("rewards/accuracies", "eval_rewards/accuracies", "rewards/accuracy"):
        again = BestCheckpoint(_mcfg(name, save_every=1, max_steps=4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "kept for another metric" would choose afresh
            again.load(trl.state(), str(tmp_path))
        assert (again.metric, again.step) == (0.75, 1), name
    # a state of another metric is still dropped
    other = BestCheckpoint(_mcfg("rewards/margins", save_every=1, max_steps=4))
    with pytest.warns(UserWarning, match="another metric"):
        other.load(trl.state(), str(tmp_path))
    assert other.metric is None


def test_dpo_run_with_trl_metric_name_plateau_and_best_and_resume(tmp_path):
    """A DPO run configured with TRL's ``eval_rewards/accuracies`` (reduce_lr_on_plateau and
    load_best_model_at_end) trains (it was refused at the first evaluation) and a resume keeps
    its best checkpoint."""
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    tiny = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
    recs = synthetic_preference_records(24, seed=7)

    def run(steps):
        cfg = DPOConfig(model=tiny, output_dir=str(tmp_path / "dpo"), batch_size=4, lr=0.03,
                        warmup_steps=0, lr_schedule="reduce_lr_on_plateau",
                        lr_scheduler_kwargs={"mode": "max"}, eval_every=1, save_every=1, keep_checkpoints=0,
                        log_every=1, max_len=48,
                        max_steps=steps, device="cpu", load_best_model_at_end=True,
                        metric_for_best_model="eval_rewards/accuracies")
        tr = DPOTrainer(cfg, train_records=recs[:16], eval_records=recs[16:],
                        tokenizer=preference_tokenizer())
        tr.train()
        return tr

    first = run(2)
    assert first.best.step in (1, 2)
    with open(os.path.join(checkpoint_dir(first.cfg.output_dir, 2), "extra.json")) as f:
        state = json.load(f)[EXTRA_KEY]
    assert state["best_global_step"] == first.best.step
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        resumed = run(3)
    assert resumed.best.metric >= first.best.metric and resumed.best.step is not None


# ---- 2. generate: a --n × prompts product beyond memory ----------------------------------------------

def _args(*argv):
    p = argparse.ArgumentParser()
    generate_cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_huge_n_refused_before_any_allocation(tmp_path):
    """Arithmetic only: the check must refuse it without building anything (the huge number is
    never materialised here; before the fix _check_args accepted it)."""
    args = _args("--model", "tiny:llama", "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(tmp_path / "o.jsonl"),
                 "--n", "99999999999999999999999")
    with pytest.raises(ValueError, match=r"^--n 99999999999999999999999 .*memory"):
        generate_cli._check_args(args)


def test_n_times_prompts_beyond_memory_exits_2_before_the_model(tmp_path, capsys, monkeypatch):
    """A moderate --n whose output exceeds a (patched) tiny memory: exit 2, one line, the model never
    loaded, --out untouched."""
    import rlhf_fast.trainers.common as common

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(50)))
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(generate_cli, "_memory_bytes", lambda: 100_000, raising=False)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "load_causal_lm", no_model)
    try:
        rc = cli.main(["generate", "--model", "tiny:llama", "--prompts", str(prompts), "--out", str(out),
                       "--n", "100", "--max_new_tokens", "1", "--device", "cpu"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--n 100" in err and "50 prompts" in err, err
    assert not out.exists()


def test_memory_check_allows_what_fits(tmp_path):
    args = _args("--model", "tiny:llama", "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(tmp_path / "o.jsonl"),
                 "--n", "1000")
    generate_cli._check_args(args)  # (a real machine holds 1000 short lines)
    generate_cli._check_output_fits(1000, [("x" * 100, {})] * 1000)


# ---- 3. generate --prompts FOLDER -------------------------------------------------------------------

def test_prompts_folder_named_as_such(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    try:
        rc = cli.main(["generate", "--model", "tiny:llama", "--prompts", str(folder),
                       "--out", str(folder / "o.jsonl"), "--device", "cpu"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--prompts" in err and "is a folder" in err and "inside" not in err, err


# ---- 4. RolloutBatch.concat([]) ---------------------------------------------------------------------

def test_concat_of_no_batches_names_the_argument():
    from rlhf_fast.rollout.types import RolloutBatch

    with pytest.raises(ValueError, match="batches"):
        RolloutBatch.concat([], pad_id=0)
