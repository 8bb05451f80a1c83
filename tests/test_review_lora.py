"""LoRA / peft review: a saved adapter folder (what a LoRA SFT / DPO / RL run leaves in final/)
used as a trainer's model, a policy or a reference; the reference of a policy whose adapter is
already trained (TRL 1.16 keeps a frozen copy of it, the "ref" adapter, so the reference is the
initial policy, not the base); an adapter trained over resized embeddings reloading; bad
``lora`` fields refused at the config, naming the field; a cloned chat template's new tokens
trainable as outputs (lm_head in modules_to_save, as TRL); a causal adapter folder starting a
reward model."""

import os

import pytest
import torch

pytest.importorskip("peft")

from tests.test_sft_tokenizer_overrides import _sft, source_folder, tok  # noqa: F401,E402  (fixtures)

pytestmark = [pytest.mark.usefixtures("one_thread_per_module"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),  # peft's deprecated transformers calls
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(base, adapter)``: a tiny Llama + tokenizer folder, and a LoRA adapter folder on it
    (random, non-zero A and B: a trained adapter) with the tokenizer beside it, as final/ of a
    LoRA SFT run."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import save_tiny_model

    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_model(root / "base")
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))
    adapter = str(root / "adapter")
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    return base, adapter


def _adapted(base, adapter):
    """The model the adapter folder stands for (base + adapter), frozen."""
    import peft
    from transformers import AutoModelForCausalLM

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


IDS = torch.tensor([[5, 9, 17, 23, 40, 41, 60, 7]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _logps(model, ids=IDS):
    from rlhf_fast.models import sequence_logprobs

    with torch.no_grad():
        return sequence_logprobs(model, ids, torch.ones_like(ids), response_mask=torch.ones_like(ids))


def test_an_adapter_folder_as_a_trainers_model_trains_its_adapter(folders, tmp_path):
    # SFT / DPO / KTO load `model` through load_causal_lm: an adapter folder came back as
    # transformers' inference-mode adapter, every weight frozen (the first step: "element 0 of
    # tensors does not require grad"), and with `lora` the fresh adapter took the loaded one's
    # name and replaced it (training silently started from the base)
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    base, adapter = folders
    kw = dict(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, max_len=32, warmup_steps=0,
              eval_every=0, device="cpu")
    tr = SFTTrainer(SFTConfig(model=adapter, **kw), train_records=synthetic_sft_records(8), eval_records=[])
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:4]
    torch.testing.assert_close(_logits(tr.model.eval()), _logits(_adapted(base, adapter)))
    with pytest.raises(ValueError, match="adapter"):  # TRL refuses a peft model together with a peft_config
        SFTTrainer(SFTConfig(model=adapter, lora={"r": 2}, **{**kw, "output_dir": str(tmp_path / "run2")}),
                   train_records=synthetic_sft_records(8), eval_records=[])


def test_the_reference_of_a_trained_adapter_is_the_initial_policy(folders, tmp_path):
    # `rlhf-fast grpo --model.policy SFT_LORA_RUN/final`: the reference was the policy with its
    # adapter disabled, the base before SFT (KL > 0 at step 0); TRL 1.16 keeps a frozen copy of
    # the adapter ("ref") so the reference is the initial policy
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, ModelConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, frac_a

    base, adapter = folders
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(tmp_path / "run"), progress=False, device="cpu",
                   model=ModelConfig(policy=adapter), kl=KLConfig(coef=0.1),
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=3),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    tr = RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS)
    initial = _logps(_adapted(base, adapter))
    trainable = {n for n, p in tr.policy.named_parameters() if p.requires_grad}
    torch.testing.assert_close(_logps(tr.reference), initial)
    torch.testing.assert_close(_logps(tr.policy), initial)
    assert {n for n, p in tr.policy.named_parameters() if p.requires_grad} == trainable  # nothing flipped
    tr.train()
    with torch.no_grad():  # the policy's adapter moves (as an update would); the reference does not
        for n, p in tr.policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    assert not torch.allclose(_logps(tr.policy), initial)
    torch.testing.assert_close(_logps(tr.reference), initial)
    # final/ holds the policy's adapter alone (no sub-folder for the reference's copy) and loads back
    final = os.path.join(tr.run_dir.path, "final", "policy")
    assert not [f for f in os.listdir(final) if os.path.isdir(os.path.join(final, f))], os.listdir(final)


