"""The pipeline fixes of the stop-34 review (tests/test_review_fixes_stop34.py pins the defects):
what they must leave unchanged (splits of non-repeating records, a run's config.yaml) and the
edges of the shared --out check (eval / generate)."""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- RL data.eval_fraction


def _old_split(cfg, records):
    """split_eval_records' data.eval_fraction branch before whole prompts were held out (rl.py
    as of bc4d143), transcribed: a permutation of the records themselves."""
    n = len(records)
    k = max(1, round(cfg.data.eval_fraction * n))
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 999_999_937)
    held = set(torch.randperm(n, generator=g)[:k].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


@pytest.mark.parametrize("seed,frac,n", [(0, 0.5, 16), (3, 0.1, 37), (11, 0.25, 5), (7, 0.9, 30)])
def test_rl_split_unchanged_when_no_prompt_repeats(seed, frac, n):
    from rlhf_fast.trainers.rl import split_eval_records
    from rlhf_fast.trainers.rl_config import DataConfig, RLConfig

    cfg = RLConfig(seed=seed, data=DataConfig(eval_fraction=frac))
    chats = [[{"role": "user", "content": f"q {i}"}] for i in range(n // 2)]
    records = [(f"prompt {i}", {"i": i}) for i in range(n - len(chats))] + [(c, {}) for c in chats]
    assert split_eval_records(cfg, records) == _old_split(cfg, records)


def test_rl_split_groups_repeated_chats_and_counts_each_prompt_once():
    from rlhf_fast.trainers.rl import split_eval_records
    from rlhf_fast.trainers.rl_config import DataConfig, RLConfig

    chats = [[{"role": "user", "content": f"q {i // 3}"}] for i in range(12)]  # 4 chats, 3 times each
    records = [(c, {"answer": str(i)}) for i, c in enumerate(chats)]
    train, held = split_eval_records(RLConfig(data=DataConfig(eval_fraction=0.25)), records)
    key = lambda recs: {json.dumps(p) for p, _ in recs}  # noqa: E731
    assert key(train).isdisjoint(key(held)) and len(key(held)) == 1 and len(held) == 3
    assert sorted(train + held, key=lambda r: int(r[1]["answer"])) == records
    with pytest.raises(ValueError, match=r"holds out 2 of the 2 prompts \(each counted once\)"):
        split_eval_records(RLConfig(data=DataConfig(eval_fraction=0.75)), [("a", {}), ("b", {}), ("a", {})])


# --------------------------------------------------------------------------- KTO binary splits


def test_kto_binary_split_unchanged_when_nothing_repeats():
    from rlhf_fast.trainers.common import split_records
    from rlhf_fast.trainers.kto import BinaryRecord

    recs = [BinaryRecord(f"prompt {i % 7}", f"answer {i}", i % 2 == 0) for i in range(40)]
    for seed in range(4):
        assert split_records(recs, 0.2, seed) == split_records(recs, 0.2, seed, key=lambda r: None)


def test_kto_binary_key_ignores_label_and_annotator():
    from rlhf_fast.feedback.formats import record_item_key
    from rlhf_fast.trainers.kto import BinaryRecord

    chat = [{"role": "assistant", "content": "hi"}]
    a, b = BinaryRecord("p", chat, True, "alice"), BinaryRecord("p", list(chat), False, "bob")
    assert record_item_key(a) == record_item_key(b) == ("binary", "p", json.dumps(chat, sort_keys=True))
    assert record_item_key(BinaryRecord("p", "x", True)) != record_item_key(BinaryRecord("q", "x", True))


# --------------------------------------------------------------------------- --out over inputs


def test_check_out_not_input_edges(tmp_path):
    from rlhf_fast.trainers.config import check_out_not_input

    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("")
    os.symlink(model, tmp_path / "link")
    inputs = {"--model": str(model), "--prompts": str(prompts), "--policy": None, "--tiny": "tiny:llama"}
    for bad in (model / "config.json", model / "sub" / "new.json", tmp_path / "link" / "x.json", prompts):
        with pytest.raises(ValueError, match=r"^--out .*(inside the --model folder|--prompts file itself)"):
            check_out_not_input(str(bad), inputs, "the responses")
    for ok in (tmp_path / "out.jsonl", tmp_path / "m2" / "out.jsonl", tmp_path / "mx.json"):
        check_out_not_input(str(ok), inputs, "the responses")


def test_eval_refuses_out_in_reference_and_reward_model_folders(tmp_path):
    from rlhf_fast.trainers.evaluate import _check_out_not_input

    ref, rm = tmp_path / "ref", tmp_path / "rm"
    ref.mkdir()
    rm.mkdir()
    args = argparse.Namespace(prompts=None, references=None, policy=None, reference=str(ref),
                              reward_model=str(rm), run=None, out=None)
    for flag, folder in (("--reference", ref), ("--reward-model", rm)):
        args.out = str(folder / "config.json")
        with pytest.raises(ValueError, match=f"inside the {flag} folder"):
            _check_out_not_input(args)
    args.out = str(tmp_path / "results.json")
    _check_out_not_input(args)


def test_eval_refuses_out_in_an_adapters_base_folder(tmp_path):
    """--policy / --reference naming an adapter folder also load its base folder: --out inside
    that base is refused too; an adapter whose base is not a local folder is left to the load's
    own refusal."""
    from rlhf_fast.trainers.evaluate import _check_out_not_input

    base, adapter, stray = tmp_path / "base", tmp_path / "adapter", tmp_path / "stray"
    for d in (base, adapter, stray):
        d.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (stray / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    for flag in ("policy", "reference"):
        args = argparse.Namespace(prompts=None, references=None, policy=None, reference=None, reward_model=None,
                                  run=None, out=str(base / "config.json"))
        setattr(args, flag, str(adapter))
        with pytest.raises(ValueError, match=f"inside the base model of the --{flag} folder"):
            _check_out_not_input(args)
        setattr(args, flag, str(stray))
        _check_out_not_input(args)


def test_eval_run_may_rewrite_its_own_results_but_no_run_file(tmp_path):
    from rlhf_fast.trainers.evaluate import _check_out_not_input

    run = tmp_path / "run"
    (run / "final" / "policy").mkdir(parents=True)
    for name in ("config.yaml", "tracker_ids.json", "eval_samples.jsonl", "eval.json", "notes.txt"):
        (run / name).write_text("x")
    args = argparse.Namespace(prompts=None, references=None, policy=None, reference=None, reward_model=None,
                              run=str(run), out=None)
    for ok in ("eval.json", "new_eval.json", "other.txt"):  # an earlier eval's results; new files
        args.out = str(run / ok)
        _check_out_not_input(args)
    for bad in ("config.yaml", "tracker_ids.json", "eval_samples.jsonl", "notes.txt", "final/results.json"):
        args.out = str(run / bad)
        with pytest.raises(ValueError, match=r"^--out .*the run's own \(the results would replace it\)"):
            _check_out_not_input(args)


def test_report_out_check_unchanged(tmp_path):
    from rlhf_fast.trainers.report import check_out_not_run_file

    run = tmp_path / "run"
    run.mkdir()
    (run / "old.json").write_text("x")
    (run / "report.md").write_text("x")
    check_out_not_run_file(str(run), str(run / "report.md"))
    with pytest.raises(ValueError, match=r"the report would replace it\); write the report to a Markdown"):
        check_out_not_run_file(str(run), str(run / "old.json"))
