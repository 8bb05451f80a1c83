"""Review of checkpoints, atomic writes and exact resume across the trainers (revresume).

Each defect found is a strict xfail until it is fixed; each test fails on the code as reviewed
and passes once the behaviour it names is right. Tiny models, one thread, a few seconds each."""

import os
import signal

import pytest
import torch
import yaml

from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, RolloutConfig
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from rlhf_fast.trainers.stop import TrainingStopped
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")

SFT_TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"


@pytest.fixture(scope="module")
def sft_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


def _sft_cfg(out, **kw):
    base = dict(model=SFT_TINY, output_dir=str(out), max_steps=3, batch_size=4, eval_every=0, save_every=0,
                log_every=1, max_len=48, device="cpu", lr=1e-2)
    base.update(kw)
    return SFTConfig(**base)


def _rl(tmp_path, estimator="grpo", **kw):
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4))
    cfg = make_config(tmp_path, estimator, **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)


def _saved_config(run):
    with open(os.path.join(run, "config.yaml")) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------- RL: hyperparameters on resume


def test_rl_resume_with_a_new_fixed_kl_coef_uses_it(tmp_path):
    """The project's rule for resumes (checkpoint.keeping_hyperparameters, README 'a changed learning
    rate applies from the resumed step'): the settings of the config the run is resumed with apply,
    and config.yaml records them. With the fixed controller kl.coef is a setting, not state; here the
    resumed run trains with the old 0.01 while config.yaml says 0.5."""
    first = _rl(tmp_path, steps=1, kl=KLConfig(coef=0.01))
    first.train()
    run = first.config.output_dir
    resumed = _rl(tmp_path, steps=2, kl=KLConfig(coef=0.5), resume=run)
    resumed.train()
    assert _saved_config(run)["kl"]["coef"] == 0.5
    step2 = [m for m in read_metrics(run) if m["step"] == 2][0]
    assert resumed.kl_ctl.value == 0.5 and step2["kl/coef"] == 0.5, (resumed.kl_ctl.value, step2["kl/coef"])


def test_rl_resume_with_a_new_adaptive_kl_target_uses_it(tmp_path):
    """The adaptive controller's β is state (kept), but its target and horizon are settings: a run
    resumed with kl.target 0.5 (config.yaml records 0.5) still steers β towards the old 6.0."""
    kl = dict(coef=0.05, controller="adaptive", horizon=100)
    first = _rl(tmp_path, steps=1, kl=KLConfig(target=6.0, **kl))
    first.train()
    run = first.config.output_dir
    resumed = _rl(tmp_path, steps=1, kl=KLConfig(target=0.5, **dict(kl, horizon=50)), resume=run)
    resumed.load(run)
    assert resumed.kl_ctl.value == first.kl_ctl.value  # β continues
    assert (resumed.kl_ctl.target, resumed.kl_ctl.horizon) == (0.5, 50), (resumed.kl_ctl.target,
                                                                         resumed.kl_ctl.horizon)


# ---------------------------------------------------------------- RL: a run of another kind


def test_rl_resume_of_a_run_of_another_kind_is_refused(tmp_path):
    """The offline trainers refuse a folder holding another kind's run (check_run_kind, README
    'An output_dir holding a run of another trainer ... is refused before anything in it is
    touched'); `rlhf-fast grpo GRPO.yaml --resume PPO_RUN` (a config file of its own) and the Python
    API continue a PPO run as GRPO: the checkpoint's critic is ignored, the next checkpoints have
    none, and config.yaml says grpo."""
    ppo = _rl(tmp_path, "gae", steps=1)
    ppo.train()
    run = ppo.config.output_dir
    before = open(os.path.join(run, "config.yaml")).read()
    with pytest.raises(ValueError, match=r"(?i)ppo|gae"):
        _rl(tmp_path, "grpo", steps=2, resume=run).train()
    assert open(os.path.join(run, "config.yaml")).read() == before
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000001"]


# ---------------------------------------------------------------- offline: a finished run resumed


