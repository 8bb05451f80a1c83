"""TRL's ``model_init_kwargs``: the ``from_pretrained`` keywords of models loaded from folders.

The keywords reach the policy of SFT / DPO / GRPO (and DPO's ``ref_model``, the RL reference and
critic folders) and a ``tiny:`` model once built; ``dtype`` resolves as TRL's
``create_model_from_path`` does (called here on the same folder); the CLI form
``--model_init_kwargs.dtype bfloat16`` parses; every refusal names its key; a run's config.yaml
holds the mapping and a resumed run loads the same way; the default still trains float32 master
weights whatever dtype the folder was saved in."""

import os

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.models import loading
from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig
from rlhf_fast.trainers.reward import RewardConfig, synthetic_preference_records
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import ModelConfig, PPOConfig, RLConfig, RolloutConfig
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_rl_learning import PROMPTS, frac_a, make_config

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
BF16 = {"dtype": "bfloat16"}


def _save_tiny(folder, dtype=torch.float32):
    """A 1-layer llama and its tokenizer saved to ``folder`` (weights in ``dtype``)."""
    texts = sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)]
    tok = train_tokenizer(texts, 300, padding_side="right")
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=1, dtype=dtype,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("m") / "fp32")


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("m") / "bf16", torch.bfloat16)


def _dtypes(model):
    return {p.dtype for p in model.parameters()}


def _offline(cls, tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=2, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0,
                log_every=1, max_len=48, device="cpu")
    base.update(kw)
    return cls(**base)


# ----------------------------------------------------------------------------- dtype as TRL resolves it


@pytest.mark.parametrize("saved", ["fp32", "bf16"])
@pytest.mark.parametrize("kw", [{}, {"dtype": "bfloat16"}, {"dtype": "float32"}, {"dtype": "auto"}, {"dtype": None},
                                {"torch_dtype": "bfloat16"}, {"dtype": "bfloat16", "attn_implementation": "eager"}])
def test_load_matches_trl_create_model_from_path(folder, bf16_folder, saved, kw):
    from trl.trainer.utils import create_model_from_path

    path = folder if saved == "fp32" else bf16_folder
    # TRL has no torch_dtype alias: its create_model_from_path gets the new name
    trl_kw = {("dtype" if k == "torch_dtype" else k): v for k, v in kw.items()}
    theirs = create_model_from_path(path, **trl_kw)
    ours = loading.load_policy(path, init_kwargs=loading.check_model_init_kwargs(kw))
    assert ours.dtype == theirs.dtype and _dtypes(ours) == _dtypes(theirs)
    assert ours.config._attn_implementation == theirs.config._attn_implementation
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    if "dtype" in kw and kw["dtype"] in ("auto", None):  # the saved dtype (None: transformers 5's default, auto)
        expected = torch.float32 if saved == "fp32" else torch.bfloat16
    else:  # float32 unless asked for bfloat16, whatever was saved
        expected = torch.bfloat16 if "bfloat16" in kw.values() else torch.float32
    assert ours.dtype == expected


def test_check_normalises_and_is_idempotent():
    kw = loading.check_model_init_kwargs({"torch_dtype": torch.bfloat16, "attn_implementation": "sdpa",
                                          "trust_remote_code": False, "low_cpu_mem_usage": True, "device_map": None})
    assert kw == {"dtype": "bfloat16", "attn_implementation": "sdpa", "trust_remote_code": False,
                  "low_cpu_mem_usage": True}
    assert loading.check_model_init_kwargs(kw) == kw
    assert loading.from_pretrained_kwargs(kw)["dtype"] is torch.bfloat16
    assert loading.from_pretrained_kwargs({})["dtype"] is torch.float32  # the default: float32 master weights


def test_load_policy_in_memory_and_dtype_twice(folder):
    model = loading.load_policy(tiny_causal_lm(64, hidden_size=32, num_layers=1, num_heads=2),
                                init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    assert _dtypes(model) == {torch.bfloat16} and model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="both given"):
        loading.load_policy(folder, dtype=torch.bfloat16, init_kwargs=BF16)
    with pytest.raises(ValueError, match=r"init_kwargs\.revision"):
        loading.load_policy(folder, init_kwargs={"revision": "main"})


# ----------------------------------------------------------------------------- refusals name the key


