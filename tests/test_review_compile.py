"""Review of ``torch_compile`` (rlhf_fast.trainers.compile; 19f3cf7 offline, 0ba7c37 RL).

Bugs found, now fixed (each test failed before the fix):

- every compiled backbone of one transformers class shares one code object
  (``LlamaModel.forward``, through transformers' ``deprecation.wrapped_func``), so dynamo's cache
  entries for the policy, the reference and the critic all count against one
  ``torch._dynamo.config.recompile_limit`` (8). Each model / grad-mode / requires-grad context
  takes a static entry, then a dynamic one once the lengths change: PPO (gae) with a LoRA policy,
  or with a critic of another size than the policy, needs 10 and hits the limit at step 2; from
  then on the forwards without an entry ran eager, with only a log warning (the limit is now
  raised to ``compile.RECOMPILE_LIMIT``);
- ``RLConfig(torch_compile=True, distributed={...})`` from Python: AttributeError on the dict
  (without compile the dict is accepted, and the fp16 check reads a dict).

Behaviour verified right (plain tests): training after a rollout runs the compiled graphs and
generation runs none (the force_eager stance does not leak); over six steps with changing
lengths the graphs settle (no per-step recompile); a LoRA policy's adapter-disabled reference
through the shared compiled backbone gives the uncompiled KL; DPO with
``precompute_ref_logps``; a LoRA reward model's merged ``final/`` loads with plain transformers
and scores as the trainer's compiled model."""

import logging
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from rlhf_fast.models.logprobs import backbone
from rlhf_fast.trainers.compile import compiled
from rlhf_fast.trainers.rl_config import ModelConfig, RLConfig, RolloutConfig
from tests.test_rl_torch_compile import AOT, PROMPTS, _config, _policy, _trainer
from tests.test_torch_compile import COMMON, pref_tok  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# dynamo's cache entries (and so its recompile limit) do not depend on the backend: `eager`
# traces the same guards without aot_autograd's compile time
EAGER = {"torch_compile_backend": "eager"}
COUNTING = "rev2_counting"
RUNS = [0]  # executions of graphs compiled with the COUNTING backend


@torch._dynamo.register_backend(name=COUNTING)
def _counting_backend(gm, example_inputs):
    """The ``eager`` backend, counting each run of a compiled graph."""
    def run(*args):
        RUNS[0] += 1
        return gm.forward(*args)
    return run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def limit_hits():
    """The ``recompile_limit`` warnings dynamo logs (its only sign of falling back to eager)."""
    hits = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                hits.append(record.getMessage())

    handler = Catch()
    logging.getLogger("torch._dynamo").addHandler(handler)
    yield hits
    logging.getLogger("torch._dynamo").removeHandler(handler)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _stance() -> str:
    import torch._dynamo.eval_frame as eval_frame

    return eval_frame._stance.stance


# ------------------------------------------------------------------ bugs


def test_lora_ppo_stays_within_the_recompile_limit(tmp_path, limit_hits):
    tr = _trainer(tmp_path, "lora", EAGER, estimator="gae", model=ModelConfig(lora={"r": 4}),
                  rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=9))
    for _ in range(2):
        tr.step()
    assert not limit_hits, limit_hits[0]


def test_ppo_with_a_smaller_critic_stays_within_the_recompile_limit(tmp_path, limit_hits):
    from rlhf_fast.models.loading import ValueModel
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers.rl import RLTrainer
    from tests.test_rl_learning import frac_a

    pol, tok = _policy()
    small = tiny_causal_lm(len(tok), hidden_size=16, num_layers=1, num_heads=2, seed=1, pad_token_id=tok.pad_token_id)
    tr = RLTrainer(_config(tmp_path, "critic", "gae", EAGER, steps=2), pol, tok, reward_fns=[frac_a], prompts=PROMPTS,
                   critic=ValueModel(small))
    for _ in range(2):
        tr.step()
    assert not limit_hits, limit_hits[0]


def test_rl_config_with_a_distributed_dict_is_checked_by_name():
    RLConfig(distributed={"strategy": "ddp"})  # accepted without compile (and the fp16 check reads a dict)
    with pytest.raises(ValueError, match="fsdp2"):
        RLConfig(torch_compile=True, distributed={"strategy": "fsdp2"})