def test_finished_run_resumed_keeps_one_record_per_step(tmp_path, sft_tok):
    """training_loop promises one line per step in the log, and a resume cuts the log back to the
    checkpoint 'so the log continues as if the run had never stopped' (truncate_metrics). Running a
    finished run's command again (resume: true, the default) evaluates the last step again and
    appends a second step-3 record (eval only) after the first: steps [0, 1, 2, 3, 3]."""
    recs = synthetic_sft_records(24)
    cfg = dict(eval_every=2, save_every=2)
    SFTTrainer(_sft_cfg(tmp_path / "run", **cfg), train_records=recs[:16], eval_records=recs[16:],
               tokenizer=sft_tok).train()
    once = [m["step"] for m in read_metrics(str(tmp_path / "run"))]
    assert once == [0, 1, 2, 3]
    SFTTrainer(_sft_cfg(tmp_path / "run", **cfg), train_records=recs[:16], eval_records=recs[16:],
               tokenizer=sft_tok).train()
    assert [m["step"] for m in read_metrics(str(tmp_path / "run"))] == once


# ---------------------------------------------------------------- atomic saves


def test_an_interrupted_resave_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A checkpoint saved again at the same step (a finished SFT / RL run resumed saves its last
    step again) replaces the folder: replace_folder moves the old one aside to .old-*, then renames
    the new one in. A Ctrl-C (KeyboardInterrupt) or kill between the two renames leaves nothing at
    step_N: save_checkpoint removes the new copy, latest_checkpoint no longer sees the step, and the
    next prune deletes the .old-* copy — the run's only checkpoint is lost, against replace_folder's
    'a crash leaves the old folder or the new one at path, never neither' and README's 'the
    checkpoints written before it are intact and resume exactly'."""
    model = torch.nn.Linear(3, 2)
    folder = ckpt.checkpoint_dir(str(tmp_path), 3)
    ckpt.save_checkpoint(folder, models={"m": model}, extra={"step": 3})
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder is aside; the new one is not in yet
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, models={"m": model}, extra={"step": 3})
    monkeypatch.setattr(os, "replace", real)
    ckpt.prune_checkpoints(str(tmp_path), 2)  # what the next save does
    assert ckpt.latest_checkpoint(str(tmp_path)) == folder
    fresh = torch.nn.Linear(3, 2)
    assert ckpt.load_checkpoint(folder, models={"m": fresh}, restore_rng=False)["step"] == 3
    assert torch.equal(fresh.weight, model.weight)


# ---------------------------------------------------------------- stop signals


def test_stop_hint_of_a_run_started_with_resume_false(tmp_path, sft_tok, monkeypatch):
    """TrainingStopped's hint (and the CLI's one line) must say how to continue. For an SFT / reward
    / DPO / KTO run it is always 'the same command'; a run started with resume: false (a user's
    explicit fresh start, or a Slurm script that passes --resume false) is refused by that same
    command (check_fresh_run_dir). The hint should name resume: true."""
    recs = synthetic_sft_records(16)
    cfg = _sft_cfg(tmp_path / "run", resume=False)
    tr = SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=sft_tok)
    step = tr.train_step

    def signalled():
        m = step()
        os.kill(os.getpid(), signal.SIGTERM)  # noted by StopOnSignal: the loop ends this step
        return m

    monkeypatch.setattr(tr, "train_step", signalled)
    with pytest.raises(TrainingStopped) as stopped:
        tr.train()
    hint = stopped.value.resume
    try:  # the same command: either it continues the run, or the hint says what to change
        SFTTrainer(_sft_cfg(tmp_path / "run", resume=False), train_records=recs, eval_records=[], tokenizer=sft_tok)
    except ValueError as refused:
        assert "already holds a run" in str(refused)
        assert "resume: true" in hint or "--resume true" in hint, hint


