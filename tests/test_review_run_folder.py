"""Review of the offline trainers' run-folder lifecycle (0e9636c, 2cec46c): the folder of a fresh
SFT / reward / DPO / KTO run and its config.yaml are made at the end of setup
(``begin_fresh_run``), ``check_run_kind`` refuses another trainer's run, ``check_input_file``
names the data key, and config files refuse a repeated key (``unique_key_loader``).

The first part checks what behaves (resume flows, kinds both ways, companions written during
training, two gloo ranks); the second the bugs found, each a strict xfail until it is fixed."""

import dataclasses
import json
import os
import signal
from typing import Any, Dict

import pytest
import yaml

from rlhf_fast.trainers.common import open_supervised_run, read_metrics
from rlhf_fast.trainers.config import load_config, save_config, unique_key_loader
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer
from rlhf_fast.trainers.stop import TrainingStopped

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=128"
SFT_ROWS = [{"prompt": f"say {w}", "completion": w} for w in "yes no cat dog sun sky one two".split()]


def _saved_run(folder, cfg):
    """A folder holding ``cfg``'s config.yaml and a log line, as a run of its kind interrupted
    before its first checkpoint leaves it (a config.yaml alone is no run: a run refused in setup)."""
    os.makedirs(folder, exist_ok=True)
    save_config(cfg, os.path.join(folder, "config.yaml"))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 1.0}\n')
    return str(folder)


