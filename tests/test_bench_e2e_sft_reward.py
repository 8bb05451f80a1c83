"""The e2e benchmark's SFT and reward-model tables (`--algos sft,reward`): TRL 1.16's own SFTTrainer /
RewardTrainer against rlhf_fast's, one optimizer step each. Both sides must train on the same token rows
from the same weights and compute the same loss and update (`e2e.check_same_step`, which the tables run
and report); a side made to compute something else must be caught."""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("trl")

from rlhf_fast.benchmarks import e2e  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# the quick configuration, smaller still: 2 pairs (4 SFT records), prompts of 8 tokens, answers of 4-8
TINY = replace(e2e.E2EConfig.quick(), hidden_size=16, steps=1)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """TINY with its tokenizer trained once and saved, as run_config hands it to every subprocess."""
    d = tmp_path_factory.mktemp("tok")
    e2e.build_tokenizer(TINY).save_pretrained(str(d))
    return replace(TINY, tokenizer_dir=str(d))


def test_sft_and_reward_are_selectable_but_not_default():
    assert "sft" not in e2e.ALGOS and "reward" not in e2e.ALGOS
    assert e2e._check_algos("reward,sft,dpo") == ("dpo", "sft", "reward")
    assert e2e.ALGO_PHASES["sft"] == () and e2e.ALGO_PHASES["reward"] == ()
    with pytest.raises(ValueError, match="sft_packing"):
        e2e.E2EConfig(sft_packing="yes")
    with pytest.raises(ValueError, match="algo must be one of"):
        e2e.check_same_step("dpo", TINY)


def test_cli_reaches_the_suite_with_sft_and_reward(tmp_path, monkeypatch):
    from rlhf_fast.cli import main

    got = []
    monkeypatch.setattr(e2e, "run_suite", lambda **kw: got.append(kw["algos"]) or [])
    assert main(["bench", "e2e", "--quick", "--algos", "reward,sft", "--out", str(tmp_path)]) == 0
    assert [e2e._check_algos(a) for a in got] == [("sft", "reward")]


def test_both_sides_train_on_the_same_completion_rows(cfg):
    """SFT: TRL's labelled tokens are exactly rlhf_fast's response mask (the completion and its eos after
    a prompt of dpo_prompt_tokens tokens), padded and padding-free; the reward pairs are the DPO pairs."""
    for packing in (False, True):
        c = replace(cfg, sft_packing=packing)
        trl_side, ours = e2e.TRLSFTStep(c), e2e.RLHFFastSFTStep(c)
        rows = sorted(ours.rows())
        assert sorted(trl_side.rows()) == rows and len(rows) == 2 * c.dpo_pairs
        eos = ours.trainer.tokenizer.eos_token_id
        assert all(len(p) == c.dpo_prompt_tokens and comp[-1] == eos for p, comp in rows)
        assert trl_side.trainer.padding_free == packing and ours.trainer.cfg.packing == packing
        assert trl_side.tokens == ours.tokens == sum(len(p) + len(comp) for p, comp in rows)
    trl_side, ours = e2e.TRLRewardStep(cfg), e2e.RLHFFastRewardStep(cfg)
    assert sorted(trl_side.rows()) == sorted(ours.rows()) and len(ours.rows()) == cfg.dpo_pairs
    for side in (trl_side.trainer.model, ours.trainer.model):
        assert type(side).__name__.endswith("ForSequenceClassification") and side.config.num_labels == 1
    for opt in (trl_side.trainer.optimizer, ours.trainer.optimizer):
        g = opt.param_groups[0]
        assert g["fused"] and g["weight_decay"] == 0.0 and g["lr"] == cfg.lr


@pytest.mark.parametrize("algo,packing,head", [("sft", False, "selective"), ("sft", True, "selective"),
                                               ("sft", False, "fused_head"), ("reward", False, "selective")])
def test_check_same_step_passes_on_the_real_sides(cfg, algo, packing, head):
    """The first step's loss equal (rel 1e-4), the second's too (after each side's update), and the weights
    after it close; TRL 1.x's own fused head (trl_logprobs=fused_head) gives the same SFT numbers."""
    res = e2e.check_same_step(algo, replace(cfg, sft_packing=packing, trl_logprobs=head))
    (a, b), (a2, b2) = res["losses"]
    assert a == pytest.approx(b, rel=1e-4) and a2 == pytest.approx(b2, rel=1e-4) and a2 != a
    assert res["weight_diff"] < 1e-3
    if algo == "reward":
        assert abs(a - 0.6931) < 0.05  # Bradley-Terry of near-equal scores: about ln 2