REFUSED = [
    ({"revision": "main"}, r"\.revision: a revision names a commit"),
    ({"quantization_config": {"load_in_4bit": True}}, r"\.quantization_config: quantized loading \(QLoRA\)"),
    ({"device_map": "auto"}, r"\.device_map must be null"),
    ({"dtype": "float16"}, r"\.dtype: float16 weights are not supported .*set fp16: true"),
    ({"torch_dtype": torch.float16}, r"\.torch_dtype: float16 weights are not supported"),
    ({"dtype": "float64"}, r"\.dtype must be one of \['auto', 'float32', 'bfloat16'\]"),
    ({"dtype": "bfloat16", "torch_dtype": "bfloat16"}, r": dtype and torch_dtype are both set"),
    ({"attn_implementation": "kernels-community/flash-attn"}, r"\.attn_implementation must be one of"),
    ({"attn_implementation": "flash_attention_2"}, r"\.attn_implementation 'flash_attention_2' needs the flash-attn"),
    ({"trust_remote_code": "maybe"}, r"\.trust_remote_code must be true or false"),
    ({"low_cpu_mem_usage": 1}, r"\.low_cpu_mem_usage must be true or false"),
    ({"use_cache": False}, r"\.use_cache: not a supported from_pretrained keyword \(valid: dtype, torch_dtype, "
                           r"attn_implementation, trust_remote_code, low_cpu_mem_usage, device_map\)"),
]


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, DPOConfig, KTOConfig, ModelConfig])
@pytest.mark.parametrize("kw,match", REFUSED)
def test_every_refusal_names_the_key(monkeypatch, cls, kw, match):
    import transformers.utils

    # flash-attn absent whatever this machine has
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    key = "model.model_init_kwargs" if cls is ModelConfig else "model_init_kwargs"
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + match):
        cls(model_init_kwargs=kw)
    with pytest.raises(ValueError, match="model_init_kwargs must be a mapping"):
        cls(model_init_kwargs=["dtype", "bfloat16"])


# ----------------------------------------------------------------------------- trainers


def test_sft_folder_bf16_eager_trains_in_bf16_and_resumes(tmp_path, folder):
    kw = {"dtype": "bfloat16", "attn_implementation": "eager"}
    recs = synthetic_sft_records(16)
    cfg = _offline(SFTConfig, tmp_path, "sft", model=folder, model_init_kwargs=kw, save_every=1)
    tr = SFTTrainer(cfg, train_records=recs, eval_records=[])
    assert _dtypes(tr.model) == {torch.bfloat16} and tr.model.config._attn_implementation == "eager"
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in tr.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    # the run's config.yaml holds the mapping; a run resumed from it loads the same way
    saved = load_config(SFTConfig, os.path.join(cfg.output_dir, "config.yaml"), ["--max_steps", "3"])
    assert saved.model_init_kwargs == kw
    resumed = SFTTrainer(saved, train_records=recs, eval_records=[])
    resumed._maybe_resume()  # (what train() does first)
    assert resumed.step == 2 and _dtypes(resumed.model) == {torch.bfloat16}
    assert resumed.model.config._attn_implementation == "eager"
    for a, b in zip(tr.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    resumed.train()
    assert resumed.step == 3


def test_default_keeps_float32_master_weights(tmp_path, bf16_folder):
    """Unchanged default: a bf16 folder trains in float32 (as before model_init_kwargs existed)."""
    cfg = _offline(SFTConfig, tmp_path, "sft", model=bf16_folder, max_steps=1)
    assert cfg.model_init_kwargs == {}
    tr = SFTTrainer(cfg, train_records=synthetic_sft_records(8), eval_records=[])
    assert _dtypes(tr.model) == {torch.float32} and tr.model.config._attn_implementation == "sdpa"
    # while auto keeps the saved dtype
    cfg = _offline(SFTConfig, tmp_path, "auto", model=bf16_folder, max_steps=1, model_init_kwargs={"dtype": "auto"})
    assert _dtypes(SFTTrainer(cfg, train_records=synthetic_sft_records(8), eval_records=[]).model) == {torch.bfloat16}


def test_tiny_spec_is_cast_after_building(tmp_path):
    cfg = _offline(SFTConfig, tmp_path, "tiny", model=TINY, max_steps=1,
                   model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    tr = SFTTrainer(cfg, train_records=synthetic_sft_records(8), eval_records=[])
    assert _dtypes(tr.model) == {torch.bfloat16} and tr.model.config._attn_implementation == "eager"
    # RoPE frequencies stay float32, as from_pretrained(dtype=bfloat16) leaves them
    assert tr.model.model.rotary_emb.inv_freq.dtype == torch.float32
    tr.train()


def test_dpo_policy_and_ref_model_folder_load_alike(tmp_path, folder):
    cfg = _offline(DPOConfig, tmp_path, "dpo", model=folder, ref_model=folder,
                   model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    tr = DPOTrainer(cfg, train_records=synthetic_preference_records(16, seed=1), eval_records=[])
    for m in (tr.model, tr.reference):
        assert _dtypes(m) == {torch.bfloat16} and loading.unwrap(m).config._attn_implementation == "eager"
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_reward_and_kto_load_alike(tmp_path, folder):
    from rlhf_fast.trainers.kto import KTOTrainer
    from rlhf_fast.trainers.reward import RewardTrainer

    recs = synthetic_preference_records(16, seed=1)
    kw = {"dtype": "bfloat16", "attn_implementation": "eager"}
    rm = RewardTrainer(_offline(RewardConfig, tmp_path, "rm", model=folder, max_steps=1, model_init_kwargs=kw),
                       train_records=recs, eval_records=[])
    kto = KTOTrainer(_offline(KTOConfig, tmp_path, "kto", model=folder, ref_model=folder, max_steps=1,
                              model_init_kwargs=kw), train_records=recs, eval_records=[])
    for m in (rm.model, kto.model, kto.reference):
        assert _dtypes(m) == {torch.bfloat16} and loading.unwrap(m).config._attn_implementation == "eager"
    rm.train()
    kto.train()


def _rl_config(tmp_path, estimator, model):
    return make_config(tmp_path, estimator, steps=2, model=model,
                       rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                       ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))


def test_grpo_policy_and_reference_folders(tmp_path, folder):
    kw = {"dtype": "bfloat16", "attn_implementation": "eager"}
    cfg = _rl_config(tmp_path, "grpo", ModelConfig(policy=folder, reference=folder, model_init_kwargs=kw))
    tr = RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS)
    for m in (tr.policy, tr.reference):
        assert _dtypes(m) == {torch.bfloat16} and m.config._attn_implementation == "eager"
    before = [p.detach().clone() for p in tr.policy.parameters()]
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))
    saved = load_config(RLConfig, os.path.join(cfg.output_dir, "config.yaml"))
    assert saved.model.model_init_kwargs == kw