def _snapshot(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


# ---------------------------------------------------------------- behaves


def test_kind_check_refuses_other_trainers_and_admits_its_own_variants(tmp_path):
    """False negatives: reward into a KTO run, SFT into a reward run, KTO into a DPO run, DPO into
    a GRPO run are refused, naming both kinds, and nothing is made. False positives: ORPO / TPO /
    BEMA (DPO configs), load_best_model_at_end (SFT), a rankings reward run and an SFT run whose
    config.yaml predates the newer keys are continued by their own trainer."""
    from rlhf_fast.trainers.rl_config import RLConfig

    refused = [(KTOConfig(), RewardConfig, "kto", "reward"), (RewardConfig(), SFTConfig, "reward", "sft"),
               (DPOConfig(), KTOConfig, "dpo", "kto"), (RLConfig(estimator="grpo"), DPOConfig, "grpo", "dpo")]
    for i, (theirs, ours, k_theirs, k_ours) in enumerate(refused):
        run = _saved_run(tmp_path / f"r{i}", theirs)
        before = _snapshot(run)
        with pytest.raises(ValueError, match=rf"^output_dir .* holds a run of rlhf-fast {k_theirs}, "
                                             rf"not of rlhf-fast {k_ours}; choose another output_dir$"):
            open_supervised_run(ours(output_dir=run), True)
        assert _snapshot(run) == before
    same = [DPOConfig(loss_type="orpo"), DPOConfig(loss_type="tpo"), DPOConfig(bema={"update_freq": 1}),
            SFTConfig(load_best_model_at_end=True, eval_every=1, save_every=1),
            RewardConfig(data_kind="rankings")]
    for i, cfg in enumerate(same):
        cfg.output_dir = _saved_run(tmp_path / f"s{i}", cfg)
        run, ck = open_supervised_run(cfg, True)
        assert ck is None and run.path == cfg.output_dir
    old = _saved_run(tmp_path / "old", SFTConfig())
    saved = yaml.safe_load(open(os.path.join(old, "config.yaml")))
    for k in ("completion_only_loss", "assistant_only_loss", "packing"):  # none of SFT's markers left
        del saved[k]
    with open(os.path.join(old, "config.yaml"), "w") as f:
        yaml.safe_dump(saved, f)
    open_supervised_run(SFTConfig(output_dir=old), True)
    fresh = tmp_path / "not_yet"
    open_supervised_run(SFTConfig(output_dir=str(fresh)), True)
    assert not fresh.exists()  # made once setup is done (begin_fresh_run), not here


def test_fresh_folder_is_made_at_the_end_of_setup_with_the_epochs_max_steps(tmp_path):
    """config.yaml of a fresh reward run with num_train_epochs records the max_steps the epochs
    came to (before 0e9636c only SFT rewrote it; reward / DPO / KTO recorded the given one)."""
    out = tmp_path / "rw"
    tr = RewardTrainer(RewardConfig(model=TINY, max_steps=2, batch_size=4, num_train_epochs=0.5, output_dir=str(out)))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == tr.cfg.max_steps != 2 and saved["num_train_epochs"] == 0.5
    assert sorted(os.listdir(out)) == ["config.yaml"]  # nothing of the loop's yet (log, tb, checkpoints)


def test_dpo_stopped_crashed_resumed_and_trained_further(tmp_path, monkeypatch):
    """A DPO run with precomputed reference log-probs and generate_during_eval: SIGTERM during
    step 1 (a checkpoint at step 1), then the same command continues it and crashes in step 2's
    save (its log line and eval samples written past the checkpoint), then continues again to the
    end; the finished run resumed with a larger max_steps trains on. The log, the eval samples
    and the TensorBoard folder (opened by the loop, once the folder exists) hold each step once."""
    out = str(tmp_path / "dpo")
    kw = dict(model=TINY, batch_size=2, max_len=24, eval_every=1, save_every=1, precompute_ref_logps=True,
              generate_during_eval=True, output_dir=out, report_to="tensorboard")
    first = DPOTrainer(DPOConfig(max_steps=3, **kw))
    step = first.train_step

    def signalled():
        m = step()
        os.kill(os.getpid(), signal.SIGTERM)  # noted by StopOnSignal: the loop ends this step
        return m

    monkeypatch.setattr(first, "train_step", signalled)
    with pytest.raises(TrainingStopped, match="at step 1;"):
        first.train()
    assert os.path.isdir(os.path.join(out, "tb"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000001"]
    second = DPOTrainer(DPOConfig(max_steps=3, **kw))

    def crash():
        raise RuntimeError("disk full")

    monkeypatch.setattr(second, "_save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        second.train()
    DPOTrainer(DPOConfig(max_steps=3, **kw)).train()
    DPOTrainer(DPOConfig(max_steps=4, **kw)).train()
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["max_steps"] == 4
    with open(os.path.join(out, "eval_samples.jsonl")) as f:
        sample_steps = [json.loads(ln)["step"] for ln in f]
    assert sample_steps == sorted(sample_steps) and set(sample_steps) == {0, 1, 2, 3, 4}
    assert len(sample_steps) == 5 * sample_steps.count(4), sample_steps  # each evaluation's prompts once


def test_our_saved_config_files_load_with_the_duplicate_key_loader(tmp_path):
    """Every config.yaml we write (nested sections, dict fields) loads back through load_config's
    duplicate-key loader to the same config."""
    from rlhf_fast.trainers.rl_config import RLConfig

    cfgs = [SFTConfig(lora={"r": 4, "lora_alpha": 8}), SFTConfig(bema={"update_freq": 2}),
            DPOConfig(annotator_weights={"alice": 2.0, "1": 0.5}, loss_type=["sigmoid", "bco_pair"],
                      loss_weights=[1.0, 0.5]),
            KTOConfig(), RewardConfig(data_kind="rankings"), RLConfig(estimator="grpo")]
    for i, cfg in enumerate(cfgs):
        p = str(tmp_path / f"c{i}.yaml")
        save_config(cfg, p)
        assert "&id" not in open(p).read()  # no anchors either
        assert dataclasses.asdict(load_config(type(cfg), p)) == dataclasses.asdict(cfg)


def test_input_file_parquet_symlink_and_dataset(tmp_path):
    """check_input_file lets a Parquet file and a symlink to a file through (a symlink to a folder
    is named as a folder); load_records still takes a datasets.Dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    from rlhf_fast.feedback.formats import check_input_file, load_records
    from rlhf_fast.trainers.common import load_split_records

    pq.write_table(pa.Table.from_pylist(SFT_ROWS), str(tmp_path / "d.parquet"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    os.symlink(tmp_path / "d.jsonl", tmp_path / "link.jsonl")
    os.symlink(tmp_path, tmp_path / "dirlink")
    cfg = SFTConfig(eval_data=str(tmp_path / "link.jsonl"))
    for data in ("d.parquet", "link.jsonl"):
        cfg.data = str(tmp_path / data)
        train, ev = load_split_records(cfg, lambda p: load_records(p, "sft"), list)
        assert len(train) == len(ev) == len(SFT_ROWS)
    with pytest.raises(IsADirectoryError, match="^data .*dirlink: expected a file, found a folder$"):
        check_input_file(str(tmp_path / "dirlink"), "data")
    assert len(load_records(Dataset.from_list(SFT_ROWS), "sft")) == len(SFT_ROWS)


def test_two_ranks_restart_an_interrupted_run_and_refuse_another_kind(tmp_path):
    """torchrun, 2 gloo ranks (DDP): a DPO run into the folder of a DPO run interrupted before its
    first checkpoint starts over (rank 0 drops the old log and writes config.yaml; the other rank
    neither races nor fails); reward into that folder is then refused in one line, the folder
    left byte for byte."""
    from tests.torchrun_launch import torchrun

    out = tmp_path / "dpo"
    _saved_run(out, DPOConfig(model=TINY, max_steps=9, output_dir=str(out)))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 123.0}\n')
    ok = torchrun(["-m", "rlhf_fast.cli"], "dpo", "none", "--model", TINY, "--max_steps", "2", "--batch_size", "2",
                  "--eval_fraction", "0", "--max_len", "24", "--log_every", "1", "--output_dir", str(out),
                  "--distributed.strategy", "ddp", timeout=240)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    assert ok.stdout.count("dpo: 2 steps") == 1
    assert [m["step"] for m in read_metrics(str(out))] == [1, 2] and "123.0" not in (out / "metrics.jsonl").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["distributed"]["strategy"] == "ddp"
    before = _snapshot(str(out))
    bad = torchrun(["-m", "rlhf_fast.cli"], "reward", "none", "--model", TINY, "--max_steps", "1",
                   "--output_dir", str(out), "--distributed.strategy", "ddp", timeout=240)
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("rlhf-fast")]
    assert bad.returncode != 0 and len(lines) == 1 and "holds a run of rlhf-fast dpo" in lines[0], bad.stderr[-3000:]
    assert _snapshot(str(out)) == before


# ---------------------------------------------------------------- bugs found in review, fixed


def test_data_as_a_list_of_rows_from_python_still_trains(tmp_path):
    out = tmp_path / "sft"
    tr = SFTTrainer(SFTConfig(model=TINY, data=list(SFT_ROWS), max_steps=1, batch_size=2, output_dir=str(out)))
    assert len(tr.train_rows) + len(tr.eval_rows) == len(SFT_ROWS)


def test_data_as_a_dataset_trains_or_is_refused_naming_the_key(tmp_path):
    from datasets import Dataset

    cfg = SFTConfig(model=TINY, data=Dataset.from_list(SFT_ROWS), max_steps=1, batch_size=2,
                    output_dir=str(tmp_path / "sft"))
    try:
        SFTTrainer(cfg)
    except (TypeError, ValueError) as e:
        assert "data" in str(e) and "train_records" in str(e), e  # the key, and the way records are passed
        assert not (tmp_path / "sft").exists()


def test_merge_of_a_nested_anchor_that_overrides_its_own_merge(tmp_path):
    text = "a:\n  x: &x\n    <<: {lr: 1, beta: 2}\n    lr: 3\nb:\n  <<: *x\n  beta: 4\n"
    assert yaml.safe_load(text) == {"a": {"x": {"lr": 3, "beta": 2}}, "b": {"lr": 3, "beta": 4}}

    @dataclasses.dataclass
    class Cfg:
        a: Dict[str, Any] = dataclasses.field(default_factory=dict)
        b: Dict[str, Any] = dataclasses.field(default_factory=dict)

    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert yaml.load(text, Loader=unique_key_loader()) == yaml.safe_load(text)
    assert load_config(Cfg, str(p)).b == {"lr": 3, "beta": 4}


def test_repeated_key_in_a_command_line_mapping_is_refused():
    with pytest.raises(ValueError, match="'alice' is given twice"):
        load_config(DPOConfig, None, ["--annotator_weights", "{alice: 1, alice: 2}"])


def test_a_run_refused_in_train_does_not_block_the_folder(tmp_path):
    from rlhf_fast.feedback.formats import SFTRecord

    out = tmp_path / "run"
    sft = SFTTrainer(SFTConfig(model=TINY, max_steps=2, batch_size=2, lr_schedule="reduce_lr_on_plateau",
                               warmup_steps=0, output_dir=str(out)),
                     train_records=[SFTRecord(r["prompt"], r["completion"]) for r in SFT_ROWS], eval_records=[])
    with pytest.raises(ValueError, match="eval split is empty"):
        sft.train()
    # either fix will do: no folder left behind, or a folder with no run in it is not "a run of sft"
    if out.exists():
        open_supervised_run(DPOConfig(output_dir=str(out), resume=False), True)
