"""ppo.trpo with an MoE policy and ``ppo.router_aux_loss_coef`` on two gloo ranks (DDP): the
line-search surrogate's distributed path (``_trpo_step``'s all-gathered micro-batch count,
``_moe_surrogate_loss``'s aux term divided by the world size and summed by the all-reduce) gives
what one process gives on the same global batch: every surrogate the line search evaluates (loss
and KL), the accepted step fractions, the logged metrics and the weights after the update. The
mini-batches of 2 rows out of 8 leave a rank with none of some of them (checked), so the blank
micro-batches of a rank without rows are in it: there the term is divided by the micro-batches of
every rank over the world size (``RLTrainer._aux_steps``), in the gradient and the surrogate alike;
dividing by this rank's count weighed a rank without rows as one with aux 0 (the term halved on two
ranks). This file is also the two ranks' worker (tests/test_trpo_moe_aux.py checks the surrogate
itself on one process)."""

import json
import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.torchrun_launch import launch, main  # noqa: E402

COEF = 0.5  # large, so that the aux term moves the surrogate well beyond float rounding
KEYS = ("policy/loss", "policy/aux_loss", "policy/trpo_step_frac", "policy/approx_kl", "policy/clip_frac")


def _run(spec: str, out_dir: str):
    """One GRPO step of a tiny Mixtral under TRPO with the MoE term: 2 prompts × 4 answers (one
    prompt per rank on two), mini-batches of 2 rows, micro-batches of 1; records every call of
    ``_trpo_step`` (this rank's rows) and ``_surrogate`` (its loss and KL)."""
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.models.tiny import train_tokenizer
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import OptimConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_moe_aux_loss import mixtral
    from tests.test_rl_learning import TEXTS
    from tests.test_rl_prefix_sharing import PROMPTS
    from tests.test_rl_prefix_sharing_distributed import _reward

    tok = train_tokenizer(TEXTS, 48)
    pol = mixtral(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    # seed 1: the update's permutation puts both rows of two of the four mini-batches on one rank
    cfg = RLConfig(estimator="grpo", steps=1, seed=1, output_dir=out_dir, progress=False, sample_every=0,
                   report_to="none",
                   rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4, per_sample_seeds=True),
                   ppo=PPOConfig(epochs=1, mini_batch_size=2, micro_batch_size=1, router_aux_loss_coef=COEF,
                                 trpo=True, trpo_max_kl=0.05),
                   optim=OptimConfig(lr=2e-2), distributed=DistributedConfig(strategy=spec))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS[:2])
    assert tr.moe.enabled
    rows, surrogates = [], []
    step, surrogate = tr._trpo_step, tr._surrogate

    def recorded_step(data):
        rows.append(int(data.input_ids.shape[0]))
        return step(data)

    def recorded_surrogate(*a, **kw):
        out = surrogate(*a, **kw)
        surrogates.append(list(out))
        return out

    tr._trpo_step, tr._surrogate = recorded_step, recorded_surrogate
    tr.train()
    return tr, rows, surrogates


def worker(specs, root, out):
    results = {}
    for spec in specs:
        folder = os.path.join(root, spec)
        tr, rows, surrogates = _run(spec, folder)
        all_rows = tr.ctx.all_gather_objects(rows) if tr.ctx.distributed else [rows]
        if tr.ctx.is_main:
            model = getattr(tr.policy, "module", tr.policy)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(folder, "w.pt"))
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                results[spec] = {"log": [json.loads(ln) for ln in f], "world": tr.ctx.world_size, "rows": all_rows,
                                 "surrogates": surrogates, "weights": os.path.join(folder, "w.pt")}
    return results


def test_two_ranks_take_one_process_line_search(tmp_path):
    root = str(tmp_path)
    two = launch(__file__, root, 2, ["ddp"])["ddp"]
    one = launch(__file__, root, 1, ["none"])["none"]
    assert two["world"] == 2 and one["world"] == 1
    # the same mini-batches: 4 of 2 rows; on two ranks some rank holds none of one
    assert one["rows"] == [[2, 2, 2, 2]]
    per_step = list(zip(*two["rows"]))
    assert len(per_step) == 4 and all(sum(r) == 2 for r in per_step)
    assert any(0 in r for r in per_step), two["rows"]
    # every surrogate (loss, KL) of every line search, before the step and at each tried fraction
    assert len(two["surrogates"]) == len(one["surrogates"]) >= 8
    torch.testing.assert_close(torch.tensor(two["surrogates"]), torch.tensor(one["surrogates"]), rtol=1e-4,
                               atol=1e-6)
    for k in KEYS:
        a, b = [m[k] for m in two["log"] if k in m], [m[k] for m in one["log"] if k in m]
        assert len(a) == len(b) == 1 and a == pytest.approx(b, rel=1e-4, abs=1e-6), (k, a, b)
    m = one["log"][0]
    assert m["policy/aux_loss"] > 0 and 0 < m["policy/trpo_step_frac"] <= 1
    w2, w1 = torch.load(two["weights"]), torch.load(one["weights"])
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)


if __name__ == "__main__":
    main(worker)
