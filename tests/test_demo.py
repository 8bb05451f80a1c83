"""The main job end to end at tiny sizes: every stage runs, the report and plots exist,
and RL raises the reward model's score of the policy above the SFT policy's."""

import json
import math
import os

import pytest

from rlhf_fast.demo import world
from rlhf_fast.demo.pipeline import DemoConfig, run


def test_world_preference_and_annotator():
    assert world.true_utility("The cat is kind. It is warm and sad.") == 1.0
    ann = world.SimulatedAnnotator(noise=0.0, length_bias=0.0)
    assert ann.prefers_first("The cat is kind.", "The cat is rude.")
    assert not ann.prefers_first("The cat is cold.", "The cat is calm.")
    noisy = world.SimulatedAnnotator(noise=0.3, length_bias=0.0, seed=1)
    flips = sum(not noisy.prefers_first("The cat is kind.", "The cat is rude.") for _ in range(2000))
    assert 0.25 < flips / 2000 < 0.35
    assert world.win_rate([1, 0, 2], [0, 0, 3]) == pytest.approx(0.5)
    assert world.on_topic("Describe the fox.", "The fox is calm.")
    assert not world.on_topic("Describe the fox.", "The owl is calm.")
    assert world.arithmetic_reward(["3+4=", "9+9="], ["7", "19"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="noise"):
        world.SimulatedAnnotator(noise=0.9)


def test_demo_config_validation():
    with pytest.raises(ValueError, match="algo"):
        DemoConfig(algo="kto")
    with pytest.raises(ValueError, match="task"):
        DemoConfig(task="chess")
    # the CLI: --algo belongs to the preference task (arithmetic always runs GRPO)
    import argparse

    from rlhf_fast.demo import cli as demo_cli

    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    with pytest.raises(ValueError, match="--algo ppo applies to --task preference"):
        demo_cli.run(parser.parse_args(["--task", "arithmetic", "--algo", "ppo"]))


def test_demo_quick_end_to_end(tmp_path):
    cfg = DemoConfig(quick=True, out_dir=str(tmp_path / "run"), progress=False)
    report = run(cfg)
    out = cfg.out_dir
    for stage in ("sft", "reward_model", "evaluation"):
        assert stage in report["stages"], stage
    sft = report["stages"]["sft"]
    assert sft["sft_eval_loss_after"] < sft["sft_eval_loss_before"]
    ev = report["stages"]["evaluation"]
    assert ev["rm_score_tuned"] > ev["rm_score_sft"]
    assert 0.0 <= ev["true_win_rate_tuned_vs_sft"] <= 1.0
    assert os.path.isfile(os.path.join(out, "report.md"))
    assert json.load(open(os.path.join(out, "summary.json")))["stages"]["evaluation"]
    pngs = [f for f in os.listdir(os.path.join(out, "plots")) if f.endswith(".png")]
    assert pngs
    assert os.path.isfile(os.path.join(out, "rl", "metrics.jsonl"))
    assert os.path.isdir(os.path.join(out, "policy"))
    # a second demo into the same folder is refused before any stage runs (it would overwrite the first)
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=r"--out .*run already holds a demo run \(policy, report.json, report.md"):
        run(DemoConfig(quick=True, out_dir=out, progress=False))
    assert sorted(os.listdir(out)) == before


