"""SFT: completion-only loss against an independent log-softmax oracle, loss falls on a tiny
model, micro-batch split invariance, exact resume, and the CLI (bad config -> exit 2)."""

import json
import os

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, collate, completion_nll_sum, synthetic_sft_records, tokenize_sft

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"


# tiny models: one thread is far faster than two on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


def _cfg(tmp_path, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / "run"), max_steps=6, batch_size=8, lr=3e-3, warmup_steps=2,
                eval_every=0, log_every=1, max_len=48, device="cpu")  # fp32, CPU tensors in the oracles
    base.update(kw)
    return SFTConfig(**base)


def test_loss_is_completion_only_nll(tmp_path, tok):
    tr = SFTTrainer(_cfg(tmp_path), train_records=synthetic_sft_records(16), eval_records=[], tokenizer=tok)
    rows = tr.train_rows[:4]
    batch = collate(rows, tr.pad_id)
    s, n = completion_nll_sum(tr.model, batch)
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = torch.log_softmax(logits, -1)
    expected, count = 0.0, 0
    for i, r in enumerate(rows):
        for t in range(1, len(r["input_ids"])):
            if r["response_mask"][t]:
                expected -= lp[i, t - 1, r["input_ids"][t]].item()
                count += 1
    assert int(n) == count and s.item() == pytest.approx(expected, rel=1e-4)
    # prompt tokens are excluded: the mask covers exactly completion + eos
    rec = synthetic_sft_records(1)[0]
    comp = tr.tokenizer(rec.completion, add_special_tokens=False)["input_ids"] + [tr.tokenizer.eos_token_id]
    row = tokenize_sft([rec], tr.tokenizer, 48)[0][0]
    assert [t for t, m in zip(row["input_ids"], row["response_mask"]) if m] == comp


def test_loss_falls_and_resume_is_exact(tmp_path, tok):
    recs = synthetic_sft_records(96)
    cfg = _cfg(tmp_path, max_steps=20, eval_every=20, lr=1e-2)
    tr = SFTTrainer(cfg, train_records=recs[:80], eval_records=recs[80:], tokenizer=tok)
    first = tr.evaluate()["eval_loss"]
    out = tr.train()
    assert out["eval_loss"] < 0.7 * first, (first, out)
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "config.json"))
    logged = read_metrics(cfg.output_dir)
    assert logged[0]["step"] == 0 and logged[-1]["step"] == 20

    # interrupted at step 3 then resumed == uninterrupted 6 steps
    def run(name, steps):
        c = _cfg(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_every=3)
        t = SFTTrainer(c, train_records=recs[:40], eval_records=[], tokenizer=tok)
        if steps < 6:
            t.cfg = _cfg(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_every=3)
            while t.step < steps:
                t.train_step()
            t._save()
            t = SFTTrainer(c, train_records=recs[:40], eval_records=[], tokenizer=tok)
        t.train()
        return [p.detach().clone() for p in t.model.parameters()], read_metrics(c.output_dir)

    full, m_full = run("full", 6)
    resumed, m_res = run("resumed", 3)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    assert [m["loss"] for m in m_full if m["step"] > 3] == [m["loss"] for m in m_res if m["step"] > 3]


