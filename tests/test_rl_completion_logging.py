"""TRL's completion-logging options of the RL trainers: ``log_unique_prompts`` (samples.jsonl
keeps the first answer of every prompt of a step instead of all the answers of its first two
prompts) and ``num_completions_to_print`` (a console table of the first N of those rows at
the same steps); neither changes training; bad values are refused naming the key."""

import io
import json
import os

import pytest

from rlhf_fast.trainers.console_samples import print_samples
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig

from tests.test_report_to import wandb_runs  # noqa: F401,E402 (a fixture)
from tests.test_rl_learning import PROMPTS, make_config, make_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def n_chars(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def _run(tmp_path, name, **kw):
    pol, tok = make_policy()
    cfg = make_config(tmp_path / name, "grpo", steps=2, sample_every=1,
                      rollout=RolloutConfig(prompts_per_step=4, group_size=3, max_new_tokens=5),
                      ppo=PPOConfig(epochs=1, mini_batch_size=12, micro_batch_size=12), **kw)
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    tr.train()
    return tr


def _read(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


def _metrics(run_dir):
    return [{k: v for k, v in row.items() if not k.startswith("time/") and "per_s" not in k}
            for row in _read(run_dir, "metrics.jsonl")]


def test_unique_prompts_and_printing_change_only_what_is_logged(tmp_path, capsys, monkeypatch):
    from rlhf_fast.trainers import rl as rl_mod

    plain = _run(tmp_path, "plain")
    plain_rows = _read(plain.run_dir.path, "samples.jsonl")
    assert "Step 1" not in capsys.readouterr().out  # null: nothing printed
    printed = []

    def spy(rows, step, file=None):
        printed.append((step, list(rows)))
        print_samples(rows, step, file)

    monkeypatch.setattr(rl_mod, "print_samples", spy)
    unique = _run(tmp_path, "unique", log_unique_prompts=True, num_completions_to_print=2)
    rows = _read(unique.run_dir.path, "samples.jsonl")
    assert _metrics(plain.run_dir.path) == _metrics(unique.run_dir.path)  # training unchanged
    # default: the answers of each step's first two prompts, 2 × group_size rows
    assert [r["step"] for r in plain_rows] == [1] * 6 + [2] * 6
    assert all(len({r["prompt"] for r in plain_rows if r["step"] == s}) == 2 for s in (1, 2))
    # unique: one row per prompt of the step (4 prompts), each the first answer of its prompt
    for step in (1, 2):
        mine = [r for r in rows if r["step"] == step]
        assert len(mine) == 4 and len({r["prompt"] for r in mine}) == 4
        firsts = [r for r in plain_rows if r["step"] == step][::3]  # the same run, first answer of each group
        assert mine[:2] == firsts
    out = capsys.readouterr().out
    assert out.count("Step 1") == 1 and out.count("Step 2") == 1
    # the first two rows of each step's samples.jsonl, no more
    assert printed == [(s, [r for r in rows if r["step"] == s][:2]) for s in (1, 2)]


def test_print_samples_table():
    buf = io.StringIO()
    print_samples([{"step": 3, "prompt": [{"role": "user", "content": "hi there"}], "completion": "yo", "reward": 0.5,
                    "source": "a"},
                   {"step": 3, "prompt": "q: x", "completion": "zz", "reward": None}], 3, file=buf)
    text = buf.getvalue()
    for part in ("Step 3", "USER: hi there", "yo", "0.500", "q: x", "zz", "—", "source"):
        assert part in text, part


@pytest.mark.parametrize("kw,key", [(dict(num_completions_to_print=0), "num_completions_to_print"),
                                    (dict(num_completions_to_print=1.5), "num_completions_to_print"),
                                    (dict(log_unique_prompts="yes"), "log_unique_prompts")])
def test_bad_values_are_refused(tmp_path, kw, key):
    with pytest.raises(ValueError, match=key):
        make_config(tmp_path, "grpo", **kw)


# -- the trackers' completions table ----------------------------------------------------------

ROWS = [{"step": 2, "prompt": "q: a|b", "completion": "x\ny\r\nw\rv\x1c", "reward": 1.5},
        {"step": 2, "prompt": [{"role": "user", "content": "hi"}], "completion": "z", "reward": None, "src": 3}]
COLUMNS = ["step", "prompt", "completion", "reward", "src"]
DATA = [[2, "q: a|b", "x\ny\r\nw\rv\x1c", 1.5, None], [2, '[{"role": "user", "content": "hi"}]', "z", None, 3]]


def _tb_texts(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_tensorboard_gets_a_markdown_table(tmp_path):
    pytest.importorskip("tensorboard")
    from rlhf_fast.trainers.common import MetricsLogger

    with MetricsLogger(str(tmp_path), report_to="tensorboard") as log:
        log.log(2, {"loss": 1.0})
        log.log_table(2, "completions", ROWS)
        log.log_table(3, "completions", [])  # nothing to send
    (step, text), = _tb_texts(str(tmp_path), "completions")
    assert step == 2
    assert text.split("\n") == ["| step | prompt | completion | reward | src |", "|---|---|---|---|---|",
                                 "| 2 | q: a\\|b | x<br>y<br>w<br>v\x1c | 1.5 |  |",
                                 '| 2 | [{"role": "user", "content": "hi"}] | z |  | 3 |']


def test_wandb_trackio_and_mlflow_get_the_table(tmp_path, monkeypatch, wandb_runs):
    import sys

    import pandas as pd

    from rlhf_fast.trainers.common import MetricsLogger
    from tests.test_report_to import fake_mlflow, fake_trackio

    trackio, mlflow = fake_trackio(), fake_mlflow()
    trackio.Table = lambda dataframe: ("trackio-table", dataframe)
    mlflow.log_table = lambda data, artifact_file: mlflow.calls.append(("log_table", data, artifact_file))
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    names = ["trackio", "mlflow"] + (["wandb"] if wandb_runs is not None else [])
    with MetricsLogger(str(tmp_path), report_to=names) as log:
        log.log_table(4, "completions", ROWS)
    (_, step, logged), = [c for c in trackio.calls if c[0] == "log"]
    kind, frame = logged["completions"]
    assert step == 4 and kind == "trackio-table"
    pd.testing.assert_frame_equal(frame, pd.DataFrame(DATA, columns=COLUMNS))
    (_, data, artifact), = [c for c in mlflow.calls if c[0] == "log_table"]
    assert artifact == "completions/step_0000004.json" and data == {c: [r[i] for r in DATA]
                                                                    for i, c in enumerate(COLUMNS)}
    if wandb_runs is not None:
        table = wandb_runs[-1]["logs"][-1]
        assert table["step"] == 4 and table["completions"].columns == COLUMNS
        assert table["completions"].data == DATA


def test_an_rl_run_sends_its_samples(tmp_path):
    pytest.importorskip("tensorboard")
    tr = _run(tmp_path, "tb", report_to="tensorboard")
    rows = _read(tr.run_dir.path, "samples.jsonl")
    texts = _tb_texts(tr.run_dir.path, "completions")
    assert [s for s, _ in texts] == [1, 2]
    for step, text in texts:  # one table line per samples.jsonl row of the step, its completions in it
        mine = [r for r in rows if r["step"] == step]
        assert len(text.split("\n")) == 2 + len(mine)  # (not splitlines: \x1c-\x1e in random answers)
        assert all(f"| {r['reward']} |" in text or r["reward"] is None for r in mine)
