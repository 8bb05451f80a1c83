"""DPO's ``generate_during_eval`` (TRL's CPO / ORPO option): the records of eval_samples.jsonl
(count, fields, steps, the prompts drawn from seed and step), the greedy answers against
transformers' ``generate(do_sample=False)`` with TRL's ``max_length`` budget — the policy's from
the final weights, the reference's from the frozen copy / the LoRA base with adapters disabled —,
a run's metrics and weights bit for bit those of the same run without the option, the random
states and the models' train / eval modes left as they were, a resumed run appending, the bad
value refused and the CLI flag."""

import json
import os
import random
import sys
import types

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast import cli  # noqa: E402
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer  # noqa: E402
from rlhf_fast.trainers.eval_samples import SAMPLES_FILE, sample_indices  # noqa: E402
from rlhf_fast.trainers.reward import synthetic_preference_records  # noqa: E402
from tests.test_reward import preference_tokenizer  # noqa: E402
from tests.test_trainer_common import untimed_metrics  # noqa: E402

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
RECS = synthetic_preference_records(40, seed=6)
EVAL = synthetic_preference_records(6, seed=9)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _model(tok):
    """The tiny policy with attention dropout, kept on (``disable_dropout: false``): a model left
    in eval mode, or a torch stream drawn from, would change the training steps after an
    evaluation."""
    from tests.test_sft_epochs import dropout_model

    return dropout_model(tok, 0.2)


def _trainer(tmp_path, tok, name, **kw):
    return DPOTrainer(_cfg(tmp_path, name, **kw), model=_model(tok), tokenizer=tok, train_records=RECS,
                      eval_records=EVAL)


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=4, lr=2e-2, warmup_steps=0,
                lr_schedule="constant", eval_every=2, log_every=1, max_len=40, max_steps=4, device="cpu",
                disable_dropout=False)
    base.update(kw)
    return DPOConfig(**base)


