"""Review of the model pieces the trainers use (rlhf_fast/models/moe_aux.py, lm_head.py,
shared_values.py) against their peers: transformers 5.25's own ``aux_loss`` of the model's
CausalLM forward (``load_balancing_loss_func`` of its modeling module), TRL 1.16's
``aux_loss_enabled`` rule, and ``rl.critic_values``. Tiny models built from configs only."""

import warnings

import pytest
import torch

from rlhf_fast.models import moe_aux
from rlhf_fast.models.logprobs import default_position_ids, sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _doge(is_moe: bool = True, seed: int = 0):
    """A 2-layer hidden-32 Doge; ``is_moe``: 16 experts (4 product keys), 2 per token."""
    from transformers import DogeConfig, DogeForCausalLM

    cfg = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, is_moe=is_moe, num_experts=16, num_experts_per_tok=2,
                     max_position_embeddings=64, keep_window_size=64)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DogeForCausalLM(cfg).eval()


def _batch(B: int = 3, T: int = 7, seed: int = 1):
    ids = torch.randint(3, 64, (B, T), generator=torch.Generator().manual_seed(seed))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding
    am[2, :5] = 0
    return ids, am


def _own_aux(model, ids, am):
    return model(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am),
                 output_router_logits=True).aux_loss


# ----------------------------------------------------------------------------- moe_aux


def test_doge_aux_loss_equals_the_models_own():
    """Doge's ``load_balancing_loss_func(gate_logits, num_experts, num_keys, top_k, attention_mask)``
    (product-key routing) has a ``num_keys`` argument the other modules lack: the collected loss
    must still be the CausalLM forward's ``aux_loss``."""
    model = _doge()
    ids, am = _batch()
    aux = moe_aux.RouterAux(model)
    assert aux.enabled
    with aux.collect() as col:
        sequence_logprobs(model, ids, am)
    torch.testing.assert_close(col.loss(), _own_aux(model, ids, am), rtol=1e-5, atol=0)


def test_doge_two_forwards_count_as_one_batch():
    """Two recorded forwards (DPO's / KTO's micro-batch in two parts) give the loss of all their
    tokens together. Doge's router logits are ``[2, B·T, K]`` per layer (tokens on dim -2; its
    ``view`` mixes the tokens of a batch, so only the same batch twice has a loss known in
    advance: the batch's own) and its loss function reads the mask as ``[B, T]``."""
    model = _doge()
    ids, am = _batch()
    aux = moe_aux.RouterAux(model)
    with aux.collect() as col:
        sequence_logprobs(model, ids, am)
        sequence_logprobs(model, ids, am)
    assert len(col.parts) == 2
    torch.testing.assert_close(col.loss(), _own_aux(model, ids, am), rtol=1e-5, atol=0)


