"""Review of the memory-saving features: padding-free packing (``packed=True``,
rlhf_fast/trainers/packing.py and the packed paths of rlhf_fast/models/logprobs.py), the MoE
load-balancing loss (rlhf_fast/models/moe_aux.py), activation offloading, fp16 mixed precision
and the fused LM head (rlhf_fast/ops/fused_linear.py, rlhf_fast/models/lm_head.py): one test per
defect found, against the padded path, transformers or TRL."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.models import logprobs as L  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 64


def _gpt2(n_positions: int):
    """A tiny GPT-2 (learned absolute position table of ``n_positions`` rows), eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=n_positions,
                                          bos_token_id=1, eos_token_id=2)).eval()


def test_packed_row_longer_than_the_position_table_is_a_clear_error():
    """A learned position table (GPT-2's ``wpe``) holds ``n_positions`` rows. The padded path
    refuses a batch whose sequences run past it with a ValueError naming the table; the packed
    row (``packed=True``: SFT ``packing``, DPO ``padding_free``) passes its own per-sequence
    position ids, so the same sequence went on to index the table out of range: an IndexError
    from the embedding on the CPU, a device-side assert on CUDA. It must be the same clear
    ValueError."""
    m = _gpt2(8)
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    with pytest.raises(ValueError, match="position"):
        L.sequence_logprobs(m, ids, am)
    with pytest.raises(ValueError, match="position"):
        L.sequence_logprobs(m, ids, am, packed=True)


def test_packed_row_of_a_sliding_window_model_keeps_the_per_sequence_forward(monkeypatch):
    """Mistral (and Qwen2 / Qwen3 with a window): llama_forward computes a row only when the
    sliding window never bites (``supported(base, seq_len)`` with seq_len <= window). A packed row
    attends inside each sequence, so the window bounds the longest *sequence*, not the row; with
    the row's length instead, every micro-batch whose packed row outgrew the window (8 rows of
    1024 tokens under Mistral's 4096) left the per-sequence forward for transformers' dense
    block-diagonal [N, N] mask: on the CPU here a packed step ~5x slower than the padded one, the
    opposite of what packing is for. The packed row must run llama_forward (same values)."""
    from transformers import MistralConfig, MistralForCausalLM

    from rlhf_fast.models import llama_forward

    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         sliding_window=8)).eval()
    ids = torch.randint(3, V, (4, 8), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, -2:] = 0  # 4 sequences of <= 8 tokens (the window): a packed row of 27
    padded = L.sequence_logprobs(m, ids, am)
    calls = []
    real = llama_forward.hidden_states
    monkeypatch.setattr(llama_forward, "hidden_states", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    packed = L.sequence_logprobs(m, ids, am, packed=True)
    torch.testing.assert_close(packed, padded, atol=2e-6, rtol=0)
    assert calls == [(1, int(am.sum()))]


def test_fp16_loss_scaling_of_float16_weights_is_a_clear_error():
    """``fp16: true`` is float32 master weights under a float16 autocast with a loss scale; a model
    loaded from a folder in float16 is refused with that explanation (models.loading), but a model
    passed in as float16 reached the first optimizer step and died there, after its forward and
    backward, in torch's GradScaler with "Attempting to unscale FP16 gradients." — naming neither
    the setting nor the way out. It must be a ValueError saying float32 weights are needed."""
    from rlhf_fast.trainers import mixed_precision as mp

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.1)
    with mp.fp16_devices("cpu"):
        scaler = mp.LossScaler(True, "cpu")
        scaler.scale((p.float() * 2).sum()).backward()
        with pytest.raises(ValueError, match="float32"):
            scaler.clip_grad_norm_(opt, [p], 1.0)
        with pytest.raises(ValueError, match="float32"):
            scaler.step(opt)


def test_rl_packed_rows_past_a_sliding_window_are_refused_at_construction(tmp_path):
    """``ppo.padding_free`` / ``ppo.prefix_sharing`` have no transformers fallback (only llama_forward
    computes their rows, and only where the sliding window never bites), so the trainer checks the
    policy at construction "now, not mid-run" — with ``max_new_tokens + 1`` as the row length,
    leaving out the prompt. A Mistral policy (window 16) with 40-token prompts and 4-token answers
    passed that check and failed at its first rollout's scoring (and, with short prompts, whenever
    a long answer first crossed the window). It is refused at construction, naming the key."""
    from transformers import MistralConfig, MistralForCausalLM

    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig
    from tests.test_rl_learning import make_config, make_policy
    from tests.test_rl_padding_free import PROMPTS, _reward

    _, tok = make_policy()
    torch.manual_seed(0)
    pol = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                           max_position_embeddings=128, sliding_window=16,
                                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id))
    cfg = make_config(tmp_path, "grpo", steps=1,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                      ppo=PPOConfig(padding_free=True, epochs=1, mini_batch_size=4, micro_batch_size=4))
    with pytest.raises(ValueError, match="ppo.padding_free"):
        RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)


def test_docs_do_not_describe_an_moe_policy_under_prefix_sharing():
    """docs/from_trl.md's DPO ``router_aux_loss_coef`` row said that "under ``prefix_sharing`` the
    router sees each pair's prompt once ..., in training and evaluation alike"; but
    ``prefix_sharing`` runs only through llama_forward (Llama / Mistral / Qwen2 / Qwen3), so an MoE
    policy is refused at construction and that run does not exist. The row must say it is refused."""
    import pathlib

    from tests.test_moe_aux_loss import mixtral

    from rlhf_fast.trainers.packing import check_prefix_shareable

    with pytest.raises(ValueError, match="prefix_sharing: true needs"):
        check_prefix_shareable("prefix_sharing", 32, mixtral(V))
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "from_trl.md").read_text()
    rows = [r for r in doc.splitlines() if r.startswith("| `router_aux_loss_coef` | `router_aux_loss_coef` | as TRL's: "
                                                         "coef × the aux loss of the policy's one forward")]
    assert len(rows) == 1
    row = rows[0]
    assert "router sees each pair's prompt once" not in row
    assert "prefix_sharing" not in row or "refused" in row.split("prefix_sharing", 1)[1]
