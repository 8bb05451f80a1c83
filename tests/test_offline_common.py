"""The helpers the offline trainers (SFT, reward, DPO, KTO) share: record loading and the eval
split, annotator weights, each rank's share of a batch, eval mode, DDP's gradient sync across
micro-batches, the weighted step loss and the CLI entry points."""

import types

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord
from rlhf_fast.trainers.common import (annotator_weight_map, load_split_records, record_weight, split_records,
                                       trainer_commands)
from rlhf_fast.trainers.dpo import weighted_share
from rlhf_fast.trainers.sft import accumulation_context, eval_mode, local_share


def _cfg(**kw):
    base = dict(data=None, eval_data=None, eval_fraction=0.25, seed=3)
    return types.SimpleNamespace(**{**base, **kw})


def test_load_split_records_holds_out_the_eval_fraction_of_the_synthetic_records():
    recs = list(range(8))
    train, ev = load_split_records(_cfg(), lambda path: pytest.fail("nothing to load"), lambda: recs)
    assert (train, ev) == split_records(recs, 0.25, 3)
    assert len(ev) == 2 and sorted(train + ev) == recs


def test_load_split_records_loads_data_and_eval_data_and_refuses_an_empty_file(tmp_path):
    rows = {"a.jsonl": [1, 2, 3], "b.jsonl": [9], "empty.jsonl": []}
    files = {}
    for name, records in rows.items():  # (the paths must name files; the stand-in loader reads none)
        (tmp_path / name).write_text("")
        files[str(tmp_path / name)] = records
    a, b, empty = (str(tmp_path / n) for n in rows)
    train, ev = load_split_records(_cfg(data=a, eval_data=b), files.__getitem__, lambda: [0])
    assert (train, ev) == ([1, 2, 3], [9])
    with pytest.raises(ValueError, match="eval_data .*empty.jsonl holds no records"):
        load_split_records(_cfg(data=a, eval_data=empty), files.__getitem__, lambda: [0])
    with pytest.raises(FileNotFoundError, match="data .*missing.jsonl: no such file"):
        load_split_records(_cfg(data=str(tmp_path / "missing.jsonl")), files.__getitem__, lambda: [0])


def test_load_split_records_keeps_records_passed_in():
    def never():
        raise AssertionError("records passed in: nothing is loaded or made")

    assert load_split_records(_cfg(data="x"), never, never, [1, 2], None) == ([1, 2], None)
    train, ev = load_split_records(_cfg(), never, lambda: [1, 2, 3, 4], None, [7])
    assert (train, ev) == ([1, 2, 3, 4], [7])  # eval records given: no split


def test_annotator_weights_configured_ones_win_over_agreement():
    # a, b and d agree on both items, c disagrees with them: agreement gives c less weight
    pairs = [PairRecord("p1", "x", "y", annotator=n) for n in "abd"] + [PairRecord("p1", "y", "x", annotator="c")]
    pairs += [PairRecord("p2", "u", "v", annotator=n) for n in "abd"] + [PairRecord("p2", "v", "u", annotator="c")]
    auto = annotator_weight_map({}, pairs)
    assert auto["c"] < auto["a"]
    mixed = annotator_weight_map({"c": 2.0}, pairs)
    assert mixed["c"] == 2.0 and mixed["a"] == auto["a"]
    assert annotator_weight_map({"c": 2.0}) == {"c": 2.0}
    assert [record_weight(mixed, a) for a in ("c", "zz", None)] == [2.0, 1.0, 1.0]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_local_share_splits_a_batch_into_contiguous_shares(world):
    items = ["i%d" % i for i in range(10)]
    idx = [7, 2, 5]
    shares = [local_share(idx, items, types.SimpleNamespace(rank=r, world_size=world)) for r in range(world)]
    assert [it for share, real in shares if real for it in share] == ["i7", "i2", "i5"]
    # fewer items than ranks: the extra ranks get one item that does not count
    assert all(share == ["i7"] for share, real in shares if not real)
    assert sum(not real for _, real in shares) == max(0, world - len(idx))


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_even_after_an_error(training):
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    model.train(training)
    with eval_mode(model) as m:
        assert m is model and not model.training
    assert model.training is training
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training is training


def test_accumulation_context_syncs_ddp_gradients_on_the_last_micro_batch_only(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
        for i, want in ((0, False), (1, False), (2, True)):
            with accumulation_context(ddp, i, 3):
                assert ddp.require_backward_grad_sync is want, i
        plain = torch.nn.Linear(2, 1)
        with accumulation_context(plain, 0, 3):  # not DDP: nothing to hold back
            pass
    finally:
        dist.destroy_process_group()


def test_weighted_share_sums_to_the_weighted_mean_and_trains_nothing_at_zero_weight():
    loss = torch.tensor([1.0, 2.0, 4.0, 8.0])
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    total = float(w.sum())
    parts = weighted_share(loss[:2], w[:2], total) + weighted_share(loss[2:], w[2:], total)
    assert float(parts) == pytest.approx(float((loss * w).sum() / w.sum()))
    assert float(weighted_share(loss, torch.zeros(4), 0.0)) == 0.0


def test_trainer_commands_are_the_cli_entry_points():
    from rlhf_fast.trainers import dpo, kto, reward, sft

    for mod, name in ((sft, "sft"), (reward, "reward"), (dpo, "dpo"), (kto, "kto")):
        assert callable(mod.add_arguments) and mod.run.__doc__ == f"Entry point of ``rlhf-fast {name}``."
    add_arguments, _ = trainer_commands("x", sft.SFTConfig, sft.SFTTrainer)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["none", "--max_steps", "3"])
    assert args.config == "none" and args.overrides == ["--max_steps", "3"] and "max_steps" in parser.epilog


@pytest.mark.parametrize("trainer,kind", [("reward", "scores"), ("reward", "rankings"), ("dpo", "rankings"),
                                          ("kto", "scores")])
def test_no_data_of_a_kind_the_synthetic_task_lacks_is_refused_before_a_model_loads(tmp_path, trainer, kind):
    import importlib

    mod = importlib.import_module(f"rlhf_fast.trainers.{trainer}")
    cfg_cls, trainer_cls = ((mod.RewardConfig, mod.RewardTrainer) if trainer == "reward" else
                            (getattr(mod, trainer.upper() + "Config"), getattr(mod, trainer.upper() + "Trainer")))
    cfg = cfg_cls(data_kind=kind, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=f"data must be set for data_kind='{kind}' \\(the synthetic task has pairs only\\)"):
        trainer_cls(cfg)