def _samples(run_dir):
    path = os.path.join(run_dir, SAMPLES_FILE)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _hf_greedy(model, tok, prompts, max_len):
    """TRL's ``generate_from_model`` with ``do_sample=False``: the prompts left-padded into one
    batch, ``generate(max_length=max_len, pad_token_id=pad)``; the new tokens decoded without
    special tokens (TRL cuts the prompt's characters off the decoded row instead)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        am[i, P - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=am, max_length=max_len, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, P:], skip_special_tokens=True)


def _state(tr):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


# a full policy's precomputed log-probs leave no reference model (no "reference" answers); a LoRA
# policy's base is still there
CASES = [dict(), dict(lora={"r": 4}, lr=5e-2), dict(lora={"r": 4}, lr=5e-2, precompute_ref_logps=True),
         dict(precompute_ref_logps=True), dict(loss_type="orpo", beta=0.5)]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kw", CASES, ids=["reference_copy", "lora", "lora_precomputed", "precomputed",
                                           "orpo_reference_free"])
def test_records_answers_and_unchanged_run(tmp_path, tok, kw):
    if "lora" in kw:
        pytest.importorskip("peft")
    runs = {}
    for on in (False, True):
        tr = _trainer(tmp_path, tok, f"gen{on}", generate_during_eval=on, **kw)
        tr.train()
        runs[on] = tr
    off, on = runs[False], runs[True]
    # the run itself: metrics (timings aside) and weights bit for bit those of the run without it
    assert untimed_metrics(on.run.path) == untimed_metrics(off.run.path)
    assert [m["step"] for m in untimed_metrics(on.run.path)] == [0, 1, 2, 3, 4]
    a, b = _state(off), _state(on)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not os.path.exists(os.path.join(off.run.path, SAMPLES_FILE))

    recs = _samples(on.run.path)
    has_ref = "loss_type" not in kw and ("lora" in kw or "precompute_ref_logps" not in kw)
    assert [r["step"] for r in recs] == [0] * 4 + [2] * 4 + [4] * 4  # batch_size prompts per evaluation
    assert all(set(r) == {"step", "prompt", "policy"} | ({"reference"} if has_ref else set()) for r in recs)
    items = on.eval_items
    for step in (0, 2, 4):
        picked = [items[i]["prompt"] for i in sample_indices(len(items), 4, 0, step)]
        assert [r["prompt"] for r in recs if r["step"] == step] == [tok.decode(p) for p in picked]
    assert len({r["prompt"] for r in recs}) > 4  # the steps draw other prompts

    # the step-4 answers: the final weights' greedy answers, as transformers generates them
    last = [r for r in recs if r["step"] == 4]
    prompts = [items[i]["prompt"] for i in sample_indices(len(items), 4, 0, 4)]
    policy = on.model
    policy.eval()
    assert [r["policy"] for r in last] == _hf_greedy(policy, tok, prompts, 40)
    assert any(r["policy"] for r in last)
    if has_ref:
        if "lora" in kw:
            with policy.disable_adapter():
                expect = _hf_greedy(policy, tok, prompts, 40)
        else:
            expect = _hf_greedy(on.reference, tok, prompts, 40)
        assert [r["reference"] for r in last] == expect
        # before any step the policy is the reference; after, it answers otherwise
        assert all(r["policy"] == r["reference"] for r in recs if r["step"] == 0)
        assert any(r["policy"] != r["reference"] for r in last)


def test_evaluation_leaves_random_states_and_modes(tmp_path, tok):
    import numpy as np

    tr = _trainer(tmp_path, tok, "states", generate_during_eval=True)
    tr.train_step()
    tr.model.train()
    tables = []
    # a logger the training loop hands over gets TRL's table (the columns of TRL's game_log)
    tr._logger = types.SimpleNamespace(log_table=lambda step, name, rows: tables.append((step, name, rows)))
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    m = tr.evaluate()
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert tr.model.training and not tr.reference.training
    recs = _samples(tr.run.path)
    assert "eval_loss" in m and len(recs) == 4
    rows = [{"Prompt": r["prompt"], "Policy": r["policy"], "Ref Model": r["reference"]} for r in recs]
    assert tables == [(1, "game_log", rows)]


def test_resume_appends(tmp_path, tok):
    full = _trainer(tmp_path, tok, "full", save_every=2, generate_during_eval=True)
    full.train()
    want = _samples(full.run.path)
    # a finished run resumed evaluates its last step again: that step's records are replaced
    _trainer(tmp_path, tok, "full", save_every=2, generate_during_eval=True).train()
    assert _samples(full.run.path) == want

    # stopped after its step-4 evaluation, before a checkpoint; resumed from step 2's
    tr = _trainer(tmp_path, tok, "resumed", save_every=2, generate_during_eval=True)
    tr.evaluate()
    for _ in range(2):
        tr.train_step()
    tr.evaluate()
    tr._save()
    for _ in range(2):
        tr.train_step()
    tr.evaluate()
    assert [r["step"] for r in _samples(tr.run.path)] == [0] * 4 + [2] * 4 + [4] * 4
    _trainer(tmp_path, tok, "resumed", save_every=2, generate_during_eval=True).train()
    assert _samples(tr.run.path) == want


def test_bad_value_and_cli(tmp_path, capsys):
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="generate_during_eval must be true or false"):
            DPOConfig(generate_during_eval=bad)
    out = tmp_path / "cli"
    argv = ["dpo", "none", "--model", "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300",
            "--max_steps", "2", "--eval_every", "2", "--max_len", "32", "--batch_size", "4", "--output_dir",
            str(out), "--device", "cpu", "--generate_during_eval", "true"]
    assert cli.main(argv) == 0
    recs = _samples(str(out))
    assert [r["step"] for r in recs] == [0] * 4 + [2] * 4 and all("reference" in r for r in recs)
    capsys.readouterr()
    assert cli.main(argv[:-1] + ["maybe", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "config key 'generate_during_eval': expected bool" in capsys.readouterr().err


# ----------------------------------------------------------------------------- two gloo ranks


def _dist_run(strategy, out_dir, tok):
    from rlhf_fast.distributed import DistributedConfig

    cfg = DPOConfig(model=TINY, output_dir=out_dir, batch_size=4, lr=2e-2, warmup_steps=0,
                    lr_schedule="constant", eval_every=2, log_every=1, max_len=40, max_steps=2, device="cpu",
                    generate_during_eval=True, distributed=DistributedConfig(strategy=strategy))
    tr = DPOTrainer(cfg, tokenizer=tok, train_records=RECS, eval_records=EVAL)
    tr.train()
    return tr


def worker(specs, root, out):
    tok = preference_tokenizer()
    results = {}
    for strategy in specs:
        tr = _dist_run(strategy, os.path.join(root, strategy), tok)
        if tr.ctx.is_main:
            results[strategy] = {"world": tr.ctx.world_size, "samples": _samples(tr.run.path)}
    return results


def test_two_ranks_fsdp2_and_ddp_write_one_process_records(tmp_path, tok):
    """Every rank generates (FSDP2 gathers the weights: a collective), rank 0 alone writes: the
    file of a two-rank run is one process's, line for line."""
    from tests.torchrun_launch import launch

    two = launch(__file__, str(tmp_path), 2, ["fsdp2", "ddp"])
    one = _samples(_dist_run("none", str(tmp_path / "one"), tok).run.path)
    assert [r["step"] for r in one] == [0] * 4 + [2] * 4
    for strategy in ("fsdp2", "ddp"):
        assert two[strategy]["world"] == 2
        assert two[strategy]["samples"] == one, strategy


if __name__ == "__main__":
    from tests.torchrun_launch import main

    main(worker)


def test_the_trackers_get_trls_game_log_table(tmp_path, tok):
    """With a tracker (TensorBoard here), every evaluation's records also go to it as TRL's
    ``game_log`` table (Prompt, Policy, Ref Model), one table line per record of the step."""
    pytest.importorskip("tensorboard")
    from tests.test_rl_completion_logging import _tb_texts

    tr = _trainer(tmp_path, tok, "tb", generate_during_eval=True, report_to="tensorboard")
    tr.train()
    records = _samples(tr.run.path)
    texts = _tb_texts(tr.run.path, "game_log")
    assert [s for s, _ in texts] == [0, 2, 4]
    for step, text in texts:
        lines = text.split("\n")  # (splitlines would also split at \x1c-\x1e, which random models write)
        assert lines[0] == "| Prompt | Policy | Ref Model |"
        assert len(lines) == 2 + len([r for r in records if r["step"] == step])
    assert tr._logger is None  # the closed logger is not left where a later evaluate() would use it
