"""SDFT on two gloo ranks as one process: two steps (two optimizer steps per rollout, so the
importance weight applies; an evaluation of three prompts, split unevenly) log the same
metrics and end with the same policy and teacher weights under DDP (EMA teacher) and FSDP2
(EMA and base teachers, each sharded like the policy), and a sharded FSDP2 checkpoint of the EMA
run resumes on one process as if it had never stopped. This file is also the ranks' worker."""

import json
import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.torchrun_launch import launch, main  # noqa: E402

EVAL = [{"prompt": "b", "privileged_context": "a b"}, {"prompt": "q: a", "privileged_context": "c"},
        {"prompt": "1", "privileged_context": "0 0"}]
# (2-rank spec, the 1-process spec it must match); a spec is strategy:teacher:steps[:resume]
PAIRS = [("ddp:ema:2", "none:ema:2"), ("fsdp2:ema:2", "none:ema:2"), ("fsdp2:base:2", "none:base:2")]
RESUME = ("none:ema:3:fsdp2_ema_2", "none:ema:3")  # one process continues the FSDP2 run's folder
UNTIMED = ("time/", "step_time", "tokens_per", "memory/", "perf/")


def _run(spec: str, root: str):
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.rl_config import OptimConfig, PPOConfig, RLConfig, RolloutConfig, SDFTConfig
    from rlhf_fast.trainers.sdft import SDFTTrainer
    from tests.test_rl_learning import make_policy
    from tests.test_sdft import PROMPTS

    strategy, kind, steps, *resume = spec.split(":")
    name = resume[0] if resume else f"{strategy}_{kind}_{steps}"
    sdft = SDFTConfig(teacher_model_kind=kind, distillation_topk=7,
                      **({"teacher_update_rate": 0.5} if kind == "ema" else {}))
    pol, tok = make_policy()
    cfg = RLConfig(estimator="sdft", steps=int(steps), seed=0, output_dir=os.path.join(root, name), progress=False,
                   sample_every=0, report_to="none", eval_every=2, resume=os.path.join(root, name) if resume else None,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=5, temperature=0.9,
                                         per_sample_seeds=True),
                   ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=1), optim=OptimConfig(lr=1e-2),
                   sdft=sdft, distributed=DistributedConfig(strategy=strategy))
    tr = SDFTTrainer(cfg, pol, tok, prompts=PROMPTS, eval_prompts=EVAL)
    tr.train()
    return tr, cfg.output_dir


def _full(model, tr):
    from rlhf_fast.distributed import full_state_dict, unwrap

    sd = full_state_dict(model, tr.ctx, tr.config.distributed.strategy)
    sd = unwrap(model).state_dict() if sd is None else sd
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def worker(specs, root, out):
    results = {}
    for spec in specs:
        tr, folder = _run(spec, root)
        policy, teacher = _full(tr.policy, tr), _full(tr.self_teacher.model, tr)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in tr.self_teacher.model.parameters()]
        frac = sum(p.numel() for p in local) / sum(p.numel() for p in tr.self_teacher.model.parameters())
        if tr.ctx.is_main:
            torch.save({"policy": policy, "teacher": teacher}, os.path.join(root, spec.replace(":", "_") + ".pt"))
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                results[spec] = {"log": [json.loads(ln) for ln in f], "world": tr.ctx.world_size,
                                 "teacher_local_fraction": frac, "syncs": tr.self_teacher.optimizer_steps}
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sdft_dist"))
    two = launch(__file__, root, 2, [p[0] for p in PAIRS])
    one = launch(__file__, root, 1, sorted({p[1] for p in PAIRS}) + list(RESUME))
    assert all(r["world"] == 2 for r in two.values()) and all(r["world"] == 1 for r in one.values())
    return {"root": root, **two, **one}


def _rows(log):
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in log]


def _weights(runs, spec):
    return torch.load(os.path.join(runs["root"], spec.replace(":", "_") + ".pt"))


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in b:  # (AdamW's normalised step magnifies rounding of near-zero gradients: 2e-4 on an AMD EPYC)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("pair", PAIRS, ids=[p[0] for p in PAIRS])
def test_two_ranks_match_one_process(runs, pair):
    two, one = runs[pair[0]], runs[pair[1]]
    a, b = _rows(two["log"]), _rows(one["log"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    assert a[0].keys() == b[0].keys() and "eval/loss" in a[1]
    for ra, rb in zip(a, b):
        for k in rb:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
    assert b[0]["loss"] != b[1]["loss"]
    assert two["syncs"] == one["syncs"] == 8  # 2 steps x 2 epochs x 2 mini-batches
    wa, wb = _weights(runs, pair[0]), _weights(runs, pair[1])
    _assert_close(wa["policy"], wb["policy"])
    _assert_close(wa["teacher"], wb["teacher"])
    from tests.test_rl_learning import make_policy

    initial = make_policy()[0].state_dict()
    moved = any(not torch.equal(wb["teacher"][k], initial[k]) for k in initial)
    assert moved == (pair[1].split(":")[1] == "ema")
    frac = two["teacher_local_fraction"]  # rank 0's share of the teacher's weights
    assert (0.4 < frac < 0.6) if pair[0].startswith("fsdp2") else frac == 1.0, frac


def test_fsdp2_ema_checkpoint_resumes_on_one_process(runs):
    resumed, straight = runs[RESUME[0]], runs[RESUME[1]]
    a, b = _rows(resumed["log"]), _rows(straight["log"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in rb:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
    assert resumed["syncs"] == straight["syncs"] == 12
    wa, wb = _weights(runs, RESUME[0]), _weights(runs, RESUME[1])
    _assert_close(wa["policy"], wb["policy"])
    _assert_close(wa["teacher"], wb["teacher"])


if __name__ == "__main__":
    main(worker)
