"""The metrics the offline trainers log as TRL 1.16's do: SFT's ``entropy`` / ``eval_entropy`` and
``num_tokens`` against TRL's own ``SFTTrainer.compute_loss`` on the same weights and batch; DPO's
and KTO's ``entropy`` and ``num_tokens`` (the plain, per-token and WPO log-prob paths) and the
reward trainer's ``min_reward`` / ``mean_reward`` / ``max_reward`` / ``accuracy`` / ``margin``
against TRL's lines transcribed onto full-logit (and plain ``AutoModelForSequenceClassification``)
forwards of the same batch; ``num_tokens`` accumulating over steps and continuing across a resume
(checkpointed); ``train_tokens_per_second`` = the step's tokens / ``time/step`` in metrics.jsonl,
a timing that ``untimed_metrics`` drops."""

import copy

import pytest
import torch

from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, collate, synthetic_sft_records
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


def test_sft_step_entropy_is_the_global_token_mean_over_micro_batches(tmp_path, sft_tok):
    """A step in three micro-batches: entropy is Σ entropy / Σ trained tokens over the step's rows
    (full-logit entropy of the rows it trained), and num_tokens their non-pad tokens."""
    recs = synthetic_sft_records(9, seed=6)
    tr = SFTTrainer(SFTConfig(**_base(tmp_path, "ga", batch_size=3, grad_accum=3)), tokenizer=sft_tok,
                    train_records=recs, eval_records=[])
    state = tr.batches.state()
    idx = [i for _ in range(3) for i in tr.batches.next()]
    tr.batches.load(state)
    batch = collate([tr.train_rows[i] for i in idx], tr.pad_id)
    ent = _shifted_entropy(tr.model, batch)
    mask = (batch["response_mask"] & batch["attention_mask"])[:, 1:].double()
    m = tr.train_step()
    assert m["entropy"] == pytest.approx(float((ent * mask).sum() / mask.sum()), rel=1e-5)
    assert m["num_tokens"] == int(batch["attention_mask"].sum())


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
DIST_KEYS = {"sft": ("entropy", "num_tokens", "eval_entropy"),
             "reward": ("num_tokens", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "eval_margin",
                        "eval_min_reward", "eval_mean_reward", "eval_max_reward"),
             "dpo": ("entropy", "num_tokens", "eval_entropy"), "kto": ("entropy", "num_tokens", "eval_entropy")}


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