def test_ppo_critic_folder_and_tiny_policy(tmp_path, folder):
    critic = str(tmp_path / "critic")
    loading.ValueModel(loading.load_policy(folder)).save_pretrained(critic)
    cfg = _rl_config(tmp_path / "a", "gae", ModelConfig(policy=folder, critic=critic, model_init_kwargs=BF16))
    tr = RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS)
    assert _dtypes(tr.critic.backbone) == {torch.bfloat16} and tr.critic.value_head.weight.dtype == torch.float32
    # a tiny policy is cast once built; the reference and the critic copied from it follow it
    cfg = _rl_config(tmp_path / "b", "gae", ModelConfig(model_init_kwargs={"dtype": "bfloat16",
                                                                           "attn_implementation": "eager"}))
    tr = RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS)
    assert _dtypes(tr.policy) == _dtypes(tr.reference) == _dtypes(tr.critic.backbone) == {torch.bfloat16}
    assert tr.policy.config._attn_implementation == "eager"
    tr.train()


# ----------------------------------------------------------------------------- the command line


def test_cli_form(tmp_path, folder, capsys):
    cfg = load_config(RLConfig, None, ["--model.model_init_kwargs.dtype", "bfloat16",
                                       "--model.model_init_kwargs.trust_remote_code", "false"])
    assert cfg.model.model_init_kwargs == {"dtype": "bfloat16", "trust_remote_code": False}
    cfg = load_config(DPOConfig, None, ["--model_init_kwargs", "{torch_dtype: auto, attn_implementation: eager}"])
    assert cfg.model_init_kwargs == {"dtype": "auto", "attn_implementation": "eager"}

    data = tmp_path / "sft.jsonl"
    data.write_text("".join('{"prompt": "say %s", "completion": "%s"}\n' % (w, w) for w in ["yes", "no", "cat", "dog"]))
    conf = tmp_path / "sft.yaml"
    conf.write_text(f"model: {folder}\ndata: {data}\nmax_steps: 1\nbatch_size: 2\neval_fraction: 0.25\ndevice: cpu\n")
    out = tmp_path / "out"
    assert cli.main(["sft", str(conf), "--output_dir", str(out), "--model_init_kwargs.dtype", "bfloat16"]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype="auto").dtype == torch.bfloat16
    capsys.readouterr()
    assert cli.main(["sft", str(conf), "--output_dir", str(tmp_path / "x"), "--model_init_kwargs.revision", "v1"]) == 2
    assert "model_init_kwargs.revision" in capsys.readouterr().err
