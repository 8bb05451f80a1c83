"""Review of feedback data and reward models (training, evaluation, use as an RL reward).

The first two tests pin what was checked and found right (the Bradley-Terry / centring loss
against TRL 1.16's RewardTrainer.compute_loss, Plackett-Luce against a hand computation); each
of the others pins one defect the review found, since fixed."""

import copy
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.feedback.losses import bradley_terry_loss, plackett_luce_loss  # noqa: E402
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"


# --------------------------------------------------------------------------- checked, right

def test_pairs_loss_is_trl_compute_loss_with_margin_and_centring():
    """trl/trainer/reward_trainer.py RewardTrainer.compute_loss (TRL 1.16), transcribed:
    −logσ(r_c − r_r − margin).mean() + c·mean((r_c + r_r)²); ours is bradley_terry_loss plus
    the trainer's centring term with unit weights."""
    from rlhf_fast.feedback.losses import _weighted_mean

    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(7, generator=g), torch.randn(7, generator=g)
    margin, c = torch.rand(7, generator=g), 0.01
    trl = -torch.nn.functional.logsigmoid(rc - rr - margin).mean() + c * torch.mean((rc + rr) ** 2)
    w = torch.ones(7)
    ours = bradley_terry_loss(rc, rr, margin=margin, weights=w) + c * _weighted_mean((rc + rr) ** 2, w)
    torch.testing.assert_close(ours, trl)


def test_plackett_luce_is_the_hand_computation_with_padding():
    """K = 4 and a K = 2 item padded with −1: −Σ_i [s_{π_i} − log Σ_{j≥i} exp s_{π_j}], mean."""
    s = torch.tensor([[1.0, 2.0, 0.5, 0.0], [0.3, -1.0, 0.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[1, 0, 2, 3], [0, 1, -1, -1]])

    def hand(sc, rk):
        rk = [i for i in rk if i >= 0]
        return -sum(sc[rk[i]] - math.log(sum(math.exp(sc[j]) for j in rk[i:])) for i in range(len(rk)))

    want = (hand(s[0].tolist(), r[0].tolist()) + hand(s[1].tolist(), r[1].tolist())) / 2
    assert plackett_luce_loss(s, r).item() == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- defects

def test_rl_scores_chat_prompts_with_the_reward_models_template(tmp_path, monkeypatch):
    """A reward model whose tokenizer has its own chat template (e.g. trained with
    chat_template_path): RLTrainer hands RewardModelReward the prompt text rendered with the
    policy's template, which reward_input_ids then tokenises as plain text. The reward trainer,
    score_texts (and TRL's GRPO _calculate_rewards, which re-applies the reward processing
    class's template to prompt + completion) read the conversation through the reward
    tokenizer's template, so the same answer gets another score in RL."""
    from rlhf_fast.algorithms import RewardModelReward
    from rlhf_fast.feedback.formats import render_prompt
    from rlhf_fast.models.tiny import tiny_reward_model
    from rlhf_fast.trainers.reward import score_texts
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import make_policy

    pol, tok = make_policy()
    rm_tok = copy.deepcopy(tok)
    rm_tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}[assistant] {% endif %}")
    rm = tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    seen = []
    orig = RewardModelReward.__call__

    def spy(self, prompts, completions, ctx):
        out = orig(self, prompts, completions, ctx)
        seen.append((list(prompts), list(completions), list(out)))
        return out

    monkeypatch.setattr(RewardModelReward, "__call__", spy)
    chats = [[{"role": "user", "content": "q: a"}], [{"role": "user", "content": "x y"}]]
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(tmp_path / "run"), progress=False,
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    RLTrainer(cfg, pol, tok, reward_models=[(rm, rm_tok)], prompts=chats).train()
    prompts, completions, rl = seen[0]
    chat_of = {render_prompt(c, tok): c for c in chats}
    want = score_texts(rm, rm_tok, [chat_of[p] for p in prompts], completions)
    # seen: RL 0.0590, 0.0561, ... against score_texts 0.0502, 0.0473, ...
    assert rl == pytest.approx(want, abs=1e-5)


def _labels_file(tmp_path, rows):
    path = tmp_path / "labels.jsonl"
    full = [{"key": f"k{i}", "annotator": "ann", **r} for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in full))
    return str(path)


def _label_rows(n):
    return [{"prompt": f"say {i}", "a": f"yes {i} one", "b": f"no {i} two", "label": "A"} for i in range(n)]


def test_labels_file_with_a_non_text_response_is_a_clear_error(tmp_path):
    """data_kind labels reads label records with read_labels / labels_to_pairs, which check
    only that the keys exist: {"a": 7} becomes a PairRecord with chosen 7, and the trainer fails
    deep in formats.response_text. data_kind pairs names the file, line and field instead."""
    rows = _label_rows(4) + [{"prompt": "say z", "a": 7, "b": "no", "label": "A"}]
    path = _labels_file(tmp_path, rows)
    cfg = RewardConfig(model=TINY, data=path, data_kind="labels", output_dir=str(tmp_path / "run"), max_steps=1,
                       eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"labels\.jsonl:5.*\ba\b"):
        RewardTrainer(cfg)


def test_labels_file_with_identical_responses_is_refused(tmp_path):
    """`rlhf-fast label`'s load_items takes an item whose two responses are the same text, and
    data_kind labels then trains it as a pair with chosen == rejected (loss log 2, no gradient,
    counted ½ in eval_accuracy); load_records refuses that pair for data_kind pairs."""
    rows = _label_rows(4)
    rows[0]["b"] = rows[0]["a"]
    path = _labels_file(tmp_path, rows)
    cfg = RewardConfig(model=TINY, data=path, data_kind="labels", output_dir=str(tmp_path / "run"), max_steps=1,
                       eval_fraction=0.0)
    with pytest.raises(ValueError, match="identical"):
        RewardTrainer(cfg)


@pytest.mark.parametrize("key", ["use_margin", "rankings_as_pairs", "auto_annotator_weights", "dedup", "resume"])
def test_reward_config_refuses_a_non_bool_switch(key):
    """RewardConfig(rankings_as_pairs="false") silently trains rankings as pairs; DPOConfig
    and KTOConfig refuse such values (check_bool_fields) and RewardConfig itself refuses them
    for prefix_sharing and disable_dropout only."""
    with pytest.raises(ValueError, match=key):
        RewardConfig(**{key: "false"})


def test_annotator_weights_with_an_int_key_apply_or_are_refused():
    """A JSONL annotator 1 is read as the id "1"; RewardConfig(annotator_weights={1: 0.5}) is
    accepted and record_weight then finds no entry for "1" (YAML configs convert keys to text,
    the Python API does not)."""
    from rlhf_fast.trainers.common import record_weight

    try:
        cfg = RewardConfig(annotator_weights={1: 0.5})
    except (TypeError, ValueError) as e:
        assert "annotator_weights" in str(e)
        return
    assert record_weight(cfg.annotator_weights, "1") == 0.5


@pytest.mark.parametrize("answer", ["Both are a bit weak, but B is better.", "It is a close call: B"])
def test_judge_text_verdict_does_not_read_the_article_a_as_a_vote(answer):
    """judge._verdict searches r"\\b([AB])\\b" in answer.upper(): "a bit weak, but B" gives
    1.0 (A) though the judge chose B (used when the server returns no log-probs)."""
    from rlhf_fast.feedback.judge import _verdict

    assert _verdict(answer) == 0.0
