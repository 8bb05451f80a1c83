"""Review of the offline preference losses and their data handling (DPO / KTO / TPO / CPO):
defects found against TRL 1.16 (DPOTrainer._compute_loss, CPOTrainer, TPOTrainer) and the docs.

A row that ``truncation_mode: keep_end`` cuts to its response alone (a response of ``max_len``
tokens or more) has no prompt: its first token sits at column 0, which nothing predicts. TRL
scores such a row over its shifted completion mask (columns 1..), so its NLL token mean and its
LD-DPO positions skip that token; these tests hold ours to the same."""

from pathlib import Path

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord, TripleRecord
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, response_logps, token_logps
from tests.test_reward import preference_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
DOC = Path(__file__).resolve().parents[1] / "docs" / "from_trl.md"


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _records(gold=False):
    """Pairs whose chosen response (40 words) fills any small max_len, with short rejected ones
    (``gold``: TPO triples whose gold answer is that long one)."""
    long = " ".join(["good"] * 40)
    if gold:
        return [TripleRecord(f"say something nice {i}", "fine " * (i % 2 + 1), "bad " * (i % 3 + 1),
                             reference=long + f" {i}") for i in range(4)]
    return [PairRecord(f"say something nice {i}", long + f" {i}", "bad " * (i % 3 + 1)) for i in range(4)]


def _trainer(tmp_path, tok, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / "run"), batch_size=4, lr=3e-3, warmup_steps=0, eval_every=0,
                log_every=1, max_len=12, max_steps=1, device="cpu", grad_clip=0.0, truncation_mode="keep_end",
                eval_fraction=0.0)
    base.update(kw)
    recs = _records(gold=str(kw.get("loss_type")).startswith("tpo"))
    return DPOTrainer(DPOConfig(**base), train_records=recs, eval_records=[], tokenizer=tok)


def _step_grads(tr):
    """(metrics, the gradient the optimizer steps with) of one train_step."""
    got = {}
    h = tr.optimizer.register_step_pre_hook(
        lambda opt, a, k: got.__setitem__("g", [p.grad.clone() for p in tr.model.parameters()]))
    m = tr.train_step()
    h.remove()
    return m, got["g"]


@pytest.mark.parametrize("kw", [dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]),
                                dict(loss_type="cpo", beta=0.2), dict(loss_type="tpo", beta=0.2)],
                         ids=["sft", "cpo_alpha", "tpo_alpha"])
def test_nll_token_mean_skips_the_unscored_first_token_of_a_promptless_row(tmp_path, tok, kw):
    """The step's NLL term (sft / rpo_alpha / cpo_alpha) is Σ −log π over the chosen tokens that
    are scored / their count, as TRL's ``−chosen_per_token_logps[chosen_mask].mean()`` on the
    shifted mask. A keep_end chosen row of max_len response tokens has max_len − 1 scored ones;
    the trainer's denominator counted max_len (the NLL gradient was (n−1)/n of TRL's, and the
    logged loss was not the one trained)."""
    tr = _trainer(tmp_path, tok, **kw)
    items = [tr.train_items[i] for i in tr.batches._perm[:4]]
    key = "gold" if "gold" in items[0] else "chosen"
    assert all(not it.get(key + "_prompt", it["prompt"]) and len(it[key]) == 12 for it in items)  # promptless rows
    st = tr._pair_stats(items, tr._batch(items))
    assert st["nll_tokens"].tolist() == [11] * 4
    want = st["loss"].mean() + tr.cfg.nll_weight * st["nll"].sum() / st["nll_tokens"].sum()
    g_want = torch.autograd.grad(want, list(tr.model.parameters()))
    m, g = _step_grads(tr)
    assert m["loss"] == pytest.approx(float(want.detach()), rel=1e-5)
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_ld_alpha_positions_skip_the_unscored_first_token_of_a_promptless_row(tmp_path, tok):
    """LD-DPO (TRL's ``ld_alpha``): a token's position in its response is counted over the shifted
    completion mask, and the shared length is the shorter response's count of scored tokens. Our
    mask counted the promptless row's column 0, so one more of the longer response's tail tokens
    got weight 1 than in TRL."""
    tr = _trainer(tmp_path, tok, loss_type="sigmoid", ld_alpha=0.25)
    items = [tr.train_items[i] for i in tr.batches._perm[:4]]
    assert all(not it["prompt"] for it in items)  # the chosen rows are promptless
    batch = tr._batch(items)
    with torch.no_grad():
        got, _ = response_logps(tr.model, batch, ld_alpha=0.25)
        tok_lp = token_logps(tr.model, batch)  # [2B, T], 0 outside the response
    # TRL 1.16 DPOTrainer._compute_loss, transcribed: per-token log-probs on the shifted mask
    per_token = tok_lp[:, 1:]
    shift = (batch["response_mask"] * batch["attention_mask"])[:, 1:]
    pos = shift.cumsum(1)
    lens = shift.sum(1)
    shared = torch.minimum(*lens.chunk(2)).repeat(2)[:, None]
    want = (per_token * ((pos > 0) & (pos <= shared))).sum(1) + 0.25 * (per_token * (pos > shared)).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_docs_label_smoothing_row_names_every_loss_trl_smooths():
    """TRL 1.16's DPOTrainer uses label_smoothing in robust, exo_pair, aot and aot_unpaired; the
    row said robust / exo_pair only."""
    head = "| `label_smoothing` | `label_smoothing` | **differs"
    row = next(line for line in DOC.read_text().splitlines() if line.startswith(head))
    assert "`aot`" in row and "`aot_unpaired`" in row


