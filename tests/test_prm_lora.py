"""LoRA in the process-reward-model trainer (rlhf_fast.trainers.prm, ``lora``): fresh TOKEN_CLS
adapters with the token-classification head trained whole (peft's modules_to_save), the base
frozen; exact resume from a checkpoint holding the adapters; ``final/`` the merged model, which
reloads as a plain AutoModelForTokenClassification and as ``reward.process_model``; a peft model
passed in keeps its adapters; bad settings refused naming the key. Then (slow) the learning check
of RL with dense step rewards from a trained PRM against an lr~0 control, measured by the
synthetic additions' verifiable step checks (``rlhf_fast.trainers.prm.synthetic_step_accuracy``
and friends, the README's measurement's ``reward.functions``)."""

import copy
import os

import pytest
import torch

from rlhf_fast.trainers.prm import PRMConfig, PRMTrainer, synthetic_stepwise_records
from tests.test_prm import tok  # noqa: F401  (the PRM tests' tokenizer fixture)

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
LORA = {"r": 4, "lora_alpha": 8}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=8, lr=2e-2, warmup_steps=1, eval_every=0,
                log_every=1, max_len=64)
    base.update(kw)
    return PRMConfig(**base)


def _logits(model, items, pad_id):
    from rlhf_fast.trainers.prm import pad_rows

    ids, attn, _ = pad_rows(items, pad_id)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn).logits