def test_run_folder_is_never_mixed_with_another_run(tmp_path, tok):
    recs = synthetic_sft_records(16)
    cfg = _cfg(tmp_path, max_steps=2, save_every=1)
    SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=tok).train()
    config_yaml = os.path.join(cfg.output_dir, "config.yaml")
    log, saved_config = read_metrics(cfg.output_dir), open(config_yaml).read()
    # a fresh run (resume false) into it is refused before anything is written
    with pytest.raises(ValueError, match=r"output_dir .*run already holds a run \(checkpoints, final, metrics.jsonl\)"
                                         r": continue it \(resume: true\)"):
        SFTTrainer(_cfg(tmp_path, max_steps=3, resume=False, lr=1e-4), train_records=recs, eval_records=[],
                   tokenizer=tok)
    assert read_metrics(cfg.output_dir) == log and open(config_yaml).read() == saved_config
    # a resume that cannot load (another model's sizes) leaves config.yaml as it was
    other = _cfg(tmp_path, max_steps=3, model=TINY.replace("hidden_size=32", "hidden_size=64"))
    with pytest.raises(ValueError, match="checkpoint"):
        SFTTrainer(other, train_records=recs, eval_records=[], tokenizer=tok).train()
    assert read_metrics(cfg.output_dir) == log and open(config_yaml).read() == saved_config
    # resuming continues the run: the log keeps steps 1-2, step 3 follows, config.yaml is the new one
    SFTTrainer(_cfg(tmp_path, max_steps=3, save_every=1), train_records=recs, eval_records=[], tokenizer=tok).train()
    assert read_metrics(cfg.output_dir)[:2] == log[:2] and [m["step"] for m in read_metrics(cfg.output_dir)] == [1, 2, 3]
    assert "max_steps: 3" in open(config_yaml).read()
    # a resume asking for fewer steps than the run has made is refused, and config.yaml is kept
    log, saved_config = read_metrics(cfg.output_dir), open(config_yaml).read()
    with pytest.raises(ValueError, match=r"max_steps \(2\) is below step 3, which the run in .* has reached"):
        SFTTrainer(_cfg(tmp_path, max_steps=2), train_records=recs, eval_records=[], tokenizer=tok).train()
    assert read_metrics(cfg.output_dir) == log and open(config_yaml).read() == saved_config

    # a run interrupted before its first checkpoint starts again, without the old log
    crashed = _cfg(tmp_path, output_dir=str(tmp_path / "crashed"), max_steps=2)
    os.makedirs(crashed.output_dir)
    with open(os.path.join(crashed.output_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 123.0}) + "\n")
    SFTTrainer(crashed, train_records=recs, eval_records=[], tokenizer=tok).train()
    assert [m["step"] for m in read_metrics(crashed.output_dir)] == [1, 2]
    assert 123.0 not in [m["loss"] for m in read_metrics(crashed.output_dir)]


@pytest.mark.filterwarnings("ignore:Seems like")
def test_grad_accum_packing_and_checkpointing_match(tmp_path, tok):
    recs = synthetic_sft_records(16)
    grads = {}
    for name, kw in (("one", dict(batch_size=8, grad_accum=1)), ("two", dict(batch_size=4, grad_accum=2)),
                     ("packed", dict(batch_size=8, grad_accum=1, packing=True)),
                     ("checkpointed", dict(batch_size=8, grad_accum=1, gradient_checkpointing=True))):
        tr = SFTTrainer(_cfg(tmp_path, output_dir=str(tmp_path / name), grad_clip=0.0, **kw),
                        train_records=recs[:8], eval_records=[], tokenizer=tok)
        assert any(getattr(m, "gradient_checkpointing", False) for m in tr.model.modules()) == (name == "checkpointed")
        tr.optimizer.step = lambda: None  # keep the gradients, skip the update
        tr.optimizer.zero_grad = lambda set_to_none=True: None
        tr.train_step()
        grads[name] = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["two"], grads["one"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["packed"], grads["one"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(grads["checkpointed"], grads["one"], rtol=1e-5, atol=1e-7)


def test_cli(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in ["yes", "no", "cat", "dog"]))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: '{TINY}'\ndata: {data}\nmax_steps: 2\nbatch_size: 2\neval_fraction: 0.25\n")
    assert cli.main(["sft", str(cfg), "--output_dir", str(tmp_path / "out"), "--lr", "1e-3"]) == 0
    assert "2 steps" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "final"))
    capsys.readouterr()
    assert cli.main(["sft", str(cfg), "--output_dir", str(tmp_path / "out"), "--resume", "false"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and len(err.strip().splitlines()) == 1, err
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    assert cli.main(["sft", str(cfg), "--output_dir", str(taken)]) == 2
    assert "expected a folder, found a file" in capsys.readouterr().err and taken.read_text() == "x"
    assert cli.main(["sft", str(cfg), "--max_steps", "zero"]) == 2
    assert "'max_steps': expected int" in capsys.readouterr().err
    assert cli.main(["sft", str(cfg), "--lrr", "1"]) == 2
    assert "unknown config key 'lrr'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    assert cli.main(["sft", str(cfg), "--data", str(bad)]) == 2
    err = capsys.readouterr().err  # one line: the count and the first problem
    assert len(err.strip().splitlines()) == 1 and "1 problem(s) in sft records (first: line 1: completion: missing field)" in err
    assert cli.main(["sft", str(cfg), "--max_len", "1", "--output_dir", str(tmp_path / "m")]) == 2
    assert "max_len (1) leaves no training example" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for key in ("--data", "--eval_data"):
        assert cli.main(["sft", str(cfg), key, str(empty), "--output_dir", str(tmp_path / "e")]) == 2
        assert f"{key[2:]} {empty} holds no records (the file is empty)" in capsys.readouterr().err


def test_one_bos_for_text_and_chat_prompts():
    from rlhf_fast.feedback.formats import SFTRecord
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    tok = train_tokenizer(sample_texts(32), 300, add_bos=True, padding_side="right")
    recs = [SFTRecord("the cat", "sat"), SFTRecord([{"role": "user", "content": "the cat"}], "sat")]
    rows, dropped = tokenize_sft(recs, tok, 64)
    assert dropped == 0
    for row in rows:
        assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"].count(tok.bos_token_id) == 1
    assert tokenize_sft([SFTRecord("the cat " * 40, "sat")], tok, 16) == ([], 1)  # prompt leaves no room


def test_resume_uses_the_new_lr_and_refuses_a_renamed_checkpoint(tmp_path, tok):
    """A resume with another lr trains at it (the optimizer's saved lr used to win silently,
    while config.yaml recorded the new one); a checkpoint whose folder name disagrees with its
    step is refused with what to do, and the run is left as it was."""
    recs = synthetic_sft_records(16)
    cfg = _cfg(tmp_path, max_steps=2, save_every=1, warmup_steps=0, lr_schedule="constant", keep_checkpoints=0)
    SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=tok).train()
    SFTTrainer(_cfg(tmp_path, max_steps=3, save_every=1, warmup_steps=0, lr_schedule="constant", keep_checkpoints=0,
                    lr=1e-4), train_records=recs, eval_records=[], tokenizer=tok).train()
    assert [(m["step"], m["lr"]) for m in read_metrics(cfg.output_dir)] == [(1, 3e-3), (2, 3e-3), (3, pytest.approx(1e-4))]
    ck = os.path.join(cfg.output_dir, "checkpoints")
    os.rename(os.path.join(ck, "step_00000003"), os.path.join(ck, "step_00000009"))
    log = read_metrics(cfg.output_dir)
    with pytest.raises(ValueError, match=r"step_00000009: extra.json says step 3 but the folder is named for step 9"):
        SFTTrainer(_cfg(tmp_path, max_steps=10), train_records=recs, eval_records=[], tokenizer=tok).train()
    assert read_metrics(cfg.output_dir) == log


def test_the_log_has_one_record_per_step_with_the_final_evaluation(tmp_path, tok):
    cfg = _cfg(tmp_path, max_steps=3)
    SFTTrainer(cfg, train_records=synthetic_sft_records(16), eval_records=synthetic_sft_records(4, seed=9),
               tokenizer=tok).train()
    recs = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)) and steps[-3:] == [1, 2, 3]  # (step 0: the evaluation at the start)
    assert "eval_loss" in recs[-1] and "loss" in recs[-1]