def test_sft_loss_is_the_token_mean_over_the_batch(cfg):
    """TRL's SFT loss as compute_loss defines it (trl/trainer/sft_trainer.py, SFTTrainer.compute_loss with
    num_items_in_batch from Trainer._get_num_items_in_batch): Σ −logp over every completion token of the
    batch ÷ their count — not the mean of per-record means —, and rlhf_fast's step logs that value."""
    ours = e2e.RLHFFastSFTStep(cfg)
    model = ours.trainer.model
    nll, n, per_row = 0.0, 0, []
    with torch.no_grad():
        for r in ours.trainer.train_rows:
            ids = torch.tensor([r["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            tok = logp.gather(-1, ids[0, 1:, None])[:, 0]
            m = torch.tensor(r["response_mask"][1:], dtype=torch.bool)
            nll, n = nll - float(tok[m].sum()), n + int(m.sum())
            per_row.append(-float(tok[m].mean()))
    want = nll / n
    assert abs(want - sum(per_row) / len(per_row)) > 1e-4  # the two normalisations differ on these rows
    assert ours.step()["loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("algo", ["sft", "reward"])
def test_check_catches_a_side_that_computes_something_else(cfg, algo):
    """Planted differences, each through check_same_step's per-side overrides: another learning rate on one
    side (the second step's loss moves; with one step only the weights tell), other rows, other weights."""
    with pytest.raises(RuntimeError, match="step 2's loss differs"):
        e2e.check_same_step(algo, cfg, trl_overrides={"lr": 2 * cfg.lr})
    with pytest.raises(RuntimeError, match="weights after 1 step"):
        e2e.check_same_step(algo, cfg, ours_overrides={"lr": 1.5 * cfg.lr}, steps=1)
    with pytest.raises(RuntimeError, match="different token rows"):
        e2e.check_same_step(algo, cfg, ours_overrides={"dpo_max_response": cfg.dpo_max_response - 1})
    with pytest.raises(RuntimeError, match="start from different weights"):
        e2e.check_same_step(algo, cfg, trl_overrides={"hidden_size": 2 * cfg.hidden_size})


def test_tables_run_end_to_end_with_their_columns(cfg, monkeypatch):
    """`--algos sft,reward` on the tiny config: an SFT table (padded and padding-free rows) and a reward
    table, each side measured for real (in this process, in place of the subprocess), every row with its
    columns and a TRL ÷ rlhf_fast row, and the correctness check's result in the notes."""
    monkeypatch.setattr(e2e, "_subprocess", lambda fw, algo, c, timeout_s: e2e.measure(fw, algo, c))
    sft, reward = e2e.run_suite(cfg=cfg, algos="reward,sft")
    assert sft.title.startswith("one SFT step") and reward.title.startswith("one reward-model step")
    cols = ["algo", "framework", "step_s", "tokens_per_s", "extra_peak", "extra_rss", "note"]
    assert sft.columns == cols and reward.columns == cols
    assert [(r["algo"], r["framework"]) for r in sft.rows] == [
        ("sft", "TRL SFTTrainer (selective_log_softmax head)"), ("sft", "rlhf_fast"), ("sft", "TRL ÷ rlhf_fast"),
        ("sft padding-free", "TRL SFTTrainer, padding_free (selective_log_softmax head)"),
        ("sft padding-free", "rlhf_fast"), ("sft padding-free", "TRL ÷ rlhf_fast")]
    assert [(r["algo"], r["framework"]) for r in reward.rows] == [
        ("reward", "TRL RewardTrainer"), ("reward", "rlhf_fast"), ("reward", "TRL ÷ rlhf_fast")]
    for table in (sft, reward):
        for r in table.rows:
            assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["extra_peak"] and r["extra_rss"], r
        sides = [r for r in table.rows if r["framework"] != "TRL ÷ rlhf_fast"]
        assert all(r["extra_peak_bytes"] > 0 and "loss" in r and "note" not in r for r in sides)  # no side failed
        checked = [n for n in table.notes if n.startswith("checked (")]
        assert len(checked) == (2 if table is sft else 1) and not any("FAILED" in n for n in table.notes)
    assert "### one SFT step" in sft.markdown() and "sft padding-free" in sft.markdown()


def test_a_failed_check_is_reported_in_the_table(cfg, monkeypatch):
    """A difference the check finds is written into the table's notes, not hidden (the timings still run)."""
    real = e2e.check_same_step
    monkeypatch.setattr(e2e, "check_same_step", lambda algo, c: real(algo, c, trl_overrides={"lr": 3 * c.lr}))
    monkeypatch.setattr(e2e, "_subprocess", lambda fw, algo, c, timeout_s: dict(
        step=1.0, tokens=10.0, tokens_per_s=10.0, extra_peak_bytes=1 << 20, extra_rss_bytes=1 << 20,
        rss_bytes=1 << 30))
    (table,) = e2e.run_suite(cfg=cfg, algos="reward")
    failed = [n for n in table.notes if n.startswith("CORRECTNESS CHECK FAILED (reward)")]
    assert len(failed) == 1 and "step 2's loss differs" in failed[0]
    assert len(table.rows) == 3
