"""Tiny models and tokenizers built locally, for tests, examples and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the texts given, and
the models are randomly initialised from a config of the chosen Hugging Face family.
"""

from __future__ import annotations

from typing import Sequence

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2")

# A minimal chat template: "<role>: content\n" per message, and "assistant: " as the
# generation prompt, so apply_chat_template works with the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


_MAX_VOCAB = 1 << 24


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 256,
    *,
    special_tokens: Sequence[str] = ("<pad>", "<eos>", "<bos>", "<unk>"),
    padding_side: str = "left",
    add_bos: bool = False,
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a PreTrainedTokenizerFast.

    ``special_tokens`` are (pad, eos, bos, unk) in that order (ids 0..3 by default). When
    ``vocab_size`` leaves room for the whole 256-byte alphabet plus the specials, every
    byte is encodable; otherwise only bytes seen in ``texts`` are, the rest map to unk.
    The real vocabulary may be smaller than ``vocab_size``: size models with ``len(tok)``.
    ``padding_side`` is "left" (generation) or "right"; ``add_bos`` prepends bos on encode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    if len(texts) == 0:
        raise ValueError("texts must be non-empty")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not len(special_tokens) + 2 <= vocab_size <= _MAX_VOCAB:
        # (the tokenizers library aborts the process on a vocab_size past 2**31)
        raise ValueError(f"vocab_size must be an int in [{len(special_tokens) + 2}, {_MAX_VOCAB}], got {vocab_size!r}")
    special_tokens = tuple(special_tokens)
    if len(special_tokens) != 4 or len(set(special_tokens)) != 4:
        raise ValueError(f"special_tokens must be 4 distinct strings (pad, eos, bos, unk), got {special_tokens!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    pad, eos, bos, unk = special_tokens

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    full = vocab_size >= len(alphabet) + len(special_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet if full else [],
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk,
        padding_side=padding_side,
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def _config(vocab_size, family, hidden_size, num_layers, num_heads, max_position_embeddings,
            tie_word_embeddings, num_kv_heads, intermediate_size, pad_token_id, bos_token_id, eos_token_id,
            dtype=torch.float32):
    import transformers

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                 max_position_embeddings=max_position_embeddings)
    if num_kv_heads is not None:
        sizes["num_kv_heads"] = num_kv_heads
    if intermediate_size is not None:
        sizes["intermediate_size"] = intermediate_size
    for name, value in sizes.items():
        # zero layers would train an empty model that only learns embeddings; zero heads divide by zero
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv != 0:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({kv})")
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[family]
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=kv,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        # Qwen3 defaults head_dim to 128 whatever hidden_size is
        head_dim=hidden_size // num_heads, **ids,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    return cls(**kwargs)


def tiny_causal_lm(
    vocab_size: int,
    *,
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = 2,
    eos_token_id: int | None = 1,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised causal LM (AutoModelForCausalLM) of ``family`` from a config.

    ``family`` in ("llama", "qwen2", "qwen3", "mistral", "gpt2"). Special-token ids default to
    those of :func:`train_tokenizer` (pad 0, eos 1, bos 2). Deterministic for a given ``seed``.
    Returned in eval mode (no dropout), fp32 unless ``dtype`` says otherwise.
    """
    from transformers import AutoModelForCausalLM

    cfg = _config(vocab_size, family, hidden_size, num_layers, num_heads, max_position_embeddings,
                  tie_word_embeddings, num_kv_heads, intermediate_size, pad_token_id, bos_token_id, eos_token_id, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = bos_token_id
    from .loading import cast_model

    return cast_model(model, dtype).eval()


def tiny_reward_model(
    vocab_size: int,
    *,
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    pad_token_id: int = 0,
    bos_token_id: int | None = 2,
    eos_token_id: int | None = 1,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised AutoModelForSequenceClassification with ``num_labels=1``.

    ``pad_token_id`` is set on the config so the model finds each row's last real token
    (HF's scoring convention). Same families and defaults as :func:`tiny_causal_lm`.
    """
    from transformers import AutoModelForSequenceClassification

    if pad_token_id is None:
        raise ValueError("pad_token_id must be set for a reward model (it locates the last token)")
    cfg = _config(vocab_size, family, hidden_size, num_layers, num_heads, max_position_embeddings,
                  False, num_kv_heads, intermediate_size, pad_token_id, bos_token_id, eos_token_id, dtype)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg)
    from .loading import cast_model

    return cast_model(model, dtype).eval()


def sample_texts(n: int = 64, seed: int = 0) -> list:
    """A small deterministic English-like corpus for training tiny tokenizers in tests."""
    import random

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    words = ("the cat dog sat on mat a big small red blue runs jumps quickly slowly and or "
             "one two three four five six seven eight nine ten yes no hello world answer question "
             "is what why how user assistant: good bad").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(n)]


__all__ = ["train_tokenizer", "tiny_causal_lm", "tiny_reward_model", "sample_texts", "FAMILIES"]