def test_a_reference_folder_holding_an_adapter_is_that_model(folders, tmp_path):
    # DPO's ref_model / RL's model.reference naming an adapter folder (a LoRA SFT run's final/):
    # DPO refused it ("device/dtype must be None for a peft policy"), RL scored the base (the
    # adapter disabled) instead of the model the folder holds
    import types

    from rlhf_fast.trainers.dpo import offline_reference
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, ModelConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, frac_a

    base, adapter = folders
    want = _logps(_adapted(base, adapter))
    from rlhf_fast.models.loading import load_policy

    policy = load_policy(base)
    cfg = types.SimpleNamespace(ref_model=adapter, model_init_kwargs={}, precompute_ref_logps=False)
    torch.testing.assert_close(_logps(offline_reference(cfg, policy, False, torch.device("cpu"))), want)
    rl = RLConfig(estimator="grpo", steps=1, output_dir=str(tmp_path / "run"), progress=False, device="cpu",
                  model=ModelConfig(policy=base, reference=adapter), kl=KLConfig(coef=0.1),
                  rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=3),
                  ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    reference = RLTrainer(rl, reward_fns=[frac_a], prompts=PROMPTS).reference
    torch.testing.assert_close(_logps(reference), want)
    # a separate plain model, as any reference folder (distributed.offload_reference can move it)
    assert isinstance(reference, torch.nn.Module)
    assert not any("lora_" in n for n, _ in reference.named_parameters())


def test_an_adapter_over_resized_embeddings_reloads_to_the_same_logits(folders, tmp_path):
    # a LoRA run with chat_template_path adds tokens (embeddings resized, the new rows trained
    # through trainable_token_indices); peft saves the resized embeddings in the adapter, but
    # load_policy put them on the base's smaller table: IndexError at the first new token
    import peft
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models.loading import load_policy

    base, _ = folders
    model = AutoModelForCausalLM.from_pretrained(base)
    n = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(n + 14, mean_resizing=False)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                           trainable_token_indices=list(range(n, n + 14)))
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_()
    folder = str(tmp_path / "adapter")
    model.save_pretrained(folder)
    ids = torch.tensor([[5, 9, n + 3, 23, n + 13, 41]])
    torch.testing.assert_close(_logits(load_policy(folder).eval(), ids), _logits(model.eval(), ids))


@pytest.mark.parametrize("lora, key", [({"rank": 4}, "lora.rank"), ({"r": 0}, "lora.r"),
                                       ({"lora_dropout": 1.5}, "lora.lora_dropout"),
                                       ({"lora_alpha": "abc"}, "lora.lora_alpha")])
def test_bad_lora_fields_are_refused_at_the_config_naming_the_field(lora, key):
    # peft's own errors came at the model load (after minutes on a real model), some without
    # the key ("unsupported operand type(s) for /: 'str' and 'int'", "dropout probability has
    # to be between 0 and 1"); the RL configs' field is model.lora
    from rlhf_fast.trainers.rl_config import ModelConfig
    from rlhf_fast.trainers.sft import SFTConfig

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        SFTConfig(lora=lora)
    with pytest.raises(ValueError, match="model." + key.replace(".", r"\.")):
        ModelConfig(lora=lora)