def test_demo_quick_dpo(tmp_path):
    """--algo dpo: the policy tuned by DPO on the annotators' pairs, judged like the RL runs."""
    cfg = DemoConfig(quick=True, algo="dpo", out_dir=str(tmp_path / "run"), progress=False)
    report = run(cfg)
    dpo = report["stages"]["dpo"]
    assert 0.0 <= dpo["eval_rewards/accuracy"] <= 1.0 and dpo["eval_loss"] > 0
    ev = report["stages"]["evaluation"]
    assert 0.0 <= ev["true_win_rate_tuned_vs_sft"] <= 1.0 and math.isfinite(ev["kl_tuned_vs_sft_per_sequence"])
    out = cfg.out_dir
    assert json.load(open(os.path.join(out, "report.json")))["stages"]["dpo"] == dpo
    from rlhf_fast.trainers.common import read_metrics

    assert read_metrics(os.path.join(out, "dpo"))[-1]["step"] == cfg.dpo_steps
    assert os.path.isfile(os.path.join(out, "plots", "demo_dpo.png"))
    assert "## DPO (held-out pairs" in open(os.path.join(out, "report.md")).read()
    assert not os.path.exists(os.path.join(out, "rl")) and os.path.isdir(os.path.join(out, "policy"))


def test_demo_refuses_a_file_as_out(tmp_path):
    from rlhf_fast import cli

    path = tmp_path / "taken"
    path.write_text("not a folder")
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(path)]) == 2
    assert path.read_text() == "not a folder"


def test_demo_refuses_an_empty_out(tmp_path, capsys):
    """--out '' is one error naming --out (it was a bare "[Errno 2] No such file or directory: ''")."""
    from rlhf_fast import cli

    assert cli.main(["demo", "--quick", "--no-progress", "--out", ""]) == 2
    assert "--out: expected a folder path, got an empty string" in capsys.readouterr().err


def test_demo_refuses_a_training_runs_folder(tmp_path, capsys):
    """A grpo / sft run's folder is refused: the demo's stages and plots would land among its files."""
    from rlhf_fast import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(run)]) == 2
    assert f"--out {run} holds a training run (metrics.jsonl): choose another folder" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]


def test_demo_curves_use_the_logged_step():
    from rlhf_fast.demo.report import curve_points

    history = [{"step": 5, "reward/total": 0.1}, {"eval/x": 1.0}, {"step": 6, "reward/total": 0.3},
               {"step": 7, "reward/total": True}]
    assert curve_points(history, "reward/total") == [(5, 0.1), (6, 0.3)]
    assert curve_points(history, "eval/x") == [(2, 1.0)]


def test_demo_kl_counts_only_the_generated_tokens():
    # answers cut at max_new_tokens end without eos: the KL sums log π − log π_ref over exactly the
    # tokens the policy generated (the text re-tokenised with an eos added one more term)
    import torch

    from rlhf_fast.demo.pipeline import _generate, _seq_kl
    from rlhf_fast.models.tiny import tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(["the cat is kind and warm", "the fox is calm"] * 4, 64, padding_side="right")
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    policy, ref = tiny_causal_lm(len(tok), seed=1, **kw).eval(), tiny_causal_lm(len(tok), seed=2, **kw).eval()
    batches: list = []
    _generate(policy, tok, ["the cat", "the fox is"], max_new_tokens=3, seed=0, batches=batches)
    (b,) = batches
    expected = 0.0
    with torch.no_grad():
        for i in range(b.batch_size):
            ids = b.input_ids[i][b.attention_mask[i].bool()]
            resp = b.response_mask[i][b.attention_mask[i].bool()].bool()
            lp = torch.log_softmax(policy(ids[None]).logits[0, :-1].float(), -1)
            lr = torch.log_softmax(ref(ids[None]).logits[0, :-1].float(), -1)
            tgt = ids[1:]
            pos = resp[1:]
            expected += float((lp.gather(-1, tgt[:, None]) - lr.gather(-1, tgt[:, None]))[pos].sum())
    assert int(b.response_mask.sum()) <= 3 * b.batch_size
    assert _seq_kl(policy, ref, batches) == pytest.approx(expected / b.batch_size, rel=1e-4, abs=1e-5)


