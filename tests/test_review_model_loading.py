"""Review of how the commands load models and tokenizers (rlhf_fast/models/loading.py and the
trainers' loading paths), against TRL 1.16 / transformers 5.

* activation checkpointing in eval mode (the RL policy and critic train in eval mode) must also
  hold on transformers' own forward (GPT-2, flash attention, MoE: models off our Llama forward);
* an RL ``model.reference`` / ``model.critic`` folder must share the policy's vocabulary (DPO's
  ``ref_model`` and ``rlhf-fast eval --reference`` already refuse another one);
* ``model.tokenizer`` with a ``tiny:`` policy must not be silently ignored;
* chat prompts with a tokenizer that has no chat template are refused (RL, DPO / KTO / TPO), as
  TRL's ``apply_chat_template`` and SFT here refuse them;
* docs rows about the pad token and ``low_cpu_mem_usage`` must say what the loaders do.
"""

import os
import pathlib

import pytest
import torch

from rlhf_fast.models import loading
from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_per_module")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _saved_numel(model, ids, mask):
    """Elements autograd saves for the backward of ``sequence_logprobs(model, ids, mask)``, and
    the gradients that backward gives."""
    from rlhf_fast.models.logprobs import sequence_logprobs

    n = [0]

    def pack(t):
        n[0] += t.numel()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = sequence_logprobs(model, ids, mask)
    lp.sum().backward()
    return n[0], [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_eval_mode_checkpointing_on_transformers_forward():
    """A GPT-2 policy (transformers' forward, not ours) in eval mode, as RL trains it: with
    activation checkpointing on, the layers must be checkpointed (far less saved for the
    backward) with the same gradients, and no dropout (resid_pdrop 0.5 stays off in eval)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=2, n_positions=64,
                                  resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5, bos_token_id=0, eos_token_id=1)
    plain = transformers.GPT2LMHeadModel(cfg).eval()
    ckpt = transformers.GPT2LMHeadModel(cfg)
    ckpt.load_state_dict(plain.state_dict())
    loading.enable_activation_checkpointing(ckpt)
    ckpt.eval()
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones_like(ids)
    n_plain, g_plain = _saved_numel(plain, ids, mask)
    n_ckpt, g_ckpt = _saved_numel(ckpt, ids, mask)
    assert n_ckpt < n_plain / 4, (n_ckpt, n_plain)
    assert len(g_plain) == len(g_ckpt) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_ckpt))
    assert all(not m.training for m in ckpt.modules())  # put back as it was
    # the critic (a ValueModel of the policy's backbone, also run in eval mode)
    n = []
    for policy in (plain, ckpt):
        critic, saved = loading.ValueModel(policy).eval(), [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.__setitem__(0, saved[0] + t.numel()) or t,
                                                      lambda t: t):
            v = critic(ids, mask)
        v.sum().backward()
        n.append(saved[0])
    assert n[1] < n[0] / 4, n


# ----------------------------------------------------------------------------- RL folders' vocabulary


def _save(folder, extra_rows=0, reward=False):
    """A 1-layer llama (``extra_rows`` more embedding rows than its tokenizer has tokens) and its
    tokenizer saved to ``folder``."""
    tok = train_tokenizer(sample_texts(64), 300)
    build = tiny_reward_model if reward else tiny_causal_lm
    model = build(len(tok) + extra_rows, hidden_size=32, num_layers=1, num_heads=2, seed=1,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return {"policy": _save(d / "policy"), "wide": _save(d / "wide", extra_rows=64),
            "wide_rm": _save(d / "wide_rm", extra_rows=64, reward=True)}


def _rl_config(tmp_path, estimator, model):
    from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig
    from tests.test_rl_learning import make_config

    return make_config(tmp_path, estimator, steps=1, model=model,
                       rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                       ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))


def test_rl_reference_folder_with_another_vocabulary_is_refused(tmp_path, folders):
    """The KL sums log-probs of the policy's token ids under the reference: over another
    vocabulary (364 rows vs 300) it means nothing; RL trained on with it (kl/seq 0.96)."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import ModelConfig
    from tests.test_rl_learning import PROMPTS, frac_a

    cfg = _rl_config(tmp_path, "grpo", ModelConfig(policy=folders["policy"], reference=folders["wide"]))
    with pytest.raises(ValueError, match="model.reference.*vocabulary"):
        RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS)


