"""The metrics the offline trainers log as TRL 1.16's do: SFT's ``entropy`` / ``eval_entropy`` and
``num_tokens`` against TRL's own ``SFTTrainer.compute_loss`` on the same weights and batch; DPO's
and KTO's ``entropy`` and ``num_tokens`` (the plain, per-token and WPO log-prob paths) and the
reward trainer's ``min_reward`` / ``mean_reward`` / ``max_reward`` / ``accuracy`` / ``margin``
against TRL's lines transcribed onto full-logit (and plain ``AutoModelForSequenceClassification``)
forwards of the same batch; ``num_tokens`` accumulating over steps and continuing across a resume
(checkpointed); ``train_tokens_per_second`` = the step's tokens / ``time/step`` in metrics.jsonl,
a timing that ``untimed_metrics`` drops.

The fused head's token statistics, against TRL's own fused head (``add_fused_lm_head``, its
``ChunkedLogProbFunction``) on the same weights and rows: SFT's ``mean_token_accuracy`` /
``eval_mean_token_accuracy`` against ``SFTTrainer.compute_loss``; DPO's ``logits/chosen``,
``logits/rejected`` and ``mean_token_accuracy`` and KTO's ``logits/*`` against the lines of their
``_compute_loss``, transcribed; ties for the row max (top-1 only for the first maximal index) and
the mean logit at a temperature through ``sequence_logprobs`` on every live CPU backend, packed,
and through full logits for a head that cannot be fused."""

import copy

import pytest
import torch

from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, collate, synthetic_sft_records
from tests.conftest import live_cpu_backends
from tests.test_reward import preference_tokenizer
from tests.test_trainer_common import TIMED_METRICS, untimed_metrics

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
MAX_LEN = 24

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def sft_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


@pytest.fixture(scope="module")
def pref_tok():
    return preference_tokenizer()