def test_demo_quick_reward_ensemble(tmp_path, capsys):
    """--reward-ensemble K: K reward models on the same pairs (different seeds), RL against their
    combination; the report has the ensemble's section and the RL log its disagreement rm_std."""
    from rlhf_fast import cli
    from rlhf_fast.trainers.common import read_metrics

    out = tmp_path / "run"
    assert cli.main(["demo", "--quick", "--no-progress", "--reward-ensemble", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "against an ensemble of 2 reward models (mean_minus_std)" in printed
    assert "ensemble_heldout_agreement_vs_hidden" in printed
    report = json.load(open(out / "report.json"))
    ens = report["stages"]["reward_ensemble"]
    assert (ens["members"], ens["mode"], ens["coef"]) == (2, "mean_minus_std", 1.0)
    for key in ("rm0_heldout_agreement_vs_hidden", "rm1_heldout_agreement_vs_hidden",
                "ensemble_heldout_agreement_vs_hidden"):
        assert 0.0 <= ens[key] <= 1.0, key
    # member 0 is the single-model demo's reward model
    assert ens["rm0_heldout_agreement_vs_hidden"] == report["stages"]["reward_model"]["rm_heldout_agreement_vs_hidden"]
    assert ens["rl_rm_std_first_steps"] >= 0 and ens["rl_rm_std_last_steps"] >= 0
    ev = report["stages"]["evaluation"]
    assert {"true_win_rate_tuned_vs_sft", "kl_tuned_vs_sft_per_sequence", "on_topic_rate_tuned",
            "rm_std_sft", "rm_std_tuned"} <= set(ev)
    history = read_metrics(str(out / "rl"))
    assert all(h["reward/rm_std"] >= 0 and "reward/rm1" in h for h in history if "reward/total" in h)
    assert os.path.isdir(out / "reward_rm1") and os.path.isfile(out / "plots" / "demo_rm_ensemble.png")
    md = open(out / "report.md").read()
    assert "## Reward-model ensemble" in md and "rm1_heldout_agreement_vs_hidden" in md


@pytest.mark.parametrize("argv, message", [
    (["--reward-ensemble", "1"], "--reward-ensemble K must be an int >= 2 (the number of reward models), got 1"),
    (["--reward-ensemble", "three"], "argument --reward-ensemble: invalid int value: 'three'"),
    (["--reward-ensemble", "3", "--ensemble-mode", "sum"], "argument --ensemble-mode: invalid choice: 'sum'"),
    (["--reward-ensemble", "3", "--ensemble-coef", "nan"], "--ensemble-coef must be a finite number >= 0, got nan"),
    (["--reward-ensemble", "3", "--ensemble-coef", "-1"], "--ensemble-coef must be a finite number >= 0, got -1.0"),
    (["--reward-ensemble", "3", "--ensemble-mode", "min", "--ensemble-coef", "2"],
     "--ensemble-coef applies to --ensemble-mode mean_minus_std or mean_minus_var, not min"),
    (["--ensemble-mode", "mean"], "--ensemble-mode applies with --reward-ensemble K"),
    (["--reward-ensemble", "3", "--algo", "dpo"], "--reward-ensemble needs RL against reward models"),
    (["--reward-ensemble", "3", "--task", "arithmetic"], "--reward-ensemble applies to --task preference"),
])
def test_demo_reward_ensemble_refuses_bad_values(tmp_path, capsys, argv, message):
    from rlhf_fast import cli

    out = tmp_path / "run"
    try:
        rc = cli.main(["demo", "--quick", "--no-progress", "--out", str(out)] + argv)
    except SystemExit as e:  # argparse's own errors (the CLI's parser prints one line, exits 2)
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_demo_config_checks_the_ensemble():
    with pytest.raises(ValueError, match="--reward-ensemble K must be an int >= 2"):
        DemoConfig(reward_ensemble=1)
    with pytest.raises(ValueError, match="--ensemble-mode must be one of"):
        DemoConfig(reward_ensemble=2, ensemble_mode="sum")
    with pytest.raises(ValueError, match="--reward-ensemble needs RL"):
        DemoConfig(reward_ensemble=2, algo="dpo")
    assert DemoConfig(reward_ensemble=3, ensemble_mode="min").reward_ensemble == 3