def _granite_hybrid(num_local_experts: int = 0, seed: int = 0):
    """A 2-layer hidden-32 GraniteMoeHybrid with attention layers; ``num_local_experts`` 0: the
    dense Granite 4.0 (micro / h-micro / h-1b) whose config still declares output_router_logits."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    cfg = GraniteMoeHybridConfig(vocab_size=64, hidden_size=32, intermediate_size=48, shared_intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 num_local_experts=num_local_experts, num_experts_per_tok=2, max_position_embeddings=64,
                                 layer_types=["attention"] * 2, mamba_n_heads=2, mamba_d_head=32)
    torch.manual_seed(seed)
    return GraniteMoeHybridForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [lambda: _doge(is_moe=False), _granite_hybrid], ids=["doge", "granite_hybrid"])
def test_dense_model_with_router_config_is_not_a_mixture_of_experts(build):
    """Doge's and GraniteMoeHybrid's configs always declare ``output_router_logits`` (and coef
    0.001), but with ``is_moe: false`` (every released Doge) or ``num_local_experts: 0`` (the dense
    Granite 4.0 models) there is no router and no load-balancing loss: the term is off (no
    TypeError at the trainer's start or its first forward), and a non-zero coefficient is refused
    naming the key, as for any dense model."""
    model = build()
    ids, am = _batch()
    aux = moe_aux.RouterAux(model)
    assert not aux.enabled
    with aux.collect() as col:
        sequence_logprobs(model, ids, am)
    assert col is None
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        moe_aux.RouterAux(model, 0.01)


# ----------------------------------------------------------------------------- lm_head


def _bert_family(name: str):
    """A tiny causal LM whose output embedding (a Linear) follows a prediction transform (dense,
    activation, LayerNorm) in the model's forward: BERT-style ``cls.predictions`` / RoBERTa's
    ``lm_head`` module around the decoder, Electra's ``generator_predictions``, ModernBERT
    decoder's ``lm_head`` before its ``decoder``."""
    import transformers as T

    cls, model = {"roberta": ("Roberta", "RobertaForCausalLM"), "bert": ("Bert", "BertLMHeadModel"),
                  "electra": ("Electra", "ElectraForCausalLM"),
                  "modernbert_decoder": ("ModernBertDecoder", "ModernBertDecoderForCausalLM")}[name]
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=64, pad_token_id=0, is_decoder=True)
    kw.update(embedding_size=32) if name == "electra" else kw.update(bos_token_id=1, eos_token_id=2)
    if name == "modernbert_decoder":
        kw.update(cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    return getattr(T, model)(getattr(T, cls + "Config")(**kw)).eval()


@pytest.mark.filterwarnings("ignore:rlhf_fast. falling back to full logits:RuntimeWarning")
@pytest.mark.parametrize("name", ["roberta", "bert", "electra", "modernbert_decoder"])
def test_head_behind_a_prediction_transform_gives_the_models_own_logprobs(name):
    """AutoModelForCausalLM models whose forward runs a transform (dense, GELU, LayerNorm) between
    the backbone's last state and the output embedding: the log-probs must be those of the
    model's own logits (max |diff| was 0.16-0.29 nats, every token wrong, silently)."""
    from rlhf_fast.models.logprobs import unfusable_reason

    model = _bert_family(name)
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    ours = sequence_logprobs(model, ids, am)
    logits = model(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).logits
    want = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * am[:, 1:] * am[:, :-1]
    torch.testing.assert_close(ours[:, 1:], want, rtol=1e-5, atol=1e-5)
    assert unfusable_reason(model) is not None
    # distillation, which computes the heads itself, refuses it rather than skipping the transform
    from rlhf_fast.trainers.distill import _head

    with pytest.raises(ValueError, match="teacher_model"):
        _head(model, "teacher_model")


# ----------------------------------------------------------------------------- shared_values


@pytest.mark.parametrize("which", ["input_ids", "attention_mask", "response_mask"])
def test_shared_critic_values_names_a_misshaped_argument(which):
    """``shared_critic_values(critic, input_ids [B, T], attention_mask [B, T], response_mask
    [B, T], groups)``: an argument of another shape is a ValueError naming it and the shape
    expected, not torch's "size of tensor a (14) must match ..." from deep inside the packing."""
    from rlhf_fast.models.loading import ValueModel
    from rlhf_fast.models.shared_values import shared_critic_values
    from rlhf_fast.models.tiny import tiny_causal_lm

    vm = ValueModel(tiny_causal_lm(64, hidden_size=32, num_layers=1, num_heads=2))
    ids = torch.randint(3, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    ids[1, :5] = ids[0, :5]
    ids[3, :5] = ids[2, :5]
    am = torch.ones_like(ids, dtype=torch.bool)
    rm = torch.zeros_like(am)
    rm[:, 5:] = True
    args = {"input_ids": ids, "attention_mask": am, "response_mask": rm}
    args[which] = args[which][0] if which == "input_ids" else args[which][:, :-1]
    with pytest.raises(ValueError, match=which):
        shared_critic_values(vm, args["input_ids"], args["attention_mask"], args["response_mask"],
                             torch.arange(4).view(2, 2))


# ----------------------------------------------------------------------------- the value head


def test_value_head_of_an_opt_with_a_projection_out_of_the_trunk():
    """OPT-350m projects its last hidden state from hidden_size (1024) to word_embed_proj_dim (512)
    before the LM head; TRL's ValueHead is sized by ``word_embed_proj_dim`` for that reason. A
    critic from such a policy gives ``[B, T]`` values, and one from such a reward model (its
    ``score`` reads the projected state) gives the reward model's score at its last token."""
    import transformers as T

    from rlhf_fast.models.loading import ValueModel

    cfg = T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=2,
                      word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=1)
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    vm = ValueModel(T.OPTForCausalLM(cfg))
    assert vm(ids, am).shape == (2, 5)
    rm = T.OPTForSequenceClassification(T.OPTConfig(**{**cfg.to_dict(), "num_labels": 1})).eval()
    values = ValueModel(rm).eval()(ids, am)
    torch.testing.assert_close(values[:, -1], rm(input_ids=ids, attention_mask=am).logits[:, 0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the trainers' use


def test_wpo_full_logits_fallback_collects_the_router_logits():
    """DPO's WPO weights (``use_weighting``) of a head only the model's own forward computes (a
    config attribute of unknown effect; an FSDP2 root) run the model's full forward, as
    ``sequence_logprobs`` does there; an MoE policy's router logits must be collected from it,
    as from every other policy forward, so the loss holds TRL's coef × aux."""
    from tests.test_moe_aux_loss import mixtral

    from rlhf_fast.models.logprobs import _logits_head, unfusable_reason
    from rlhf_fast.trainers.dpo import wpo_token_logps

    model = mixtral(64)
    model.config.mup_width_scale = 2.0  # an attribute of unknown effect: only the model's logits are trusted
    assert unfusable_reason(model) is not None and _logits_head(model) is None
    ids, am = _batch(4)
    rm = torch.zeros_like(am)
    rm[:, 4:] = 1
    aux = moe_aux.RouterAux(model)
    with aux.collect() as col:
        wpo_token_logps(model, {"input_ids": ids, "attention_mask": am, "response_mask": rm})
    assert col.loss() is not None
    torch.testing.assert_close(col.loss(), _own_aux(model, ids, am), rtol=1e-6, atol=0)