def test_lora_from_the_config_trains_only_adapters_and_resumes(tmp_path, tok):
    """``lora`` (LoraConfig fields, as text from the command line too): the base weights stay,
    only the adapters move and the loss falls; final/ holds the adapter; a resumed run equals
    an uninterrupted one."""
    from rlhf_fast.trainers.config import load_config

    assert load_config(SFTConfig, None, ["--lora.r", "4", "--lora.lora_alpha", "8"]).lora == {"r": 4, "lora_alpha": 8}
    with pytest.raises(ValueError, match="lora must be null or a mapping"):
        SFTConfig(lora=[4])
    recs = synthetic_sft_records(48)

    def run(name, steps):
        c = _cfg(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_every=3, lr=2e-2, lora={"r": 4})
        t = SFTTrainer(c, train_records=recs[:40], eval_records=recs[40:], tokenizer=tok)
        if steps < 6:
            while t.step < steps:
                t.train_step()
            t._save()
            t = SFTTrainer(c, train_records=recs[:40], eval_records=recs[40:], tokenizer=tok)
        return t, t.train()

    t, out = run("full", 6)
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    fresh = SFTTrainer(_cfg(tmp_path, output_dir=str(tmp_path / "fresh"), lora={"r": 4}), train_records=recs[:40],
                       eval_records=recs[40:], tokenizer=tok)
    base_before = {n: p for n, p in fresh.model.named_parameters() if "lora_" not in n}
    moved = 0
    for n, p in t.model.named_parameters():
        if "lora_" in n:
            moved += int(not torch.equal(p, dict(fresh.model.named_parameters())[n]))
        else:
            assert torch.equal(p, base_before[n]), n  # the base is frozen
    assert moved > 0
    assert out["eval_loss"] < fresh.evaluate()["eval_loss"]
    assert os.path.isfile(os.path.join(t.cfg.output_dir, "final", "adapter_config.json"))
    r, _ = run("resumed", 3)
    for (n, a), b in zip(t.model.named_parameters(), r.model.parameters()):
        assert torch.equal(a, b), n