# ------------------------------------------------------------------ verified right


def test_training_runs_compiled_after_rollouts_and_generation_runs_eager(tmp_path, limit_hits):
    """force_eager covers generation only: each step's scoring / update forwards run compiled
    graphs, ``engine.generate`` runs none, the stance is back to default after either; over six
    steps of changing lengths the graphs settle after the dynamic recompile (GPT-2: its own
    backbone, policy and critic)."""
    from rlhf_fast.rollout import SamplingParams

    # GPT-2 decodes through its backbone's forward (Llama's decoder reads the weights itself, so
    # it would never reach the compiled forward, stance or not)
    tr = _trainer(tmp_path, "run", {"torch_compile_backend": COUNTING}, family="gpt2", estimator="gae", steps=6,
                  rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=9))
    assert compiled(backbone(tr.policy)) and compiled(tr.critic.backbone)
    graphs = []
    for _ in range(6):
        before = RUNS[0]
        tr.step()
        assert RUNS[0] > before and _stance() == "default"
        before = RUNS[0]
        tr.engine.generate(["q: a b", "x y z w v"], SamplingParams(n=2, max_new_tokens=4, seed=len(graphs)))
        assert RUNS[0] == before and _stance() == "default"
        graphs.append(_graphs())
    assert graphs[2:] == [graphs[1]] * 4, graphs  # no recompile once the lengths went dynamic
    assert not limit_hits


def test_lora_reference_through_the_shared_compiled_backbone(tmp_path):
    """A LoRA policy's reference is the same compiled backbone with the adapters disabled: with
    non-zero adapters, its KL equals the uncompiled one (the existing test has B = 0 at step 1,
    where the KL is 0 whichever weights the reference runs)."""
    from peft import PeftModel

    rows = []
    for kw in (None, AOT):
        tr = _trainer(tmp_path, f"lora{bool(kw)}", kw, model=ModelConfig(lora={"r": 4}))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in tr.policy.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        assert isinstance(tr.policy, PeftModel) and backbone(tr.reference) is backbone(tr.policy)
        rows.append(tr.step())
    assert _graphs() >= 1 and rows[0]["policy/kl"] > 1e-4
    for k in ("policy/kl", "policy/loss", "reward/total"):
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-4, abs=1e-7), k


def test_dpo_precomputed_reference_logps(tmp_path, pref_tok):
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records

    recs = synthetic_preference_records(12, seed=1)
    out = []
    for kw in ({}, {"torch_compile_backend": "aot_eager"}):
        cfg = DPOConfig(**{**COMMON, "max_len": 64}, output_dir=str(tmp_path / f"r{len(kw)}"), batch_size=6,
                        beta=0.3, precompute_ref_logps=True, **kw)
        tr = DPOTrainer(cfg, train_records=recs, eval_records=recs[:6], tokenizer=pref_tok)
        tr.train_step()
        out.append(tr.evaluate())  # the policy moved: rewards against the precomputed reference
    assert _graphs() >= 1 and out[0]["eval_rewards/chosen"] != 0
    for k in out[0]:
        assert out[1][k] == pytest.approx(out[0][k], rel=1e-4, abs=1e-6), k


def test_lora_reward_model_final_is_merged_and_loads_plain(tmp_path, pref_tok):
    from transformers import AutoModelForSequenceClassification

    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

    recs = synthetic_preference_records(16, seed=1)
    cfg = RewardConfig(**{**COMMON, "max_len": 64, "max_steps": 2}, output_dir=str(tmp_path / "rm"), batch_size=8,
                       lora={"r": 4}, torch_compile_backend="aot_eager")
    tr = RewardTrainer(cfg, train_records=recs, eval_records=[], tokenizer=pref_tok)
    tr.train()
    assert compiled(backbone(tr.model)) and _graphs() >= 1
    final = os.path.join(tmp_path, "rm", "final")
    assert not os.path.exists(os.path.join(final, "adapter_config.json"))
    plain = AutoModelForSequenceClassification.from_pretrained(final)
    ids = torch.randint(3, 40, (2, 9))
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, tr.model(input_ids=ids).logits)
