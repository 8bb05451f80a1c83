"""Review of the DPO trainer's features beyond the loss formulas (reference handling, eval).

``evaluate(items)`` with ``precompute_ref_logps``: the trainer keeps no reference model (its
log-probs were scored before training), so pairs that have no precomputed ``ref`` cannot be
scored. TRL 1.16's ``DPOTrainer.evaluate`` refuses a new dataset then with a ValueError that
says why (full fine-tuning, after training started); ours crashed with a TypeError from deep in
the log-prob code ("model must be a transformers PreTrainedModel ..., got NoneType").

``ipo`` / ``sigmoid_norm`` on keep_end rows cut to their response alone: TRL divides by every
completion token of the row (its unshifted completion mask), we divided by one fewer."""

import pytest
import torch

from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from tests.test_dpo import TINY
from rlhf_fast.trainers.reward import synthetic_preference_records
from tests.test_reward import preference_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _trainer(tmp_path, tok, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / "run"), batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0,
                log_every=1, max_len=48, max_steps=2, device="cpu", grad_clip=0.0, beta=0.3)
    base.update(kw)
    return DPOTrainer(DPOConfig(**base), train_records=synthetic_preference_records(12, seed=5), eval_records=[],
                      tokenizer=tok)


def test_evaluate_pairs_without_precomputed_reference_logps_names_the_option(tmp_path, tok):
    tr = _trainer(tmp_path, tok, precompute_ref_logps=True)
    assert tr.reference is None  # nothing left to score new pairs with
    with_ref = tr.evaluate(tr.train_items[:4])  # pairs scored before training: fine
    assert with_ref["eval_loss"] > 0
    fresh = [{k: v for k, v in it.items() if k != "ref"} for it in tr.train_items[:4]]
    with pytest.raises(ValueError, match="precompute_ref_logps"):
        tr.evaluate(fresh)
    # one pair of the batch without them is refused the same way (not a KeyError)
    with pytest.raises(ValueError, match="precompute_ref_logps"):
        tr.evaluate(tr.train_items[:3] + fresh[3:])


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_token_mean_losses_count_every_completion_token_as_trl(tmp_path, tok, loss_type):
    """TRL 1.16's ``ipo`` / ``sigmoid_norm`` divide each row's summed log-ratio by
    ``completion_mask.sum(1)`` — the collator's completion mask, not shifted, so a keep_end row cut
    to its response alone (no prompt token left) counts all of its ``max_len`` response tokens,
    though the first has no log-prob. Those lines transcribed (trl/trainer/dpo_trainer.py,
    ``_compute_loss``), on our own log-probs of the same rows."""
    from rlhf_fast.trainers import dpo as dpo_mod

    tr = _trainer(tmp_path, tok, loss_type=loss_type, truncation_mode="keep_end", max_len=6)
    items = tr.train_items[:4]
    assert all(not it["prompt"] for it in items)  # every row is its response's last 6 tokens
    batch = tr._batch(items)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tr.reference.parameters():  # a reference that differs from the policy
            p.add_(0.05 * torch.randn_like(p))
        st = tr._pair_stats(items, batch)
        lp = dpo_mod.response_logps(tr.model, batch)[0].double()
        ref = dpo_mod.response_logps(tr.reference, batch)[0].double()
    completion_mask = batch["response_mask"] * batch["attention_mask"]  # TRL's collator's
    n = completion_mask.sum(1).double().clamp(min=1.0)
    assert n.tolist() == [6.0] * 8
    delta = (lp[:4] - ref[:4]) / n[:4] - (lp[4:] - ref[4:]) / n[4:]
    beta = tr.cfg.beta
    trl = (delta - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -torch.nn.functional.logsigmoid(beta * delta)
    torch.testing.assert_close(st["loss"].double(), trl, rtol=1e-5, atol=1e-6)
