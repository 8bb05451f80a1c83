"""Gradient synchronisation across the micro-batches of an optimizer step (review of the DDP /
FSDP2 accumulation paths): every trainer holds back the gradient reduction (DDP ``no_sync``,
FSDP2 ``set_requires_gradient_sync(False)``) for all but the last micro-batch of a step, as
transformers / accelerate do, so a step of M micro-batches reduces its gradients once, not M
times. Counted in one process: a one-rank gloo group, the trainer's model wrapped in DDP with a
comm hook that records each reduced bucket (``GradBucket.is_last`` marks the end of a reduced
backward), or a ``fully_shard`` model whose parameter groups say whether they reduce.
On two gloo ranks (this file is also their worker): the MoE ``aux_loss`` that DPO / KTO log is
the mean over every rank's micro-batches (TRL's ``gather_for_metrics(aux_loss).mean()``), not
rank 0's alone; PRM and reward steps with the reduction held back (DDP, FSDP2; an epoch's short
last step whose single row leaves one rank a blank share) give one process's losses, gradient
norms and weights, with one DDP reduction a step."""

import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rlhf_fast.trainers.reward import synthetic_preference_records  # noqa: E402

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group (DDP and fully_shard need one), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _count_reductions(trainer) -> list:
    """Wrap ``trainer.model`` in DDP (the optimizer keeps the same parameters) with a comm hook
    that passes each bucket through unchanged and appends ``bucket.is_last()``: the list's True
    entries count the backward passes whose gradients were all-reduced."""
    seen: list = []

    def hook(state, bucket):
        seen.append(bucket.is_last())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp = torch.nn.parallel.DistributedDataParallel(trainer.model)
    ddp.register_comm_hook(None, hook)
    trainer.model = ddp
    return seen


def _reduced_steps(trainer, seen: list, steps: int) -> list:
    """The all-reduced backward passes of each of ``steps`` train steps."""
    out = []
    for _ in range(steps):
        n = len(seen)
        trainer.train_step()
        out.append(sum(seen[n:]))
    return out


def test_prm_train_step_reduces_gradients_once_per_optimizer_step(tmp_path, one_rank_group):
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer
    from rlhf_fast.trainers.prm import PRMConfig, PRMTrainer, synthetic_stepwise_records

    recs = synthetic_stepwise_records(10, seed=9)
    tok = train_tokenizer(sample_texts(16) + [r.prompt + "\n" + "\n".join(r.completions) for r in recs], 300,
                          padding_side="right")
    cfg = PRMConfig(model=TINY, output_dir=str(tmp_path / "prm"), batch_size=2, grad_accum=3, max_steps=2,
                    eval_every=0, max_len=48)
    tr = PRMTrainer(cfg, train_records=recs, eval_records=[], tokenizer=tok)
    seen = _count_reductions(tr)
    # 10 rows in batches of 2, 3 a step: 3 micro-batches, then the epoch's last 2; one reduction each
    assert _reduced_steps(tr, seen, 2) == [1, 1]


def test_reward_train_step_reduces_gradients_once_per_optimizer_step(tmp_path, one_rank_group):
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer
    from tests.test_reward import preference_tokenizer

    cfg = RewardConfig(model=TINY, output_dir=str(tmp_path / "rm"), batch_size=2, grad_accum=3, max_steps=2,
                       eval_every=0, max_len=48)
    tr = RewardTrainer(cfg, train_records=synthetic_preference_records(10, seed=1), eval_records=[],
                       tokenizer=preference_tokenizer())
    seen = _count_reductions(tr)
    assert _reduced_steps(tr, seen, 2) == [1, 1]


def _fsdp_reduces(model) -> list:
    """Whether each FSDP2 parameter group of ``model`` reduce-scatters at its next backward."""
    from rlhf_fast.distributed import fsdp_units

    return [g.reduce_grads for u in fsdp_units(model) for g in u._get_fsdp_state()._fsdp_param_groups]


def test_accumulation_context_defers_fsdp2_gradient_sync_to_the_last_micro_batch(one_rank_group):
    """As under DDP (and as accelerate's ``no_sync`` for FSDP2, RL's ``_no_sync``): SFT, DPO, KTO,
    reward and PRM steps reduce-scatter once, after the last micro-batch; the sync is back on after
    the context, and after an error inside it."""
    from torch.distributed.fsdp import fully_shard

    from rlhf_fast.trainers.sft import accumulation_context

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    fully_shard(model[0])
    fully_shard(model)
    assert all(_fsdp_reduces(model))
    for i, want in ((0, False), (1, False), (2, True)):
        with accumulation_context(model, i, 3):
            assert set(_fsdp_reduces(model)) == {want}, i
            model(torch.randn(2, 4)).sum().backward()
        assert all(_fsdp_reduces(model)), i
    with pytest.raises(RuntimeError):
        with accumulation_context(model, 0, 2):
            raise RuntimeError("boom")
    assert all(_fsdp_reduces(model))


# ------------------------------------------------------------------ two gloo ranks (this file is their worker)