def _base(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), lr=3e-3, warmup_steps=0, eval_every=0, log_every=1,
                max_len=MAX_LEN, max_steps=3, device="cpu")
    base.update(kw)
    return base


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` logits -> ``[...]`` float64 entropy of their softmax, the plain definition."""
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def _shifted_entropy(model, batch) -> torch.Tensor:
    """``[N, T-1]`` entropy of the distribution predicting token t+1 of each row, from the full
    logits of the model's own forward (no fused head)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _entropy(logits[:, :-1])


def _trl_entropy_and_tokens(per_token_entropy, shift_completion_mask, attention_mask):
    """trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss ("Entropy", "Number of tokens"; the
    same lines in kto_trainer.py, KTOTrainer._compute_loss), one process (gather = identity)."""
    mask = shift_completion_mask
    entropy_sum = (per_token_entropy * mask).sum()
    total_tokens = mask.sum()
    entropy = (entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0
    num_tokens_in_batch = attention_mask.sum().item()
    return entropy, num_tokens_in_batch


TRL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _trl_fused_outputs(model, batch, temperature=1.0):
    """TRL's fused LM head (trl/trainer/utils.py ``add_fused_lm_head``, ``ChunkedLogProbFunction``'s
    CPU fold) on a copy of ``model``, scoring the attended response tokens of ``batch`` (labels
    -100 elsewhere): its ``FusedCausalLMOutput``, per-token fields ``[N, T-1]``."""
    from trl.trainer.utils import add_fused_lm_head

    m = copy.deepcopy(model)
    add_fused_lm_head(m, temperature=temperature, outputs=TRL_OUTPUTS)
    mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
    with torch.no_grad():
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["input_ids"].masked_fill(~mask, -100), fused_lm_head=True)


def _trl_dpo_logit_metrics(outputs, shift_completion_mask):
    """trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss ("Average logits for chosen and rejected
    completions", "Token accuracy for the chosen completions"), one process (gather = identity)."""
    chosen_mean_logits, rejected_mean_logits = outputs.mean_logits.chunk(2, dim=0)
    chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)
    total_chosen_logits = chosen_mean_logits[chosen_mask.bool()].sum().item()
    total_chosen_tokens = chosen_mask.sum().item()
    total_rejected_logits = rejected_mean_logits[rejected_mask.bool()].sum().item()
    total_rejected_tokens = rejected_mask.sum().item()
    avg_chosen_logits = total_chosen_logits / total_chosen_tokens if total_chosen_tokens > 0 else 0.0
    avg_rejected_logits = total_rejected_logits / total_rejected_tokens if total_rejected_tokens > 0 else 0.0
    chosen_is_top1, _ = outputs.is_top1.chunk(2, dim=0)
    correct_predictions = chosen_is_top1 & chosen_mask.bool()
    total_sum = chosen_mask.sum()
    accuracy = (correct_predictions.sum() / total_sum).item() if total_sum > 0 else 0.0
    return {"logits/chosen": avg_chosen_logits, "logits/rejected": avg_rejected_logits,
            "mean_token_accuracy": accuracy}


def _trl_kto_logit_metrics(outputs, shift_completion_mask, desirable):
    """trl/trainer/kto_trainer.py, KTOTrainer._compute_loss ("Average logits for chosen and rejected
    completions"), one process; ``desirable`` ``[N]`` bool gives chosen_idx / rejected_idx."""
    chosen_idx, rejected_idx = desirable.nonzero().squeeze(-1), (~desirable).nonzero().squeeze(-1)
    mean_logits = outputs.mean_logits
    chosen_mean_logits = mean_logits.index_select(0, chosen_idx)
    rejected_mean_logits = mean_logits.index_select(0, rejected_idx)
    chosen_mask = shift_completion_mask.index_select(0, chosen_idx)
    rejected_mask = shift_completion_mask.index_select(0, rejected_idx)
    total_chosen_logits = chosen_mean_logits[chosen_mask.bool()].sum().item()
    total_chosen_tokens = chosen_mask.sum().item()
    total_rejected_logits = rejected_mean_logits[rejected_mask.bool()].sum().item()
    total_rejected_tokens = rejected_mask.sum().item()
    m = {}
    if total_chosen_tokens > 0:
        m["logits/chosen"] = total_chosen_logits / total_chosen_tokens
    if total_rejected_tokens > 0:
        m["logits/rejected"] = total_rejected_logits / total_rejected_tokens
    return m


def _shift_mask(batch):
    return (batch["response_mask"].bool() & batch["attention_mask"].bool())[:, 1:]


# ----------------------------------------------------------------------------- SFT vs TRL's SFTTrainer


def test_sft_entropy_and_num_tokens_equal_trls_compute_loss(tmp_path, sft_tok):
    """One step over the whole set in one micro-batch: ``entropy`` and ``num_tokens`` are what TRL's
    compute_loss records for that batch on the same weights; ``eval_entropy`` is its eval-mode
    ``entropy`` on the eval batch; the count then grows by the same tokens each step."""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    from rlhf_fast.models.tiny import tiny_causal_lm

    recs = synthetic_sft_records(10, seed=4)
    evals = synthetic_sft_records(5, seed=5)
    ds = Dataset.from_list([{"prompt": r.prompt, "completion": r.completion} for r in recs])
    ev = Dataset.from_list([{"prompt": r.prompt, "completion": r.completion} for r in evals])
    args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=MAX_LEN)
    torch.manual_seed(0)
    model = tiny_causal_lm(len(sft_tok), hidden_size=32, num_layers=1, num_heads=2)
    tt = TRLTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ev, processing_class=sft_tok)
    ours = copy.deepcopy(tt.model)  # the same weights; its forward without fused_lm_head is the original
    tr = SFTTrainer(SFTConfig(**_base(tmp_path, "ours", batch_size=len(recs))), model=ours, tokenizer=sft_tok,
                    train_records=recs, eval_records=evals)
    assert len(tr.train_rows) == len(ds)  # every record kept: one step is the whole set

    tt.model.eval()
    tt.compute_loss(tt.model, dict(tt.data_collator([tt.eval_dataset[i] for i in range(len(ev))])))
    trl_eval = {k: v[-1] for k, v in tt._metrics["eval"].items()}
    tt.model.train()
    tt.compute_loss(tt.model, dict(tt.data_collator([tt.train_dataset[i] for i in range(len(ds))])))
    trl_train = {k: v[-1] for k, v in tt._metrics["train"].items()}

    e = tr.evaluate()
    assert e["eval_entropy"] == pytest.approx(trl_eval["entropy"], rel=1e-5)
    m1 = tr.train_step()
    assert m1["entropy"] == pytest.approx(trl_train["entropy"], rel=1e-5)
    assert m1["num_tokens"] == trl_train["num_tokens"] == sum(len(r["input_ids"]) for r in tr.train_rows)
    assert m1["entropy"] > 1.0  # near log V at initialisation: a live value, not a default
    m2 = tr.train_step()
    assert m2["num_tokens"] == 2 * m1["num_tokens"] and m2["entropy"] != m1["entropy"]


def test_sft_mean_token_accuracy_equals_trls_compute_loss(tmp_path, sft_tok):
    """After a few steps (so that some tokens are top-1): ``mean_token_accuracy`` of a step over
    the whole set and ``eval_mean_token_accuracy`` are what TRL's compute_loss records for those
    batches on the same weights (its fused head's ``is_top1``)."""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    recs = synthetic_sft_records(10, seed=4)
    evals = synthetic_sft_records(5, seed=5)
    tr = SFTTrainer(SFTConfig(**_base(tmp_path, "ours", batch_size=len(recs), max_steps=10)), tokenizer=sft_tok,
                    train_records=recs, eval_records=evals)
    for _ in range(4):
        tr.train_step()
    ds = Dataset.from_list([{"prompt": r.prompt, "completion": r.completion} for r in recs])
    ev = Dataset.from_list([{"prompt": r.prompt, "completion": r.completion} for r in evals])
    args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=MAX_LEN)
    tt = TRLTrainer(model=copy.deepcopy(tr.model), args=args, train_dataset=ds, eval_dataset=ev,
                    processing_class=sft_tok)
    assert len(tr.train_rows) == len(ds)
    tt.model.eval()
    tt.compute_loss(tt.model, dict(tt.data_collator([tt.eval_dataset[i] for i in range(len(ev))])))
    trl_eval = tt._metrics["eval"]["mean_token_accuracy"][-1]
    tt.compute_loss(tt.model, dict(tt.data_collator([tt.train_dataset[i] for i in range(len(ds))])))
    trl_train = tt._metrics["eval"]["mean_token_accuracy"][-1]  # eval mode: dropout off, as ours is (none)

    e = tr.evaluate()
    m = tr.train_step()
    assert e["eval_mean_token_accuracy"] == pytest.approx(trl_eval, rel=1e-6)
    assert m["mean_token_accuracy"] == pytest.approx(trl_train, rel=1e-6)
    assert 0.1 < m["mean_token_accuracy"] < 1.0 and 0.0 < e["eval_mean_token_accuracy"] < 1.0  # live values


def test_sft_step_entropy_is_the_global_token_mean_over_micro_batches(tmp_path, sft_tok):
    """A step in three micro-batches: entropy is Σ entropy / Σ trained tokens over the step's rows
    (full-logit entropy of the rows it trained), and num_tokens their non-pad tokens."""
    recs = synthetic_sft_records(9, seed=6)
    tr = SFTTrainer(SFTConfig(**_base(tmp_path, "ga", batch_size=3, grad_accum=3, max_steps=10)), tokenizer=sft_tok,
                    train_records=recs, eval_records=[])
    for _ in range(3):  # some tokens top-1 by now: a live accuracy
        tr.train_step()
    state = tr.batches.state()
    idx = [i for _ in range(3) for i in tr.batches.next()]
    tr.batches.load(state)
    batch = collate([tr.train_rows[i] for i in idx], tr.pad_id)
    ent = _shifted_entropy(tr.model, batch)
    mask = (batch["response_mask"] & batch["attention_mask"])[:, 1:].double()
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    top1 = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]).double()  # the plain definition
    before = tr.num_tokens
    m = tr.train_step()
    assert m["entropy"] == pytest.approx(float((ent * mask).sum() / mask.sum()), rel=1e-5)
    assert m["mean_token_accuracy"] == pytest.approx(float((top1 * mask).sum() / mask.sum()), rel=1e-6)
    assert 0 < m["mean_token_accuracy"] < 1
    assert m["num_tokens"] - before == int(batch["attention_mask"].sum())


# ----------------------------------------------------------------------------- DPO / KTO vs TRL's lines


@pytest.mark.parametrize("extra", [{}, dict(loss_type="orpo"), dict(use_weighting=True), dict(ld_alpha=0.5)],
                         ids=["plain", "orpo_full_rows", "wpo", "ld"])
def test_dpo_entropy_and_num_tokens_equal_trls_lines(tmp_path, pref_tok, extra):
    recs = synthetic_preference_records(6, seed=2)
    tr = DPOTrainer(DPOConfig(**_base(tmp_path, "dpo", batch_size=len(recs), **extra)), tokenizer=pref_tok,
                    train_records=recs, eval_records=recs[:3])
    batch = tr._batch(tr.train_items)  # the step's pairs (in another order: the sums do not care)
    ent = _shifted_entropy(tr.model, batch)
    trl_ent, trl_tokens = _trl_entropy_and_tokens(ent, (batch["response_mask"] & batch["attention_mask"])[:, 1:],
                                                  batch["attention_mask"])
    e = tr.evaluate(tr.train_items)
    m = tr.train_step()
    assert m["entropy"] == pytest.approx(trl_ent, rel=1e-5) and e["eval_entropy"] == pytest.approx(trl_ent, rel=1e-5)
    assert m["num_tokens"] == trl_tokens
    assert tr.train_step()["num_tokens"] == 2 * trl_tokens


def test_kto_entropy_and_num_tokens_equal_trls_lines(tmp_path, pref_tok):
    recs = synthetic_preference_records(4, seed=3)  # 8 examples, one step
    tr = KTOTrainer(KTOConfig(**_base(tmp_path, "kto", batch_size=8)), tokenizer=pref_tok, train_records=recs,
                    eval_records=[])
    batch = tr._batch(tr.train_items)  # the examples' own rows: TRL counts no KL row
    ent = _shifted_entropy(tr.model, batch)
    trl_ent, trl_tokens = _trl_entropy_and_tokens(ent, (batch["response_mask"] & batch["attention_mask"])[:, 1:],
                                                  batch["attention_mask"])
    m = tr.train_step()
    assert m["entropy"] == pytest.approx(trl_ent, rel=1e-5) and m["num_tokens"] == trl_tokens
    assert tr.evaluate(tr.train_items)["eval_entropy"] != m["entropy"]  # the weights moved: evaluated anew


@pytest.mark.parametrize("extra", [{}, dict(loss_type="orpo"), dict(use_weighting=True), dict(padding_free=True)],
                         ids=["plain", "orpo_full_rows", "wpo", "padding_free"])
def test_dpo_logits_and_token_accuracy_equal_trls_lines(tmp_path, pref_tok, extra):
    """After a few steps: logits/chosen, logits/rejected and mean_token_accuracy of a step and of
    an evaluation over the same pairs are TRL's lines on its fused head's mean_logits / is_top1."""
    recs = synthetic_preference_records(6, seed=2)
    tr = DPOTrainer(DPOConfig(**_base(tmp_path, "dpo", batch_size=len(recs), max_steps=10, **extra)),
                    tokenizer=pref_tok, train_records=recs, eval_records=recs[:3])
    for _ in range(3):
        tr.train_step()
    batch = tr._batch(tr.train_items)
    trl = _trl_dpo_logit_metrics(_trl_fused_outputs(tr.model, batch), _shift_mask(batch))
    e = tr.evaluate(tr.train_items)
    m = tr.train_step()
    for k, v in trl.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
        assert e["eval_" + k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert 0 < m["mean_token_accuracy"] < 1 and m["logits/chosen"] != m["logits/rejected"]


def test_kto_logits_equal_trls_lines(tmp_path, pref_tok):
    recs = synthetic_preference_records(4, seed=3)  # 8 examples, one step
    tr = KTOTrainer(KTOConfig(**_base(tmp_path, "kto", batch_size=8)), tokenizer=pref_tok, train_records=recs,
                    eval_records=[])
    batch = tr._batch(tr.train_items)
    desirable = torch.tensor([bool(it["label"]) for it in tr.train_items])
    assert 0 < int(desirable.sum()) < len(desirable)
    trl = _trl_kto_logit_metrics(_trl_fused_outputs(tr.model, batch), _shift_mask(batch), desirable)
    assert set(trl) == {"logits/chosen", "logits/rejected"}
    m = tr.train_step()
    for k, v in trl.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert "mean_token_accuracy" not in m  # TRL's KTO logs none
    # a side without examples has no mean (TRL appends none)
    e = tr.evaluate([it for it in tr.train_items if it["label"]])
    assert "eval_logits/chosen" in e and "eval_logits/rejected" not in e


# ----------------------------------------------------------------------------- ties, temperature, paths


def _tied_model(vocab=50):
    """A tiny Llama whose LM head is zero but for rows 3 and 7, both u: every position's logits
    tie, either at columns 3 and 7 (h·u > 0: only 3 is top-1) or at every other column (0 is)."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(vocab, hidden_size=16, num_layers=1, num_heads=2, seed=3)
    with torch.no_grad():
        w = model.lm_head.weight
        u = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0))
        w.zero_()
        w[3] = u
        w[7] = u
    return model


@pytest.mark.parametrize("backend", live_cpu_backends())
@pytest.mark.parametrize("packed", [False, True])
def test_top1_ties_and_mean_logit_equal_trls_fused_head(backend, packed):
    from rlhf_fast.models.logprobs import sequence_logprobs
    from rlhf_fast.ops import use_backend

    model = _tied_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 1, 3, 7, 9])[torch.randint(0, 5, (4, 12), generator=g)]
    am = torch.ones_like(ids)
    am[2, 9:] = 0  # right padding
    resp = torch.ones_like(ids)
    resp[:, :3] = 0
    batch = {"input_ids": ids, "attention_mask": am, "response_mask": resp}
    T = 0.7
    with use_backend(backend), torch.no_grad():
        lp0, ent0 = sequence_logprobs(model, ids, am, response_mask=resp, temperature=T, return_entropy=True,
                                      packed=packed)
        lp, ent, top1, ml = sequence_logprobs(model, ids, am, response_mask=resp, temperature=T,
                                              return_entropy=True, return_top1=True, return_mean_logit=True,
                                              packed=packed)
    assert torch.equal(lp, lp0) and torch.equal(ent, ent0)  # the statistics change nothing else
    trl = _trl_fused_outputs(model, batch, temperature=T)
    mask = _shift_mask(batch)
    assert top1.dtype == torch.bool and not top1[:, 1:][~mask].any()
    assert torch.equal(top1[:, 1:], trl.is_top1 & mask)
    torch.testing.assert_close(ml[:, 1:] * mask, trl.mean_logits * mask, rtol=1e-5, atol=1e-7)
    # the ties are real: a 7 whose logit ties with 3 for the max is never top-1; some 3s and 0s are
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    tie37 = (logits[..., 3] == logits[..., 7]) & (logits[..., 3] == logits.amax(-1)) & mask
    labels = ids[:, 1:]
    assert bool((tie37 & (labels == 7)).any()) and not top1[:, 1:][tie37 & (labels == 7)].any()
    assert bool(top1[:, 1:][labels == 3].any()) and bool(top1[:, 1:][labels == 0].any())


def test_unfused_head_gives_the_fused_statistics():
    """A head that cannot be fused (a logit transform in the config, here a neutral one in value)
    takes the full-logit path: the same top-1 and mean logit as the fused head."""
    from rlhf_fast.models.logprobs import sequence_logprobs

    model = _tied_model()
    ids = torch.tensor([0, 1, 3, 7, 9])[torch.randint(0, 5, (3, 10), generator=torch.Generator().manual_seed(2))]
    kw = dict(temperature=0.7, return_top1=True, return_mean_logit=True)
    fused = sequence_logprobs(model, ids, **kw)
    model.config.logit_scale = 1.0 + 1e-9  # refused by the fused head; llama's forward ignores it
    with pytest.warns(RuntimeWarning, match="full logits"):
        full = sequence_logprobs(model, ids, **kw)
    assert torch.equal(fused[1], full[1])
    torch.testing.assert_close(fused[2], full[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused[0], full[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mean_logits_is_the_vocabulary_mean_of_the_logits(dtype):
    from rlhf_fast.models.logprobs import mean_logits

    g = torch.Generator().manual_seed(4)
    h, w, b = torch.randn(6, 8, generator=g), torch.randn(37, 8, generator=g), torch.randn(37, generator=g)
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    z = (h.double() @ w.double().t() + b.double()) / 0.7  # [6, 37] exact logits of the (rounded) inputs
    for bias, exp in ((b, z.mean(-1)), (None, (z - b.double() / 0.7).mean(-1))):
        got = mean_logits(h, w, bias, 0.7)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (6,)
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)


def test_statistic_flags_are_checked():
    from rlhf_fast.models.logprobs import sequence_logprobs

    model = _tied_model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    for key in ("return_top1", "return_mean_logit"):
        with pytest.raises(TypeError, match=key):
            sequence_logprobs(model, ids, **{key: 1})


# ----------------------------------------------------------------------------- reward vs TRL's lines


def test_reward_metrics_equal_trls_compute_loss_lines(tmp_path, pref_tok):
    """min/mean/max_reward, accuracy and margin of a step (and their eval_ twins) are TRL's
    RewardTrainer.compute_loss lines on the scores of a plain forward of every sequence."""
    recs = synthetic_preference_records(8, seed=4)
    tr = RewardTrainer(RewardConfig(**_base(tmp_path, "rw", batch_size=len(recs))), tokenizer=pref_tok,
                       train_records=recs, eval_records=recs)
    with torch.no_grad():
        score = lambda ids: float(tr.model(input_ids=torch.tensor([ids])).logits[0, 0])  # noqa: E731
        rewards_chosen = torch.tensor([score(it["seqs"][0]) for it in tr.train_items])
        rewards_rejected = torch.tensor([score(it["seqs"][1]) for it in tr.train_items])
    all_rewards = torch.cat([rewards_chosen, rewards_rejected])
    # trl/trainer/reward_trainer.py, RewardTrainer.compute_loss ("Compute min, mean, max, accuracy and margin")
    trl = {"min_reward": all_rewards.min().item(), "mean_reward": all_rewards.mean().item(),
           "max_reward": all_rewards.max().item(),
           "accuracy": (rewards_chosen > rewards_rejected).float().mean().item(),
           "margin": (rewards_chosen - rewards_rejected).mean().item()}
    num_tokens = sum(len(s) for it in tr.train_items for s in it["seqs"])  # attention_mask.sum() of the batch
    e = tr.evaluate()
    m = tr.train_step()
    for k, v in trl.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        if k != "accuracy":  # ours counts a tie as ½ (kept as it was)
            assert e["eval_" + k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert m["num_tokens"] == num_tokens and 0 < m["accuracy"] < 1 and m["min_reward"] < m["max_reward"]


# ----------------------------------------------------------------------------- count, resume, throughput


def _run_sft(tmp_path, tok, name, stop):
    cfg = SFTConfig(**_base(tmp_path, name, batch_size=4, max_steps=4, save_every=2))
    recs = synthetic_sft_records(10, seed=7)
    t = SFTTrainer(cfg, tokenizer=tok, train_records=recs, eval_records=recs[:2])
    if stop < cfg.max_steps:  # interrupted after step `stop` (its checkpoint written), then a new process
        while t.step < stop:
            t.train_step()
        t._save()
        t = SFTTrainer(cfg, tokenizer=tok, train_records=recs, eval_records=recs[:2])
    t.train()
    return t, cfg.output_dir


def test_num_tokens_continues_across_resume_and_throughput_is_logged(tmp_path, sft_tok):
    full, full_dir = _run_sft(tmp_path, sft_tok, "full", 4)
    resumed, res_dir = _run_sft(tmp_path, sft_tok, "resumed", 2)
    recs = read_metrics(full_dir)
    steps = [r for r in recs if r["step"] > 0]
    counts = [r["num_tokens"] for r in steps]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and counts == sorted(set(counts)) and counts[0] > 0
    assert resumed.num_tokens == full.num_tokens == counts[-1]
    late = lambda log: [r for r in log if r["step"] > 2]  # noqa: E731
    assert late(untimed_metrics(res_dir)) == late(untimed_metrics(full_dir))
    # throughput: that step's tokens over that step's seconds (a timing: dropped for comparisons)
    previous = [0] + counts[:-1]
    for r, before in zip(steps, previous):
        assert r["train_tokens_per_second"] == pytest.approx((r["num_tokens"] - before) / r["time/step"], rel=1e-9)
    assert all(k not in r for r in untimed_metrics(full_dir) for k in TIMED_METRICS)


def test_every_offline_trainer_logs_its_throughput(tmp_path, pref_tok):
    recs = synthetic_preference_records(4, seed=5)
    for cls, cfg_cls, name in ((DPOTrainer, DPOConfig, "dpo"), (KTOTrainer, KTOConfig, "kto"),
                               (RewardTrainer, RewardConfig, "reward")):
        tr = cls(cfg_cls(**_base(tmp_path, name, batch_size=4, max_steps=2)), tokenizer=pref_tok,
                 train_records=recs, eval_records=[])
        tr.train()
        rec = read_metrics(str(tmp_path / name))[-1]
        assert rec["step"] == 2 and rec["num_tokens"] == tr.num_tokens > 0, name
        assert rec["train_tokens_per_second"] == pytest.approx(tr.step_tokens / rec["time/step"], rel=1e-9), name


# ----------------------------------------------------------------------------- two ranks


# (2-rank spec, its 1-process twin) of tests/distributed/trainer_worker.py: unequal rows, tokens and
# pair weights per rank, two micro-batches a step where the spec says so
DIST_PAIRS = [("sft:ddp:2:m_sft_ddp:2", "sft:none:2:m_sft_one:2"), ("reward:ddp:2:m_rw_ddp", "reward:none:2:m_rw_one"),
              ("dpo:fsdp2:2:m_dpo_fsdp2:2", "dpo:none:2:m_dpo_one:2"),
              ("kto:ddp:2:m_kto_ddp:2", "kto:none:2:m_kto_one:2")]
DIST_KEYS = {"sft": ("entropy", "num_tokens", "eval_entropy", "mean_token_accuracy", "eval_mean_token_accuracy"),
             "reward": ("num_tokens", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "eval_margin",
                        "eval_min_reward", "eval_mean_reward", "eval_max_reward"),
             "dpo": ("entropy", "num_tokens", "eval_entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy",
                     "eval_logits/chosen", "eval_mean_token_accuracy"),
             "kto": ("entropy", "num_tokens", "eval_entropy", "logits/chosen", "logits/rejected")}


def test_two_ranks_log_one_process_metrics(tmp_path):
    """The new metrics are global: two gloo ranks log those of one process on the same global
    batches (the sums all-reduced with the existing ones; the token count from the global batch)."""
    from tests.test_distributed_trainers import _launch

    root = str(tmp_path)
    two = _launch(root, "two", 2, [p[0] for p in DIST_PAIRS])["runs"]
    one = _launch(root, "one", 1, [p[1] for p in DIST_PAIRS])["runs"]
    for a, b in DIST_PAIRS:
        for key in DIST_KEYS[a.split(":")[0]]:
            sa = [(r["step"], r[key]) for r in two[a] if key in r]
            sb = [(r["step"], r[key]) for r in one[b] if key in r]
            assert sa and [s for s, _ in sa] == [s for s, _ in sb], (a, key)
            assert [v for _, v in sa] == pytest.approx([v for _, v in sb], rel=1e-4, abs=1e-6), (a, key)
