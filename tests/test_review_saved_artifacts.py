"""What the trainers leave in ``final/`` and whether plain transformers reads it as the run
left it (review: saved artifacts). Tiny models from configs, one or two steps."""

import json
import os

import pytest

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _base_without_pad(folder) -> str:
    """A tiny Llama folder whose tokenizer has no pad token (as Llama / Mistral checkpoints ship)
    and whose config has no pad_token_id."""
    from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(sample_texts(), 256)
    tok.pad_token = None
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3, pad_token_id=None,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def _ids(final):
    from transformers import AutoTokenizer

    with open(os.path.join(final, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(final, "generation_config.json")) as f:
        gen = json.load(f)
    return AutoTokenizer.from_pretrained(final).pad_token_id, cfg.get("pad_token_id"), gen.get("pad_token_id")


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_tokenizer_without_pad_saves_the_pad_in_the_model_configs_as_trl(tmp_path, kind):
    """TRL 1.16's SFTTrainer / DPOTrainer (and KTO's) give a tokenizer without a pad token its eos
    as pad and mirror that id onto the model's config and generation config, so ``final/``'s
    config.json and generation_config.json agree with its tokenizer. Ours set the tokenizer's
    pad alone: final/ had a pad token in the tokenizer and none in the model configs."""
    base = _base_without_pad(tmp_path / "base")
    out = str(tmp_path / "run")
    common = dict(model=base, output_dir=out, max_steps=1, batch_size=4, lr=1e-2, eval_every=0, max_len=48,
                  device="cpu")
    if kind == "sft":
        from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

        SFTTrainer(SFTConfig(**common), train_records=synthetic_sft_records(4), eval_records=[]).train()
    else:
        from rlhf_fast.trainers.reward import synthetic_preference_records
        from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer

        DPOTrainer(DPOConfig(**common), train_records=synthetic_preference_records(4, seed=1), eval_records=[]).train()
    tok_pad, cfg_pad, gen_pad = _ids(os.path.join(out, "final"))
    assert tok_pad is not None
    assert (cfg_pad, gen_pad) == (tok_pad, tok_pad)