def _moe_run(spec: str, root: str) -> dict:
    """``dpo_moe`` / ``kto_moe``: one step (2 micro-batches) of DPO / KTO on a tiny Mixtral with
    the load-balancing term on; the aux values each rank's micro-batches gave, and the logged
    ``aux_loss``."""
    import copy

    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from tests.test_moe_aux_loss import mixtral
    from tests.test_reward import preference_tokenizer

    kind, strategy = spec.split(":")
    tok = preference_tokenizer()
    model = mixtral(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config, trainer = (DPOConfig, DPOTrainer) if kind == "dpo_moe" else (KTOConfig, KTOTrainer)
    cfg = config(model="tiny", output_dir=os.path.join(root, spec.replace(":", "_")), batch_size=4, grad_accum=2,
                 max_steps=1, eval_every=0, max_len=40, device="cpu", distributed=DistributedConfig(strategy=strategy))
    tr = trainer(cfg, model=copy.deepcopy(model), tokenizer=tok, train_records=synthetic_preference_records(8, seed=5),
                 eval_records=[])
    vals: list = []
    add = tr.moe.add_metrics
    tr.moe.add_metrics = lambda m, v, *a, **kw: (vals.extend(v), add(m, v, *a, **kw))[1]
    m = tr.train_step()
    return {"aux_loss": m["aux_loss"], "vals": tr.ctx.all_gather_objects(vals)}


def _two_rank_run(spec: str, root: str) -> dict:
    """``kind:strategy``: 3 steps of the PRM or reward trainer on 9 rows in batches of 2, 2 a step
    (steps of 2 + 2, 2 + 2 and the epoch's last row alone: one rank's share of it is a blank row
    that counts for nothing), a 2-layer model (FSDP2 shards each block)."""
    from rlhf_fast.distributed import DistributedConfig, full_state_dict, unwrap
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer
    from rlhf_fast.trainers.prm import PRMConfig, PRMTrainer, synthetic_stepwise_records
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer
    from tests.test_reward import preference_tokenizer

    kind, strategy = spec.split(":")
    kw = dict(model=TINY.replace("num_layers=1", "num_layers=2"), output_dir=os.path.join(root, spec.replace(":", "_")),
              batch_size=2, grad_accum=2, max_steps=3, eval_every=0, max_len=48, lr=1e-2,
              distributed=DistributedConfig(strategy=strategy))
    if kind == "prm":
        recs = synthetic_stepwise_records(9, seed=9)
        tok = train_tokenizer(sample_texts(16) + [r.prompt + "\n" + "\n".join(r.completions) for r in recs], 300,
                              padding_side="right")
        tr = PRMTrainer(PRMConfig(**kw), train_records=recs, eval_records=[], tokenizer=tok)
    else:
        tr = RewardTrainer(RewardConfig(**kw), train_records=synthetic_preference_records(9, seed=1), eval_records=[],
                           tokenizer=preference_tokenizer())
    seen: list = []
    if isinstance(tr.model, torch.nn.parallel.DistributedDataParallel):  # count the reductions, then do them
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            seen.append(bucket.is_last())
            return allreduce_hook(state, bucket)

        tr.model.register_comm_hook(None, hook)
    metrics = [tr.train_step() for _ in range(3)]
    sd = full_state_dict(tr.model, tr.ctx, strategy)  # (a collective under FSDP2)
    if sd is None:
        sd = unwrap(tr.model).state_dict()
    path = os.path.join(root, spec.replace(":", "_") + ".pt")
    if tr.ctx.is_main:
        torch.save({k: v.detach().float().cpu() for k, v in sd.items()}, path)
    return {"world": tr.ctx.world_size, "weights": path, "reductions": sum(seen),
            "metrics": [{k: m[k] for k in ("loss", "grad_norm")} for m in metrics]}


def _worker(specs, root, out):
    return {spec: (_moe_run if "moe" in spec else _two_rank_run)(spec, root) for spec in specs}


ACCUMULATION_SPECS = ["prm:ddp", "prm:fsdp2", "reward:fsdp2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every two-rank run of this file, in one launch (start-ups are slow)."""
    from tests.torchrun_launch import launch

    return launch(__file__, str(tmp_path_factory.mktemp("ddp_sync")), 2,
                  ["dpo_moe:ddp", "kto_moe:ddp"] + ACCUMULATION_SPECS)


@pytest.mark.parametrize("spec", ["dpo_moe:ddp", "kto_moe:ddp"])
def test_dpo_and_kto_log_the_aux_loss_of_every_rank(two_ranks, spec):
    run = two_ranks[spec]
    per_rank = run["vals"]
    assert len(per_rank) == 2 and all(len(v) == 2 for v in per_rank)  # 2 micro-batches on each rank
    everyone = [a for v in per_rank for a in v]
    rank0 = sum(per_rank[0]) / 2
    assert abs(rank0 - sum(everyone) / 4) > 1e-5  # (the ranks' values differ: the test can tell)
    assert run["aux_loss"] == pytest.approx(sum(everyone) / 4, rel=1e-7)


def test_prm_and_reward_accumulate_on_two_ranks_as_one_process(two_ranks, tmp_path):
    """With the reduction held back for every micro-batch but the last (DDP and FSDP2), two ranks
    give one process's losses, gradient norms and weights; under DDP one reduction per step."""
    from tests.torchrun_launch import launch

    two = two_ranks
    one = launch(__file__, str(tmp_path), 1, ["prm:none", "reward:none"])
    assert two["prm:ddp"]["reductions"] == 3  # (3 steps)
    for spec in ACCUMULATION_SPECS:
        a, b = two[spec], one[spec.split(":")[0] + ":none"]
        assert (a["world"], b["world"]) == (2, 1)
        for k in ("loss", "grad_norm"):
            assert [m[k] for m in a["metrics"]] == pytest.approx([m[k] for m in b["metrics"]], rel=1e-4), (spec, k)
        wa, wb = torch.load(a["weights"]), torch.load(b["weights"])
        assert wa.keys() == wb.keys()
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=f"{spec} {k}")


if __name__ == "__main__":
    from tests.torchrun_launch import main

    main(_worker)