def test_lora_config_values(tmp_path, tok):
    """``--lora.r 4`` reads as YAML; a non-mapping, another task type, and target_modules naming
    the head are refused naming the key; ``lora`` with a model that already carries adapters is
    refused."""
    peft = pytest.importorskip("peft")

    from rlhf_fast.trainers.config import load_config

    assert load_config(PRMConfig, None, ["--lora.r", "4", "--lora.lora_alpha", "8"]).lora == LORA
    with pytest.raises(ValueError, match="lora must be null or a mapping"):
        PRMConfig(lora=[4])
    with pytest.raises(ValueError, match="lora.task_type must be 'TOKEN_CLS'"):
        PRMConfig(lora={"task_type": "SEQ_CLS"})
    assert PRMConfig(lora={"task_type": "TOKEN_CLS"}).lora == {"task_type": "TOKEN_CLS"}
    recs = synthetic_stepwise_records(16, seed=3)
    with pytest.raises(ValueError, match="lora.target_modules must not name the token-classification head 'score'"):
        PRMTrainer(_cfg(tmp_path, "head", lora={"target_modules": ["q_proj", "score"]}), train_records=recs,
                   eval_records=[], tokenizer=tok)
    base = PRMTrainer(_cfg(tmp_path, "plain", max_steps=1), train_records=recs, eval_records=[], tokenizer=tok).model
    with_adapters = peft.get_peft_model(base, peft.LoraConfig(task_type="TOKEN_CLS", r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries a peft adapter"):
        PRMTrainer(_cfg(tmp_path, "both", lora={}), model=with_adapters, tokenizer=tok, train_records=recs,
                   eval_records=[])


def test_lora_trains_adapters_and_head_resumes_exactly_and_final_is_merged(tmp_path, tok):
    """Only the LoRA adapters and the head's trained copy require grad; after training the base is
    unchanged, lora_B and the head moved and the held-out loss fell; a run stopped at step 10 and
    resumed equals an uninterrupted one (weights and log); final/ holds no adapter, reloads with
    AutoModelForTokenClassification (step_separator kept) with the logits of the in-memory merged
    model, and loads as reward.process_model."""
    pytest.importorskip("peft")
    from transformers import AutoModelForTokenClassification

    from rlhf_fast.algorithms.process_rewards import ProcessRewardModel
    from rlhf_fast.models.loading import reward_model_sources
    from rlhf_fast.trainers.rl_config import RewardConfig
    from tests.test_trainer_common import assert_resumes_exactly

    recs, held = synthetic_stepwise_records(300, seed=1), synthetic_stepwise_records(64, seed=2)

    def trainer(name, **kw):
        c = _cfg(tmp_path, name, max_steps=20, save_every=10, batch_size=16, lr=3e-2, warmup_steps=3,
                 lora=dict(LORA), **kw)
        return PRMTrainer(c, train_records=recs, eval_records=held, tokenizer=tok)

    fresh = trainer("fresh")
    assert fresh.is_peft
    init = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    trainable = sorted(n for n, p in fresh.model.named_parameters() if p.requires_grad)
    assert any("score.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "score.modules_to_save" in n for n in trainable), trainable
    assert not any("score" in n and "lora_" in n for n in trainable)  # no adapter on the head itself

    start = fresh.evaluate()
    full = trainer("full")
    out = full.train()
    assert full.is_peft and any("lora_" in n for n, _ in full.model.named_parameters())  # final/ merged a copy
    moved = []
    for n, p in full.model.named_parameters():
        if p.requires_grad:
            moved += [n] if not torch.equal(p, init[n]) else []
        else:
            assert torch.equal(p, init[n]), n  # the base (and the head's original) stays frozen
    assert any("lora_B" in n for n in moved) and any("score.modules_to_save" in n for n in moved), moved
    # it learns (20 steps; the full-model PRM test reaches more in 30): held-out loss and step accuracy
    assert out["eval_loss"] < start["eval_loss"] - 0.08 and out["eval_accuracy"] > start["eval_accuracy"] + 0.1, \
        (start, out)

    assert assert_resumes_exactly(trainer, full, 10).step == 20

    final = str(tmp_path / "full" / "final")
    assert not os.path.exists(os.path.join(final, "adapter_config.json"))
    re = AutoModelForTokenClassification.from_pretrained(final)
    assert re.config.step_separator == "\n" and re.config.num_labels == 2
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in re.named_parameters())
    merged = copy.deepcopy(full.model).merge_and_unload()
    want = _logits(merged, full.eval_items, full.pad_id)
    torch.testing.assert_close(_logits(re, full.eval_items, full.pad_id), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(full.model, full.eval_items, full.pad_id), want, rtol=1e-5, atol=1e-5)

    (src, w), = reward_model_sources(RewardConfig(process_model=final, process_aggregation="min"))
    assert isinstance(src, ProcessRewardModel) and src.separator == "\n" and w == 1.0
    assert len(src(["add the numbers:"], ["1+1=2\n2+2=9"], None)) == 1


def test_a_peft_model_keeps_its_adapters_and_checkpointing_trains(tmp_path, tok):
    """A peft model passed as ``model`` trains its own adapters (nothing added) and its final/ is
    the merged model; with gradient_checkpointing the adapters still get gradients."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForTokenClassification

    recs = synthetic_stepwise_records(16, seed=3)
    base = PRMTrainer(_cfg(tmp_path, "plain", max_steps=1), train_records=recs, eval_records=[], tokenizer=tok).model
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="TOKEN_CLS", r=2, lora_alpha=4,
                                                      target_modules=["q_proj", "v_proj"]))
    want = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    tr = PRMTrainer(_cfg(tmp_path, "own", max_steps=2), model=model, tokenizer=tok, train_records=recs,
                    eval_records=[])
    assert tr.model is model and sorted(n for n, p in tr.model.named_parameters() if p.requires_grad) == want
    tr.train()
    re = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "own" / "final"))
    items = tr.train_items[:4]
    torch.testing.assert_close(_logits(re, items, tr.pad_id), _logits(tr.model, items, tr.pad_id), rtol=1e-5, atol=1e-5)

    ck = PRMTrainer(_cfg(tmp_path, "ckpt", max_steps=1, lora=dict(LORA), gradient_checkpointing=True),
                    train_records=recs, eval_records=[], tokenizer=tok)
    before = {n: p.detach().clone() for n, p in ck.model.named_parameters() if "lora_B" in n}
    ck.train_step()
    assert before and any(not torch.equal(p, before[n]) for n, p in ck.model.named_parameters() if "lora_B" in n)


# ------------------------------------------------------- RL with dense step rewards from a trained PRM
def test_verifiable_step_checks():
    from rlhf_fast.trainers.prm import (synthetic_num_steps as num_steps, synthetic_seen_errors as seen_errors,
                                        synthetic_step_accuracy as step_accuracy,
                                        synthetic_well_formed as well_formed)

    comps = ["1+2=3\n2+2=9\n", "x\n0+1=1", "", "1+1=5\n\n2+0=2\n"]
    assert step_accuracy(None, comps) == [0.5, 0.5, 0.0, 0.5]
    assert well_formed(None, comps) == [1.0, 0.5, 0.0, 1.0]
    assert seen_errors(None, comps) == [0.5, 0.0, 0.0, 0.5]
    assert num_steps(None, comps) == [2.0, 2.0, 0.0, 2.0]


@pytest.mark.slow
def test_rl_with_dense_prm_step_rewards_raises_step_accuracy(tmp_path, tok):
    """A PRM trained on the synthetic additions, a policy fine-tuned on the same solutions (half
    the steps wrong), then REINFORCE++ whose rewards are the PRM's per-step log P(correct)
    (process_aggregation steps) plus a format-only outcome reward: the verifiable step accuracy
    of its answers rises well above the lr~0 control's, and the steps wrong the way the PRM's
    data is wrong (c = a+b+3..5) almost vanish. (The README's measurement, smaller.)"""
    from rlhf_fast.feedback.formats import SFTRecord
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import (DataConfig, KLConfig, ModelConfig, OptimConfig, PPOConfig, RewardConfig,
                                              RLConfig, RolloutConfig)
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

    prm = PRMTrainer(_cfg(tmp_path, "prm", max_steps=40, batch_size=16, lr=1e-2, warmup_steps=3),
                     train_records=synthetic_stepwise_records(600, seed=1),
                     eval_records=synthetic_stepwise_records(64, seed=2), tokenizer=tok)
    assert prm.train()["eval_accuracy"] > 0.85
    sft_recs = [SFTRecord(r.prompt, "".join(s + "\n" for s in r.completions))
                for r in synthetic_stepwise_records(2000, seed=100)]
    sft = SFTTrainer(SFTConfig(model="tiny:llama:hidden_size=64,num_layers=2,num_heads=4",
                               output_dir=str(tmp_path / "sft"), max_steps=300, batch_size=16, lr=3e-3,
                               eval_every=0, max_len=64, seed=0), train_records=sft_recs, eval_records=[])
    sft.train()

    def rl(name, lr):
        rc = RewardConfig(process_model=str(tmp_path / "prm" / "final"), process_aggregation="steps",
                          functions=["rlhf_fast.trainers.prm:synthetic_well_formed",
                                     "rlhf_fast.trainers.prm:synthetic_step_accuracy",
                                     "rlhf_fast.trainers.prm:synthetic_seen_errors"], weights=[1.0, 0.0, 0.0],
                          length_penalty=0.0, repetition_penalty=0.0)
        cfg = RLConfig(estimator="reinforce++", steps=40, seed=0, output_dir=str(tmp_path / name), progress=False,
                       model=ModelConfig(policy=str(tmp_path / "sft" / "final")),
                       data=DataConfig(prompts=["add the numbers:"]),
                       rollout=RolloutConfig(prompts_per_step=8, group_size=4, max_new_tokens=24, temperature=1.0),
                       reward=rc, kl=KLConfig(coef=0.2), optim=OptimConfig(lr=lr),
                       ppo=PPOConfig(epochs=1, mini_batch_size=32, micro_batch_size=32))
        hist = RLTrainer(cfg).train()
        last = hist[-10:]  # 320 answers
        return {k: sum(h[f"reward/{k}"] for h in last) / len(last)
                for k in ("synthetic_step_accuracy", "synthetic_seen_errors", "process_model")}

    trained, control = rl("rl", 1e-3), rl("control", 1e-9)
    assert trained["synthetic_step_accuracy"] > control["synthetic_step_accuracy"] + 0.2, (trained, control)
    assert trained["synthetic_seen_errors"] < 0.1 < 0.3 < control["synthetic_seen_errors"], (trained, control)
    assert trained["process_model"] > control["process_model"] + 1.5, (trained, control)  # Σ log P per answer
