"""Reward combination: each source keeps its own log entry (per_source / dropped), even when
names repeat, and the source objects are not renamed."""

import pytest

from rlhf_fast.algorithms.rewards import CombinedReward, RewardSource


class Const(RewardSource):
    def __init__(self, v, name="a"):
        self.v, self.name = v, name

    def __call__(self, prompts, completions, ctx):
        return [self.v] * len(completions)


@pytest.mark.parametrize("make", [
    lambda: [Const(1.0), Const(2.0), Const(3.0, name="a_0")],  # a generated name already taken
    lambda: [Const(1.0), Const(2.0)],
])
def test_every_source_keeps_its_own_log_entry(make):
    srcs = make()
    out = CombinedReward(srcs)(["p"], ["c"])
    assert len(out.per_source) == len(srcs) and len(out.dropped) == len(srcs)
    assert sorted(float(v) for v in out.per_source.values()) == sorted(s.v for s in srcs)
    assert float(out.total) == pytest.approx(sum(s.v for s in srcs))


def test_a_shared_source_is_not_renamed():
    s = Const(1.0)
    r = CombinedReward([(s, 1.0), (s, 2.0)])
    out = r(["p"], ["c"])
    assert s.name == "a"  # the caller's object keeps its name
    assert sorted(out.per_source) == ["a_0", "a_1"]
    assert float(out.total) == pytest.approx(3.0)
    assert sorted(CombinedReward([s, Const(5.0, name="b")])(["p"], ["c"]).per_source) == ["a", "b"]