@pytest.mark.parametrize("section", ["### CPOTrainer / CPOConfig", "### ORPOTrainer / ORPOConfig",
                                     "### KTOTrainer / KTOConfig"])
def test_docs_max_length_rows_say_how_rows_are_cut(section):
    """Our default cut of a long row is DPO's ``balanced`` (the prompt's start first, down to half
    of max_len); TRL's CPO / ORPO keep the prompt and cut the response, TRL's KTO keeps each row's
    start and drops an example whose prompt fills max_length. The rows said nothing (KTO has no
    truncation_mode to ask for TRL's)."""
    text = DOC.read_text()
    part = text[text.index(section):]
    part = part[:part.index("\n### ", 10)]
    row = next(line for line in part.splitlines() if line.startswith("| `max_length` | `max_len` |"))
    assert "balanced" in row and "keep" in row


def test_docs_name_the_reward_metrics_trl_spells_otherwise():
    """DPO and KTO log rewards/accuracy and rewards/margin where TRL 1.16 logs rewards/accuracies and
    rewards/margins (the same values); the logged-metrics paragraph claims TRL's names."""
    text = DOC.read_text()
    para = text[text.index("Logged metrics. The offline trainers"):text.index("### SFTTrainer / SFTConfig")]
    assert "`rewards/accuracies`" in para and "`rewards/margins`" in para


def test_loss_functions_name_a_bad_label_smoothing():
    """dpo_loss / reference_free_loss are public: a label_smoothing that is not a number is a
    ValueError naming it (it was a TypeError from ``0.0 <= None``)."""
    from rlhf_fast.trainers.preference_losses import dpo_loss, reference_free_loss

    c, r = torch.randn(3), torch.randn(3)
    for bad in (None, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(c, r, c, r, beta=0.1, label_smoothing=bad)
        with pytest.raises(ValueError, match="label_smoothing"):
            reference_free_loss(c, r, loss_type="cpo", beta=0.1, label_smoothing=bad)


@pytest.mark.parametrize("kw", [dict(loss_type="sigmoid", loss_weights=[0.0]),
                                dict(loss_type=["sigmoid", "sft"], loss_weights=[0.0, 0.0]),
                                dict(loss_type="simpo", loss_weights=[0.0], cpo_alpha=0.0)])
def test_config_refuses_a_loss_that_is_zero_by_its_weights(tmp_path, kw):
    """Every loss weight 0 and no NLL weight: the loss is identically 0, nothing trains (only
    AdamW's decay moves the weights); refused naming loss_weights, as KTOConfig refuses
    desirable_weight = undesirable_weight = 0. A zero pair weight with an NLL term still trains."""
    with pytest.raises(ValueError, match="loss_weights"):
        DPOConfig(model=TINY, output_dir=str(tmp_path / "x"), **kw)
    DPOConfig(model=TINY, output_dir=str(tmp_path / "y"), loss_type=["sigmoid", "sft"], loss_weights=[0.0, 1.0])
    DPOConfig(model=TINY, output_dir=str(tmp_path / "z"), loss_type="sigmoid", loss_weights=[0.0], rpo_alpha=0.5)