def test_leftovers_of_a_killed_companion_save_are_pruned(tmp_path):
    """save_checkpoint cleans its temporary folder on a Python exception only; a SIGKILL (the OOM
    killer, Slurm after its grace period) leaves it, a whole model copy. prune_checkpoints removes
    the ones of a checkpoint (``.tmp-step_*``, 'a whole model copy each'), and prune_companions the
    companion folders whose checkpoint is gone, but the temporary folder of TR-DPO's moving
    reference or BEMA's buffers (written by the same save_checkpoint, prefixed
    ``.tmp-reference_step_`` / ``.tmp-bema_step_``) stays for good."""
    run = str(tmp_path)
    model = torch.nn.Linear(3, 2)
    for step in (1, 2):
        ckpt.save_checkpoint(ckpt.checkpoint_dir(run, step), models={"m": model}, extra={"step": step})
    root = os.path.join(run, "checkpoints")
    killed = []
    for prefix in ("step_", "reference_step_", "bema_step_"):  # as save_checkpoint names its temporary folder
        folder = os.path.join(root, f".tmp-{prefix}00000003-k1ll3d")
        os.makedirs(os.path.join(folder, "models", "m"))
        with open(os.path.join(folder, "models", "m", "model.safetensors"), "wb") as f:
            f.write(b"\0" * 64)
        killed.append(folder)
    ckpt.prune_checkpoints(run, 2)  # what the next save_supervised / RL save runs
    for prefix in ("reference_", "bema_"):
        ckpt.prune_companions(run, prefix)
    assert not os.path.exists(killed[0])  # the checkpoint's own leftover: removed
    left = sorted(n for n in os.listdir(root) if n.startswith("."))
    assert left == [], left


def test_label_resumes_a_file_whose_last_record_has_no_newline(tmp_path, monkeypatch):
    """read_labels accepts a labels file whose last line is a complete record without a newline
    (a file written by another script with '\\n'.join, or a crash between the record and its
    newline), and _append then writes the next record right after it: '{...}{...}'. The next
    session fails with 'labels.jsonl:1: invalid JSON: not a labels file' — every label in the file
    is locked out until it is repaired by hand."""
    import io
    import json
    import sys

    from rlhf_fast import cli
    from rlhf_fast.feedback.label import read_labels

    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "a": f"A{i}", "b": f"B{i}"}) + "\n" for i in range(3)))

    def label(*answers):
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(a + "\n" for a in answers)))
        return cli.main(["label", str(pairs), "--out", str(out), "--annotator", "x"])

    assert label("a", "q") == 0
    out.write_text(out.read_text().rstrip("\n"))  # the same record, without its newline
    assert label("b", "q") == 0
    assert [r["label"] for r in read_labels(str(out))] == ["A", "B"]


def test_rl_keep_checkpoints_zero_keeps_them_all(tmp_path):
    """docs/from_trl.md maps TRL's ``save_total_limit`` (default None: keep every checkpoint) to
    ``keep_checkpoints`` for RL too; SFT / reward / DPO / KTO take 0 for that (prune_checkpoints:
    'keep <= 0 keeps all'), but RLConfig raises 'keep_checkpoints must be an int > 0, got 0', and
    no other value keeps them all."""
    tr = _rl(tmp_path, steps=3, save_every=1, keep_checkpoints=0)
    tr.train()
    assert sorted(os.listdir(os.path.join(tr.config.output_dir, "checkpoints"))) == [
        "step_00000001", "step_00000002", "step_00000003"]


def test_rl_run_killed_before_its_first_checkpoint_can_be_continued_as_told(tmp_path):
    """With the default save_every 0 the only checkpoint is the last step's, so an RL run killed
    (SIGKILL, OOM) before the end leaves config.yaml, metrics.jsonl and tb/. Started again, it is
    refused with 'already holds a run (metrics.jsonl): continue it (resume: RUN, or --resume RUN)';
    doing so raises FileNotFoundError 'resume: no complete checkpoint'. The offline trainers drop
    such a log and start again (open_supervised_run); here the only way on is deleting the folder
    by hand. Either the hint must not offer a resume, or the resume must start the run again."""
    import shutil

    first = _rl(tmp_path, steps=1)
    first.train()
    run = first.config.output_dir
    for part in ("checkpoints", "final"):  # what a kill before the end of the run leaves
        shutil.rmtree(os.path.join(run, part))
    try:
        _rl(tmp_path, steps=1).train()
        return  # a fresh start into it is allowed
    except ValueError as refused:
        hint = str(refused)
    assert "already holds a run" in hint
    if "continue it (resume:" in hint:  # then that resume must work
        _rl(tmp_path, steps=1, resume=run).train()
        assert [m["step"] for m in read_metrics(run)] == [1]


