"""The checkpoint / resume fixes of the review in tests/test_review_resume.py, beyond its tests:
a kill between replace_folder's renames, save leftovers, the stop hint followed, final models
written beside their folder, the keys that define a resumed run, torn logs and labels files.
Tiny models, one thread."""

import json
import os

import pytest
import torch
import yaml

from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers.common import log_records_up_to, open_supervised_run, read_metrics, truncate_metrics
from rlhf_fast.trainers.sft import SFTTrainer, continue_hint, synthetic_sft_records

pytestmark = pytest.mark.usefixtures("one_thread")

# the review's tiny SFT setup (its sft_tok fixture too)
from tests.test_review_resume import SFT_TINY, _sft_cfg, sft_tok  # noqa: E402,F401


def _save(run, step, model):
    return ckpt.save_checkpoint(ckpt.checkpoint_dir(run, step), models={"m": model}, extra={"step": step})


def _disk_full_in(monkeypatch, part):
    """transformers' safetensors writer failing (a full disk) for files under a folder ``part``."""
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.safe_save_file

    def failing(state_dict, filename, metadata=None):
        if f"{os.sep}{part}{os.sep}" in filename:
            with open(filename, "wb") as f:
                f.write(b"\0" * 10)
            raise OSError(28, "No space left on device")
        return real(state_dict, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", failing)
    return lambda: monkeypatch.setattr(modeling_utils, "safe_save_file", real)


# ---------------------------------------------------------------- replace_folder killed between its renames


def test_a_checkpoint_left_aside_by_a_kill_is_found_and_kept(tmp_path, monkeypatch):
    """A kill (no exception: nothing runs) after replace_folder moved step_N aside and before the
    new one came in: latest_checkpoint resumes from it again, a prune keeps it; the folder it
    was moved to is named after it."""
    run, model = str(tmp_path), torch.nn.Linear(3, 2)
    _save(run, 2, model)
    folder = _save(run, 3, model)
    real, calls = os.replace, []

    def record(src, dst):
        calls.append((src, dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", record)
    _save(run, 3, model)
    monkeypatch.setattr(os, "replace", real)
    aside = os.path.basename(calls[0][1])
    assert calls[0][0] == folder and aside.startswith(".old-step_00000003-")
    os.rename(folder, os.path.join(os.path.dirname(folder), aside))  # what the kill left
    assert ckpt.latest_checkpoint(run) == folder
    fresh = torch.nn.Linear(3, 2)
    assert ckpt.load_checkpoint(folder, models={"m": fresh}, restore_rng=False)["step"] == 3
    assert torch.equal(fresh.weight, model.weight)
    os.rename(folder, os.path.join(os.path.dirname(folder), aside))
    ckpt.prune_checkpoints(run, 1)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000003"]


def test_an_exception_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Ctrl-C (or an OSError) as the new folder is renamed in: the old one is back at once, before
    any prune or resume looks, and the new one's temporary folder is gone."""
    run, model = str(tmp_path), torch.nn.Linear(3, 2)
    folder = _save(run, 3, model)
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(run, 3, torch.nn.Linear(3, 2))
    monkeypatch.setattr(os, "replace", real)
    assert os.listdir(os.path.dirname(folder)) == ["step_00000003"]
    fresh = torch.nn.Linear(3, 2)
    ckpt.load_checkpoint(folder, models={"m": fresh}, restore_rng=False)
    assert torch.equal(fresh.weight, model.weight)


def test_a_folder_left_aside_beside_its_replacement_is_removed(tmp_path):
    """A kill after the new folder came in, before the old one was deleted: the old one goes at
    the next prune (the new one is not touched), whatever keep_checkpoints."""
    run, model = str(tmp_path), torch.nn.Linear(3, 2)
    folder = _save(run, 3, model)
    stale = os.path.join(run, "checkpoints", ".old-step_00000003-x1y2z3")
    os.makedirs(stale)
    open(os.path.join(stale, "COMPLETE"), "w").close()
    ckpt.prune_checkpoints(run, 0)
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_00000003"]
    assert ckpt.latest_checkpoint(run) == folder


def test_prune_removes_every_save_leftover_but_no_checkpoint(tmp_path):
    """Temporary folders of every kind of save (one-process, sharded, of a checkpoint or a
    companion) go, with keep_checkpoints 0 too; complete checkpoints and companions stay."""
    run, model = str(tmp_path), torch.nn.Linear(3, 2)
    root = os.path.join(run, "checkpoints")
    for step in (1, 2):
        _save(run, step, model)
        ckpt.save_checkpoint(os.path.join(root, f"reference_step_{step:08d}"), models={"m": model})
    for name in (".tmp-step_00000003-ab", ".tmp-bema_step_00000003-cd", "step_00000003.tmp",
                 "reference_step_00000003.tmp", "bema_step_00000003.old"):
        os.makedirs(os.path.join(root, name, "models"))
    ckpt.prune_checkpoints(run, 0)
    assert sorted(os.listdir(root)) == ["reference_step_00000001", "reference_step_00000002", "step_00000001",
                                        "step_00000002"]


# ---------------------------------------------------------------- the stop hint of resume: false


def test_a_run_stopped_with_resume_false_continues_as_its_hint_says(tmp_path, sft_tok, monkeypatch):
    """The hint names resume: true only where it is needed, and following it continues the run
    to the step an uninterrupted run reaches, with one record per step."""
    import signal

    from rlhf_fast.trainers.stop import TrainingStopped

    assert continue_hint(_sft_cfg(tmp_path)) == "the same command"
    recs = synthetic_sft_records(16)
    tr = SFTTrainer(_sft_cfg(tmp_path / "run", resume=False), train_records=recs, eval_records=[], tokenizer=sft_tok)
    step = tr.train_step

    def signalled():
        m = step()
        os.kill(os.getpid(), signal.SIGTERM)
        return m

    monkeypatch.setattr(tr, "train_step", signalled)
    with pytest.raises(TrainingStopped, match=r"resume: true \(--resume true\)"):
        tr.train()
    SFTTrainer(_sft_cfg(tmp_path / "run", resume=True), train_records=recs, eval_records=[],
               tokenizer=sft_tok).train()
    assert [m["step"] for m in read_metrics(str(tmp_path / "run"))] == [1, 2, 3]


# ---------------------------------------------------------------- a finished run resumed


def test_a_finished_run_resumed_returns_its_last_evaluation_and_leaves_the_log(tmp_path, sft_tok):
    """Resumed at its last step, a run logs nothing more (the log is byte for byte what it was)
    and still returns that step's evaluation, equal to the one logged."""
    recs = synthetic_sft_records(24)

    def train():
        return SFTTrainer(_sft_cfg(tmp_path / "run", eval_every=2, save_every=2), train_records=recs[:16],
                          eval_records=recs[16:], tokenizer=sft_tok).train()

    train()
    log = tmp_path / "run" / "metrics.jsonl"
    before = log.read_bytes()
    again = train()
    assert log.read_bytes() == before
    last = read_metrics(str(tmp_path / "run"))[-1]
    assert last["step"] == 3 and again["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-12)


# ---------------------------------------------------------------- final/ written beside it


def test_a_failed_resave_of_final_keeps_the_previous_model(tmp_path, sft_tok, monkeypatch):
    """A finished run resumed saves final/ again; when that save fails, final/ is still the
    complete model it was (not a mix, not gone), and nothing is left beside it."""
    from transformers import AutoModelForCausalLM

    recs = synthetic_sft_records(16)
    run = tmp_path / "run"
    SFTTrainer(_sft_cfg(run, max_steps=2), train_records=recs, eval_records=[], tokenizer=sft_tok).train()
    final = run / "final"
    files = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    restore = _disk_full_in(monkeypatch, "final")
    with pytest.raises(OSError, match="No space left"):
        SFTTrainer(_sft_cfg(run, max_steps=2), train_records=recs, eval_records=[], tokenizer=sft_tok).train()
    restore()
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} == files
    AutoModelForCausalLM.from_pretrained(str(final))
    assert not [n for n in os.listdir(run) if n.startswith((".tmp-final", ".old-final"))]


def test_staged_folder_recovers_and_clears_what_a_kill_left(tmp_path):
    """A final/ a kill left aside (nothing in its place) is moved back before a new write, and a
    killed write's temporary folder is removed; a failed write leaves the folder as it was."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "w").write_text("old")
    os.rename(final, tmp_path / ".old-final-k1ll")
    (tmp_path / ".tmp-final-k1ll" / "final").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with ckpt.staged_folder(str(final)) as tmp:
            assert os.path.basename(tmp) == "final" and os.listdir(tmp) == []
            raise RuntimeError("save failed")
    assert sorted(os.listdir(tmp_path)) == ["final"] and (final / "w").read_text() == "old"
    with ckpt.staged_folder(str(final)) as tmp:
        with open(os.path.join(tmp, "w2"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(tmp_path)) == ["final"] and os.listdir(final) == ["w2"]


def test_a_failed_rl_final_save_leaves_no_final(tmp_path, monkeypatch):
    """RLTrainer.save_final writes final/policy (and critic) in one folder renamed into place."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import RolloutConfig
    from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, rollout=RolloutConfig(prompts_per_step=2, group_size=4,
                                                                       max_new_tokens=4))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)
    restore = _disk_full_in(monkeypatch, "final")
    with pytest.raises(OSError, match="No space left"):
        tr.train()
    restore()
    run = cfg.output_dir
    assert not os.path.exists(os.path.join(run, "final"))
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-final")]


def test_a_failed_reward_lora_merge_keeps_final_as_it_was(tmp_path, monkeypatch):
    """The LoRA reward model's merge into final/ is written beside it: a failure leaves the
    folder's files as they were."""
    from rlhf_fast.models.tiny import tiny_reward_model
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
    from tests.test_reward import TINY, preference_tokenizer

    tok = preference_tokenizer()
    rm = tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = RewardConfig(model=TINY, output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, max_len=48,
                       lora={"r": 4}, eval_every=0)
    tr = RewardTrainer(cfg, model=rm, tokenizer=tok, train_records=synthetic_preference_records(8, seed=1),
                       eval_records=[])
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    restore = _disk_full_in(monkeypatch, "final")
    with pytest.raises(OSError, match="No space left"):
        tr.save_merged(str(final))
    restore()
    assert os.listdir(final) == ["adapter_config.json"]


# ---------------------------------------------------------------- the keys that define a run


def _held_run(folder, cfg):
    """``folder`` as a run of ``cfg`` with a complete checkpoint (what open_supervised_run reads)."""
    from rlhf_fast.trainers.config import save_config

    os.makedirs(folder, exist_ok=True)
    save_config(cfg, os.path.join(folder, "config.yaml"))
    _save(str(folder), 2, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("key,other", [("model", "tiny:llama:hidden_size=16"), ("data", "b.jsonl"),
                                       ("eval_data", "held_b.jsonl")])
def test_a_resume_that_changes_a_run_defining_key_is_refused(tmp_path, key, other):
    from rlhf_fast.trainers.dpo import DPOConfig

    run = tmp_path / "run"
    base = dict(output_dir=str(run), data="a.jsonl", eval_data="held_a.jsonl")
    _held_run(run, DPOConfig(**base))
    with pytest.raises(ValueError, match=rf"{key} .*{other}.*choose another output_dir") as refused:
        open_supervised_run(DPOConfig(**{**base, key: other}), True)
    assert str(run) in str(refused.value)
    _, ck = open_supervised_run(DPOConfig(**{**base, "data": "./a.jsonl", "lr": 1e-3}), True)  # the same run
    assert ck == ckpt.checkpoint_dir(str(run), 2)


def test_a_saved_config_without_the_key_is_not_compared(tmp_path):
    run = tmp_path / "run"
    _held_run(run, _sft_cfg(run, data="a.jsonl"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["data"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    _, ck = open_supervised_run(_sft_cfg(run, data="b.jsonl"), True)
    assert ck is not None


# ---------------------------------------------------------------- torn logs, labels files


def test_a_metrics_log_torn_inside_a_character_is_cut_back_and_bad_bytes_elsewhere_named(tmp_path):
    good = json.dumps({"step": 1, "note": "é"}, ensure_ascii=False) + "\n"
    torn = json.dumps({"step": 2, "note": "é"}, ensure_ascii=False).encode()[:-3]  # inside the é
    (tmp_path / "metrics.jsonl").write_bytes(good.encode() + torn)
    truncate_metrics(str(tmp_path), 5)
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == good
    (tmp_path / "bad.jsonl").write_bytes(b'{"step": 1, "x": "\xe9"}\n' + good.encode())
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not UTF-8"):
        log_records_up_to(str(tmp_path / "bad.jsonl"), 5)


@pytest.mark.parametrize("start", [None, b"", b'{"a": 1}\n', b'{"a": 1}'])
def test_label_append_starts_a_line_of_its_own(tmp_path, start):
    from rlhf_fast.feedback.label import _append

    path = tmp_path / "labels.jsonl"
    if start is not None:
        path.write_bytes(start)
    _append(str(path), {"b": 2})
    lines = path.read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == ([{"a": 1}] if start and start.strip() else []) + [{"b": 2}]
    assert path.read_bytes().endswith(b"}\n")