def test_rl_critic_folder_with_another_vocabulary_is_refused(tmp_path, folders):
    """A critic reads the policy's token ids: a reward-model folder of another vocabulary gave
    values of other tokens' embeddings, silently."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import ModelConfig
    from tests.test_rl_learning import PROMPTS, frac_a

    cfg = _rl_config(tmp_path, "gae", ModelConfig(policy=folders["policy"], critic=folders["wide_rm"]))
    with pytest.raises(ValueError, match="model.critic.*vocabulary"):
        RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS)


def test_model_tokenizer_with_a_tiny_policy_is_refused(folders):
    """``model.tokenizer`` only reaches a policy folder's loading: with ``tiny:`` it was dropped
    (the run trained the tiny 96-token tokenizer, not the 300-token folder it named)."""
    from rlhf_fast.trainers.rl_config import ModelConfig

    with pytest.raises(ValueError, match="model.tokenizer"):
        ModelConfig(policy="tiny:llama", tokenizer=folders["policy"])
    ModelConfig(policy=folders["policy"], tokenizer=folders["policy"])  # a folder policy takes it


# ----------------------------------------------------------------------------- docs


def _row(path, key, contains):
    for line in (ROOT / path).read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| `{key}` |") and contains in line:
            return line
    raise AssertionError(f"no {key} row containing {contains!r} in {path}")


def test_sft_pad_token_row_says_what_loading_does(tmp_path):
    """SFT's ``model`` folder whose tokenizer has no pad token gets its eos as pad (as TRL);
    docs/from_trl.md's SFT row said "we don't set pad to eos as TRL does"."""
    from rlhf_fast.trainers.common import load_causal_lm

    tok = train_tokenizer(sample_texts(64), 300)
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, eos_token_id=tok.eos_token_id)
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_causal_lm(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token
    row = _row("docs/from_trl.md", "pad_token", "as TRL). Unset")
    assert "don't set pad to eos" not in row


def test_low_cpu_mem_usage_docs_say_transformers_5_ignores_it():
    """``model_init_kwargs.low_cpu_mem_usage`` is accepted (TRL passes it on) but transformers 5
    drops it unread; README said the key "sets" it."""
    import inspect

    import transformers
    from transformers.modeling_utils import PreTrainedModel

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 still reads low_cpu_mem_usage")
    assert '"low_cpu_mem_usage"' in inspect.getsource(PreTrainedModel.from_pretrained)  # in its list of unused names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`low_cpu_mem_usage` (accepted; transformers 5 ignores it)" in readme
    assert "`low_cpu_mem_usage` (accepted; transformers 5 ignores it)" in _row("docs/from_trl.md", "model_init_kwargs",
                                                                            "as TRL; `attn_implementation`")


def test_rl_chat_prompts_without_a_chat_template_are_refused(tmp_path, folders):
    """Chat prompts with a policy folder whose tokenizer has no chat template: TRL's
    ``apply_chat_template`` fails, SFT here refuses the same data; RL rendered "role: content"
    lines of its own and trained on them silently."""
    from transformers import AutoTokenizer

    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import ModelConfig
    from tests.test_rl_learning import frac_a

    folder = tmp_path / "no_template"
    tok = AutoTokenizer.from_pretrained(folders["policy"])
    tok.chat_template = None
    tok.save_pretrained(folder)
    for name in os.listdir(folders["policy"]):
        if not (folder / name).exists() and "chat_template" not in name:
            (folder / name).write_bytes((pathlib.Path(folders["policy"]) / name).read_bytes())
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    cfg = _rl_config(tmp_path, "grpo", ModelConfig(policy=str(folder)))
    with pytest.raises(ValueError, match="no chat template"):
        RLTrainer(cfg, reward_fns=[frac_a], prompts=[[{"role": "user", "content": "q:"}]] * 2)


def test_preference_chat_prompt_without_a_chat_template_is_refused():
    """DPO / KTO / TPO encode a chat prompt with the tokenizer's template; without one they
    encoded "user: ...\\nassistant: " lines of their own (TRL's apply_chat_template fails)."""
    from rlhf_fast.trainers.dpo import encode_texts

    tok = train_tokenizer(sample_texts(64), 300)
    chat = [{"role": "user", "content": "q:"}]
    encode_texts(tok, chat, ["a"])  # with its template
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_texts(tok, chat, ["a"])
    encode_texts(tok, "q:", ["a"])  # text prompts need none