def test_a_failed_final_save_leaves_no_torn_final_model(tmp_path, sft_tok, monkeypatch):
    """Checkpoints and merged/ models are written to a temporary folder and renamed into place;
    the final model is not. A full disk (or a kill past the stop signal's grace period) while
    save_pretrained writes final/ leaves config.json with a truncated model.safetensors: the run
    folder then reads as finished ('finished (`final/` holds the trained model)') and the model
    does not load. A final/ that exists must be complete."""
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM

    from rlhf_fast.trainers.report import render_report

    real = modeling_utils.safe_save_file

    def disk_full_in_final(state_dict, filename, metadata=None):
        if f"{os.sep}final{os.sep}" in filename:
            with open(filename, "wb") as f:
                f.write(b"\0" * 10)  # what a full disk leaves of it
            raise OSError(28, "No space left on device")
        return real(state_dict, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full_in_final)
    run = str(tmp_path / "run")
    with pytest.raises(OSError, match="No space left"):
        SFTTrainer(_sft_cfg(run, max_steps=2), train_records=synthetic_sft_records(16), eval_records=[],
                   tokenizer=sft_tok).train()
    monkeypatch.setattr(modeling_utils, "safe_save_file", real)
    assert "**Status**: finished" not in render_report(run, run, plot=False)
    final = os.path.join(run, "final")
    if os.path.isdir(final):
        AutoModelForCausalLM.from_pretrained(final)


def test_resume_with_other_training_data_is_refused_or_warned(tmp_path, sft_tok):
    """SFT / reward / DPO / KTO resume their output_dir by default, and output_dir has a default
    (runs/sft). A second experiment on another data file into the same folder is taken for a
    resume of the first: its finished checkpoint is loaded, no step trains, final/ is saved again
    from the first run's weights and config.yaml is rewritten to name the new data — a model
    trained on a.jsonl recorded as trained on b.jsonl, with no message. A changed data source is
    no resume the README describes ('continues exactly'; only a new lr is said to apply): refuse
    it naming the key, or at least warn."""
    import json
    import warnings

    recs = synthetic_sft_records(32)
    for name, part in (("a.jsonl", recs[:16]), ("b.jsonl", recs[16:])):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n"
                                             for r in part))
    run = tmp_path / "run"
    SFTTrainer(_sft_cfg(run, max_steps=2, data=str(tmp_path / "a.jsonl")), tokenizer=sft_tok).train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            SFTTrainer(_sft_cfg(run, max_steps=2, data=str(tmp_path / "b.jsonl")), tokenizer=sft_tok).train()
        except ValueError as refused:
            assert "data" in str(refused)
            return
    assert any("data" in str(w.message) for w in seen), [str(w.message) for w in seen]


def test_a_log_torn_inside_a_multibyte_character_is_cut_back(tmp_path):
    """log_records_up_to promises that 'a torn last line (the process died mid-write, after the
    checkpoint it resumes from) is dropped'. metrics.jsonl and samples.jsonl are ASCII (json.dumps'
    default), but DPO's generate_during_eval appends eval_samples.jsonl with ensure_ascii=False, so
    a kill or a full disk mid-write of non-English answers tears it inside a character (most bytes
    of CJK text are in the middle of one). The resumed run's first evaluation then fails in
    append_samples with a bare UnicodeDecodeError instead of dropping the torn line."""
    import json

    from rlhf_fast.trainers.eval_samples import SAMPLES_FILE, append_samples

    path = tmp_path / SAMPLES_FILE
    kept = json.dumps({"step": 2, "prompt": "q", "policy": "日本語"}, ensure_ascii=False) + "\n"
    torn = json.dumps({"step": 4, "prompt": "q", "policy": "日本語"}, ensure_ascii=False).encode()[:-3]
    path.write_bytes(kept.encode() + torn)  # cut inside the last 語
    append_samples(str(tmp_path), [{"step": 4, "prompt": "q", "policy": "はい"}], first=True)
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["step"], r["policy"]) for r in rows] == [(2, "日本語"), (4, "はい")]
