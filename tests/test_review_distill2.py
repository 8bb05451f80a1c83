"""Second review of distillation (rlhf_fast/trainers/distill.py, rlhf_fast/algorithms/uld.py)
against TRL 1.16's GKDTrainer / GOLDTrainer and on awkward inputs: one test per defect."""

import os

import pytest

from rlhf_fast.models.tiny import tiny_causal_lm, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def toks():
    """(the student's tokenizer, 48 tokens; a teacher's, 78 tokens with other ids)."""
    from tests.test_distill_gold import TEACHER_TEXTS
    from tests.test_rl_learning import TEXTS

    return train_tokenizer(TEXTS, 48), train_tokenizer(TEXTS + TEACHER_TEXTS, 80)


def test_uld_teacher_instance_uses_its_own_folders_tokenizer(tmp_path, toks):
    """GOLD (distill.use_uld_loss) with ``teacher_model=`` a model loaded from a folder that holds
    its own tokenizer and no distill.teacher_tokenizer: TRL's GOLDTrainer reads the teacher's
    tokenizer from ``teacher_model.config._name_or_path``; ours took the student's, so the teacher
    (78 rows, another vocabulary) scored the answers re-tokenized into the student's ids — a
    silent wrong loss (its head covers the student's 48 tokens, so nothing refused it)."""
    from transformers import AutoModelForCausalLM

    from rlhf_fast.trainers.distill import DistillationTrainer
    from rlhf_fast.trainers.rl_config import DistillConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_distill_gold import make_teacher
    from tests.test_rl_learning import PROMPTS

    stok, ttok = toks
    folder = str(tmp_path / "teacher")
    make_teacher(ttok).save_pretrained(folder)
    ttok.save_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder)
    pol = tiny_causal_lm(len(stok), hidden_size=32, num_layers=2, num_heads=2, seed=0,
                         pad_token_id=stok.pad_token_id, bos_token_id=stok.bos_token_id,
                         eos_token_id=stok.eos_token_id)
    cfg = RLConfig(estimator="distill", steps=1, output_dir=str(tmp_path / "run"), progress=False, sample_every=0,
                   rollout=RolloutConfig(prompts_per_step=2, group_size=1, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=2, micro_batch_size=2),
                   distill=DistillConfig(use_uld_loss=True))
    tr = DistillationTrainer(cfg, pol, stok, prompts=PROMPTS, teacher_model=teacher)
    assert tr._uld.tokenizer.get_vocab() == ttok.get_vocab()


@pytest.mark.parametrize("kw", [dict(uld_distillation_weight=0.0, uld_crossentropy_weight=0.0),
                                dict(uld_use_hybrid_loss=True, uld_hybrid_matched_weight=0.0,
                                     uld_hybrid_unmatched_weight=0.0)])
def test_uld_weights_that_zero_the_loss_are_refused(kw):
    """distill.use_uld_loss with both ``uld_distillation_weight`` and ``uld_crossentropy_weight``
    0, or both hybrid weights 0 (and no cross-entropy), gives a loss that is 0 on every batch: the
    run spent its steps and changed no weight, silently (as DPO's all-zero ``loss_weights``, which
    are refused). Refused by the config, naming the keys."""
    from rlhf_fast.trainers.rl_config import DistillConfig

    with pytest.raises(ValueError, match=r"distill\.uld_"):
        DistillConfig(use_uld_loss=True, **kw)