def test_lora_with_a_cloned_template_trains_the_new_tokens_output_rows(tmp_path, tok, source_folder):
    # TRL 1.16's SFTTrainer, when a cloned chat template added tokens, warns and appends "lm_head"
    # to the LoraConfig's modules_to_save, so the new eos (<|im_end|>) can be learnt as an output;
    # we only warned, and its lm_head row stayed at its resized initial value
    from rlhf_fast.feedback.formats import ChatRecord
    from tests.test_sft_chat import chat_records

    recs = [ChatRecord(r.messages) for r in chat_records(8, seed=2)]
    with pytest.warns(UserWarning, match="modules_to_save"):
        tr = _sft(tmp_path, tok, recs, chat_template_path=source_folder, lora={"r": 4})
    assert "lm_head" in (tr.model.peft_config["default"].modules_to_save or [])
    im_end = tr.tokenizer.convert_tokens_to_ids("<|im_end|>")
    before = tr.model.get_output_embeddings().weight[im_end].detach().clone()
    tr.train_step()
    assert not torch.equal(before, tr.model.get_output_embeddings().weight[im_end].detach())



def test_an_sft_adapter_folder_starts_a_reward_model_from_the_adapted_backbone(folders, tmp_path):
    # `rlhf-fast reward --model SFT_LORA_RUN/final`: transformers loaded the causal adapter onto the
    # sequence classifier in inference mode (every weight frozen: nothing trains), and `lora` then
    # replaced that adapter with a fresh one (the reward model started from the base, not the SFT model)
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

    base, adapter = folders
    want = _adapted(base, adapter)
    for lora in (None, {"r": 2}):
        cfg = RewardConfig(model=adapter, output_dir=str(tmp_path / f"run{lora is None}"), max_steps=1,
                           batch_size=4, max_len=32, warmup_steps=0, eval_every=0, device="cpu", lora=lora)
        tr = RewardTrainer(cfg, train_records=synthetic_preference_records(8), eval_records=[])
        assert any(p.requires_grad for p in tr.model.parameters())
        with torch.no_grad():
            got = tr.model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
            ref = want(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got, ref)


def test_merge_of_an_adapter_folder_says_it_is_an_adapter(folders, tmp_path, capsys):
    # `rlhf-fast merge RUN/final BASE OUT` on a LoRA run: "has no config.json (not a
    # save_pretrained model folder)" did not say the folder holds an adapter, nor what to do
    from rlhf_fast import cli

    base, adapter = folders
    try:
        code = cli.main(["merge", adapter, base, str(tmp_path / "out")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "peft" in err and len(err.strip().splitlines()) == 1, err


def test_eval_loads_adapter_folders_as_the_models_they_hold(folders, tmp_path, monkeypatch):
    # rlhf-fast eval loaded --policy / --reference with AutoModelForCausalLM.from_pretrained: an
    # adapter saved over resized embeddings (a LoRA run with chat_template_path) failed with an
    # IndexError / size mismatch at load. Both are now base + adapter merged: the policy's logits
    # are the adapted model's.
    import json

    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast import cli
    from rlhf_fast.trainers import evaluate

    base, adapter = folders
    model = AutoModelForCausalLM.from_pretrained(base)
    n = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(n + 6, mean_resizing=False)
    torch.manual_seed(2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                       trainable_token_indices=list(range(n, n + 6))))
    resized = str(tmp_path / "resized")
    model.save_pretrained(resized)
    AutoTokenizer.from_pretrained(base).save_pretrained(resized)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\na dog\n")
    seen = {}
    real = evaluate.evaluate_policy

    def spy(policy, tokenizer, texts, reward, **kw):
        seen["policy"], seen["reference"] = policy, kw.get("reference")
        return real(policy, tokenizer, texts, reward, **kw)

    monkeypatch.setattr(evaluate, "evaluate_policy", spy)
    out, fn = tmp_path / "res.json", "rlhf_fast.algorithms.rule_rewards:ascending_digits"
    assert cli.main(["eval", "--policy", resized, "--prompts", str(prompts), "--reward-fn", fn,
                     "--max-new-tokens", "3", "--out", str(out)]) == 0
    ids = torch.tensor([[5, 9, n + 3, 23, n + 5]])
    torch.testing.assert_close(_logits(seen["policy"], ids), _logits(model.eval(), ids))
    assert cli.main(["eval", "--policy", base, "--reference", adapter, "--prompts", str(prompts), "--reward-fn", fn,
                     "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert "win_rate" in json.loads(out.read_text())
    torch.testing.assert_close(_logits(seen["reference"]), _logits(_adapted(base, adapter)))
