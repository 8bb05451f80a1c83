"""Review of the rollout API (SamplingParams, RolloutBatch helpers, HFRolloutEngine,
``rlhf-fast generate``, custom rollout functions): one test per defect found."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.rollout import SamplingParams, logprob_gap  # noqa: E402


@pytest.mark.parametrize("name", ["stop_token_ids", "stop_strings"])
def test_sampling_params_none_stops_mean_none_as_vllm(name):
    """vLLM's SamplingParams takes ``stop=None`` / ``stop_token_ids=None`` (no stop); here they
    raised ``TypeError: 'NoneType' object is not iterable``, naming nothing. None is now none."""
    p = SamplingParams(**{name: None})
    assert getattr(p, name) == ()
    # a value that is not a sequence at all is refused naming the argument
    with pytest.raises(TypeError, match=name):
        SamplingParams(**{name: 3.5})


def test_logprob_gap_ignores_values_outside_the_response_mask():
    """The gap is "over response tokens": a -inf / NaN log-prob at a masked position (a prompt
    or pad token scored under a top-k sampler's distribution, or left unset) must not reach
    it; ``d * mask`` made inf * 0 = NaN of both numbers."""
    beh = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    rec = torch.tensor([[float("-inf"), -1.5, -2.0, float("nan")]])
    mask = torch.tensor([[0, 1, 1, 0]])
    gap = logprob_gap(beh, rec, mask)
    assert float(gap["max"]) == pytest.approx(0.5)
    assert float(gap["mean"]) == pytest.approx(0.25)


def test_ignore_eos_must_be_a_bool():
    """``ignore_eos="false"`` (a config or CLI string) was stored as is and, being truthy,
    generated past every eos; a numpy bool (a value read from an array) is a bool."""
    import numpy as np

    with pytest.raises(TypeError, match="ignore_eos"):
        SamplingParams(ignore_eos="false")
    with pytest.raises(TypeError, match="ignore_eos"):
        SamplingParams(ignore_eos=None)
    p = SamplingParams(ignore_eos=np.bool_(True))
    assert p.ignore_eos is True


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(), 256)


def test_per_sample_seeds_draw_with_one_sampler_call_per_step(tok, monkeypatch):
    """SamplingParams' and RolloutConfig's docstrings said per-sample seeds make "one sampler
    call per live row and decode step"; the engine makes one batched inverse-CDF call per step
    (docs/distributed.md says so too)."""
    from rlhf_fast.models import tiny_causal_lm
    from rlhf_fast.rollout import HFRolloutEngine, hf_engine
    from rlhf_fast.trainers.rl_config import RolloutConfig

    calls = []
    for name in ("sample_with_uniforms", "sample_with_uniforms_unchecked"):
        real = getattr(hf_engine, name)
        monkeypatch.setattr(hf_engine, name, lambda *a, _real=real, **k: calls.append(a[0].shape[0]) or _real(*a, **k))
    engine = HFRolloutEngine(tiny_causal_lm(len(tok), seed=0), tok)
    b = engine.generate(["hello world", "one", "the cat"],
                        SamplingParams(max_new_tokens=5, n=2, ignore_eos=True, sample_seeds=range(6)))
    assert b.response_mask.sum(1).tolist() == [5] * 6
    assert calls == [6] * 5  # one call per step, every row in it
    for doc in (SamplingParams.__doc__, RolloutConfig.__doc__):
        assert "call per live row" not in " ".join(doc.split())


def test_rollout_func_numpy_rows_are_read_as_lists():
    """TRL builds its tensors with ``torch.tensor(ids)`` per row, so a rollout function may
    return numpy arrays (``tokenizer(..., return_tensors="np")``, vLLM outputs turned into
    arrays); they were refused ("got ndarray"). Read as lists, as tensors already are."""
    import numpy as np

    from rlhf_fast.rollout.custom_rollout import check_output

    as_lists = {"prompt_ids": [[1, 2, 3], [4, 5]], "completion_ids": [[6, 7], [8]],
                "logprobs": [[-0.5, -0.25], [-1.0]], "env_mask": [[1, 0], [1]]}
    rows = {k: [np.asarray(r, dtype=np.float32 if k == "logprobs" else np.int64) for r in v]
            for k, v in as_lists.items()}
    want = check_output(as_lists, 2, vocab_size=10)
    assert check_output(rows, 2, vocab_size=10) == want
    whole = {"prompt_ids": np.array([[1, 2], [3, 4]]), "completion_ids": np.array([[5], [6]]),
             "logprobs": np.array([[-0.5], [-1.0]])}
    assert check_output(whole, 2, vocab_size=10)[:3] == ([[1, 2], [3, 4]], [[5], [6]], [[-0.5], [-1.0]])
    # a float array of token ids is still refused, naming the key and row
    with pytest.raises(ValueError, match=r"completion_ids\[0\]"):
        check_output({**as_lists, "completion_ids": [np.array([6.0, 7.0]), [8]]}, 2, vocab_size=10)
