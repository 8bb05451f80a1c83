"""Two gloo ranks against one process (this file is also their worker), second DDP review:

- DPO / KTO on a tiny Mixtral with the load-balancing term on, each micro-batch one row, so one
  rank's share of every micro-batch is blank: the term's gradient (grad_norm, with coef 1 the
  term dominates) and the logged ``aux_loss`` equal one process's on the same rows (DDP's
  average over ranks used to halve the term of a step whose shares were partly blank);
- PRMTrainer.evaluate shards the eval batches over the ranks (each rank its share; the shares'
  item counts sum to the eval set) and gives one process's metrics."""

import os
import sys

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _moe_run(spec: str, root: str) -> dict:
    """``dpo_moe`` / ``kto_moe``: one step of 2 one-row micro-batches of DPO / KTO on a tiny
    Mixtral, coef 1; its loss, grad_norm and aux_loss."""
    import copy

    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from tests.test_moe_aux_loss import mixtral
    from tests.test_reward import preference_tokenizer

    kind, strategy = spec.split(":")
    tok = preference_tokenizer()
    model = mixtral(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config, trainer = (DPOConfig, DPOTrainer) if kind == "dpo_moe" else (KTOConfig, KTOTrainer)
    cfg = config(model="tiny", output_dir=os.path.join(root, spec.replace(":", "_")), batch_size=1, grad_accum=2,
                 max_steps=1, eval_every=0, max_len=40, device="cpu", router_aux_loss_coef=1.0,
                 distributed=DistributedConfig(strategy=strategy))
    tr = trainer(cfg, model=copy.deepcopy(model), tokenizer=tok, train_records=synthetic_preference_records(4, seed=5),
                 eval_records=[])
    m = tr.train_step()
    return {k: m[k] for k in ("loss", "grad_norm", "aux_loss")}


def _prm_eval(spec: str, root: str) -> dict:
    """``prm_eval``: a tiny PRM's evaluate over 7 eval records in batches of 2 (the last one row:
    a blank share on the second rank); its metrics and the items each rank's shares held."""
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer
    from rlhf_fast.trainers import prm
    from rlhf_fast.trainers.prm import PRMConfig, PRMTrainer, synthetic_stepwise_records

    recs = synthetic_stepwise_records(11, seed=9)
    tok = train_tokenizer(sample_texts(16) + [r.prompt + "\n" + "\n".join(r.completions) for r in recs], 300,
                          padding_side="right")
    cfg = PRMConfig(model=TINY, output_dir=os.path.join(root, spec.replace(":", "_")), batch_size=2, max_steps=1,
                    eval_every=0, max_len=48, distributed=DistributedConfig(strategy=spec.split(":")[1]))
    tr = PRMTrainer(cfg, train_records=recs[:4], eval_records=recs[4:], tokenizer=tok)
    seen: list = []
    share = prm.local_share

    def counting(idx, items, ctx):
        out = share(idx, items, ctx)
        seen.append(len(out[0]) if out[1] else 0)
        return out

    prm.local_share = counting
    try:
        m = tr.evaluate()
    finally:
        prm.local_share = share
    return {"metrics": m, "items": tr.ctx.all_gather_objects(sum(seen)), "total": len(tr.eval_items)}


def _worker(specs, root, out):
    return {spec: (_prm_eval if spec.startswith("prm") else _moe_run)(spec, root) for spec in specs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file: one two-rank launch, one one-process launch (start-ups are slow)."""
    from tests.torchrun_launch import launch

    root = str(tmp_path_factory.mktemp("ddp_sync2"))
    two = launch(__file__, root, 2, ["dpo_moe:ddp", "kto_moe:ddp", "prm_eval:ddp"])
    one = launch(__file__, root, 1, ["dpo_moe:none", "kto_moe:none", "prm_eval:none"])
    return two, one


@pytest.mark.parametrize("kind", ["dpo_moe", "kto_moe"])
def test_moe_term_with_blank_shares_matches_one_process(runs, kind):
    two, one = runs[0][kind + ":ddp"], runs[1][kind + ":none"]
    for k in ("aux_loss", "loss", "grad_norm"):
        assert two[k] == pytest.approx(one[k], rel=1e-4), k


def test_prm_evaluate_shards_over_ranks_with_one_process_metrics(runs):
    two, one = runs[0]["prm_eval:ddp"], runs[1]["prm_eval:none"]
    assert two["total"] == one["total"] == 7
    assert one["items"] == [7]
    assert len(two["items"]) == 2 and sum(two["items"]) == 7 and max(two["items"]) < 7  # each rank its share
    assert two["metrics"].keys() == one["metrics"].keys()
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-5), k


if __name__ == "__main__":
    from tests.torchrun_launch import main

    main(_worker)
