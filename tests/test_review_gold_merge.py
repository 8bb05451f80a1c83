"""Review of GOLD (distill.use_uld_loss) and model merging (the ``merge`` section). Each test
showed a bug, now fixed (each failed before its fix): a ``merge.target`` of another shape and
normalized linear weights summing to 0 were refused only at the first merge (after training);
ULD's per-answer divergence was averaged over ranks by tokens; a ``distill.teacher_tokenizer``
folder without a tokenizer gave transformers' message, naming no key."""

import pytest
import torch

from rlhf_fast.models.tiny import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2,vocab_size=300"


@pytest.fixture(scope="module")
def tok():
    from tests.test_reward import preference_tokenizer

    return preference_tokenizer()


def _sft(tmp_path, tok, **kw):
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    base = dict(model=TINY, output_dir=str(tmp_path / "run"), lr=3e-2, warmup_steps=0, eval_every=0, log_every=1,
                max_len=48, max_steps=2, device="cpu", batch_size=4)
    base.update(kw)
    return SFTTrainer(SFTConfig(**base), tokenizer=tok, train_records=synthetic_sft_records(8, seed=6),
                      eval_records=[])


# ----------------------------------------------------------------------------- merging


def test_merge_target_of_another_shape_is_refused_before_training(tmp_path, tok):
    folder = str(tmp_path / "other")
    # the run's architecture (llama, vocabulary 300) but another width: no tensor has the policy's shape
    tiny_causal_lm(300, hidden_size=16, num_layers=2, num_heads=2, seed=1).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"merge"):
        _sft(tmp_path, tok, merge={"target": folder, "dtype": "float32"})


def test_merge_linear_weights_summing_to_zero_are_refused_by_the_config():
    from rlhf_fast.models.merge import MergeConfig

    with pytest.raises(ValueError, match=r"merge\.(policy|target)_model_weight"):
        MergeConfig(method="linear", policy_model_weight=0.0, target_model_weight=0.0)


# ----------------------------------------------------------------------------- GOLD


@pytest.fixture(scope="module")
def toks():
    from rlhf_fast.models.tiny import train_tokenizer
    from tests.test_distill_gold import TEACHER_TEXTS
    from tests.test_rl_learning import TEXTS

    return train_tokenizer(TEXTS, 48), train_tokenizer(TEACHER_TEXTS, 64)


class _Capture:
    """A ctx that records the vector one rank would contribute to all_reduce_sum."""

    distributed = True

    def all_reduce_sum(self, v):
        self.v = v.clone()
        return v


class _TwoRanks:
    """A ctx whose all_reduce_sum adds the other rank's vector (as gloo would)."""

    distributed = True

    def __init__(self, other):
        self.other = other

    def all_reduce_sum(self, v):
        return v + self.other


def test_uld_divergence_over_two_ranks_is_the_one_process_row_mean(tmp_path, toks):
    from tests.test_distill_gold import gold_trainer

    tr = gold_trainer(tmp_path, toks, distill=dict(uld_use_hybrid_loss=True))
    torch.manual_seed(1)
    data, _ = tr.rollout()
    B = data.input_ids.shape[0]
    # the first rank's answers scored on their first 2 tokens only (as shorter answers would be): each rank
    # the same number of answers, not of tokens
    first = data.response_mask.float().argmax(1)  # [B] each answer's first column
    cols = torch.arange(data.input_ids.shape[1])[None]
    short = (torch.arange(B) < B // 2)[:, None] & (cols >= first[:, None] + 2)
    data.response_mask = data.response_mask & ~short
    half_a, half_b = data.select(torch.arange(B // 2)), data.select(torch.arange(B // 2, B))
    n_a, n_b = float(half_a.response_mask.sum()), float(half_b.response_mask.sum())
    assert n_a != n_b  # the two ranks hold different token counts (else both weightings agree)
    one = tr.policy_backward(data)  # one process: the mean over all B answers
    st_a, st_b = tr.policy_backward(half_a), tr.policy_backward(half_b)  # each rank's own statistics
    ctx = tr.ctx
    try:
        cap = _Capture()
        tr.ctx = cap
        tr._global_stats(dict(st_b), half_b.response_mask)
        tr.ctx = _TwoRanks(cap.v)
        two = tr._global_stats(dict(st_a), half_a.response_mask)
    finally:
        tr.ctx = ctx
    for k in ("divergence", "matched_loss", "unmatched_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-6), (k, two[k], one[k])


def test_teacher_tokenizer_folder_without_a_tokenizer_names_the_key(tmp_path, toks):
    from tests.test_distill_gold import gold_trainer

    folder = tmp_path / "model_only"
    tiny_causal_lm(64, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(str(folder))  # config, weights
    with pytest.raises(ValueError, match=r"distill\.teacher_tokenizer"):
        gold_trainer(tmp_path, toks, distill=dict(teacher_tokenizer=str(folder)))
