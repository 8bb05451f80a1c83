import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.models import sample_texts, sequence_logprobs, tiny_causal_lm, train_tokenizer  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, RolloutBatch, SamplingParams, logprob_gap  # noqa: E402

PROMPTS = ["hello world", "the cat sat on the", "one", "what is two and three"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(len(tok), seed=0)


def _hf_responses(model, tok, prompts, **gen_kwargs):
    """The oracle: transformers' own generate, responses cut after eos."""
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        seqs = model.generate(**enc, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **gen_kwargs)
    out = []
    for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
        out.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return out


def _responses(batch: RolloutBatch):
    return [r[m.bool()].tolist() for r, m in zip(batch.response_ids, batch.response_mask[:, batch.prompt_length:])]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_hf_generate(tok, family):
    model = tiny_causal_lm(len(tok), family=family, seed=1)
    engine = HFRolloutEngine(model, tok)
    batch = engine.greedy(PROMPTS, max_new_tokens=12)
    assert _responses(batch) == _hf_responses(model, tok, PROMPTS, do_sample=False, max_new_tokens=12)
    assert batch.input_ids.shape[0] == len(PROMPTS) and batch.tokens_per_second > 0


@pytest.fixture(scope="module")
def eos_model(tok, model):
    """The tiny model with an eos logit near the top for typical states, so some beams end on
    eos and others run to the length limit."""
    import copy

    from rlhf_fast.models import hidden_states

    m = copy.deepcopy(model)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hidden_states(m, enc["input_ids"], enc["attention_mask"])
        d = h[enc["attention_mask"].bool()].mean(0)
        m.lm_head.weight[tok.eos_token_id] = d / d.norm() ** 2 * 0.5  # eos logit ≈ 0.5 along the mean state
    return m


@pytest.mark.parametrize("num_beams,max_new,length_penalty,early_stopping",
                         [(3, 8, 1.0, False), (2, 10, 0.5, True), (4, 10, 2.0, "never"), (1, 5, 1.0, False)])
def test_beam_search_equals_hf_generate(tok, eos_model, num_beams, max_new, length_penalty, early_stopping):
    engine = HFRolloutEngine(eos_model, tok)
    batch = engine.beam_search(PROMPTS, num_beams=num_beams, max_new_tokens=max_new, length_penalty=length_penalty,
                               early_stopping=early_stopping)
    exp = _hf_responses(eos_model, tok, PROMPTS, do_sample=False, num_beams=num_beams, max_new_tokens=max_new,
                        length_penalty=length_penalty, early_stopping=early_stopping)
    got = _responses(batch)
    assert got == exp
    if num_beams == 3:
        assert any(r[-1] == tok.eos_token_id for r in got) and any(len(r) == max_new for r in got)


def test_batch_layout(tok, model):
    engine = HFRolloutEngine(model, tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=0)
    b = engine.generate(PROMPTS, params)
    B = len(PROMPTS) * 3
    P = b.prompt_length
    assert b.input_ids.shape == b.attention_mask.shape == b.response_mask.shape == b.behaviour_logp.shape
    assert b.input_ids.shape[0] == B and b.behaviour_logp.dtype == torch.float32
    assert b.prompt_texts == [p for p in PROMPTS for _ in range(3)]
    assert b.group_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(3)]
    # prompts left-padded, responses right-padded
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    assert torch.equal(b.input_ids[::3, :P], enc["input_ids"]) and torch.equal(b.attention_mask[::3, :P],
                                                                              enc["attention_mask"])
    rm = b.response_mask[:, P:]
    assert (rm[:, 1:] <= rm[:, :-1]).all() and (rm[:, 0] == 1).all()
    assert b.response_mask[:, :P].sum() == 0 and torch.equal(b.attention_mask[:, P:], rm)
    assert (b.behaviour_logp[b.response_mask == 0] == 0).all() and (b.behaviour_logp[b.response_mask == 1] < 0).all()
    assert b.num_generated_tokens == int(rm.sum())
    assert b.response_texts == tok.batch_decode(_responses(b), skip_special_tokens=True)
    # seeded: reproducible
    again = engine.generate(PROMPTS, params)
    assert torch.equal(again.input_ids, b.input_ids)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logp_equals_fresh_forward(tok, model, temperature, packed):
    engine = HFRolloutEngine(model, tok)
    b = engine.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=10, n=2, seed=1))
    with torch.no_grad():
        lp = sequence_logprobs(model, b.input_ids, b.attention_mask, response_mask=b.response_mask,
                               temperature=temperature, packed=packed)
    torch.testing.assert_close(lp, b.behaviour_logp, rtol=1e-4, atol=1e-4)
    gap = logprob_gap(b.behaviour_logp, lp, b.response_mask)
    assert float(gap["max"]) < 1e-4 and float(gap["mean"]) <= float(gap["max"])


def test_n_samples_share_one_prefill(tok, model):
    engine = HFRolloutEngine(model, tok)
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: seen.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, n=4, seed=0, ignore_eos=True))
    finally:
        hook.remove()
    P = b.prompt_length
    assert seen[0] == (len(PROMPTS), P)  # one prefill over the distinct prompts
    assert all(s == (len(PROMPTS) * 4, 1) for s in seen[1:])  # then one token per row per step
    assert len(seen) == 4  # the last sampled token needs no forward
    # the 4 samples of a prompt are not copies of each other
    r = b.response_ids.reshape(len(PROMPTS), 4, -1)
    assert any(not torch.equal(r[i, 0], r[i, j]) for i in range(len(PROMPTS)) for j in range(1, 4))


def test_stop_strings_and_stop_tokens(tok, model):
    engine = HFRolloutEngine(model, tok)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=3, ignore_eos=True))
    # pick a stop string that the free run produces mid-response in row 0
    resp0 = _responses(free)[0]
    piece = tok.decode(resp0[4:6])
    cut = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=3, ignore_eos=True, stop_strings=(piece,)))
    r0 = _responses(cut)[0]
    text0 = tok.decode(r0)
    assert piece in text0 and piece not in tok.decode(r0[:-1])  # stops at the completing token
    assert r0 == resp0[: len(r0)] and len(r0) <= 6
    assert cut.finish_reasons[0] == "stop"
    # a stop token id: the row ends with it
    stop_id = resp0[2]
    st = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=3, ignore_eos=True, stop_token_ids=(stop_id,)))
    r0 = _responses(st)[0]
    assert r0 == resp0[: resp0.index(stop_id) + 1]


def test_token_id_prompts_and_top_k(tok, model):
    engine = HFRolloutEngine(model, tok)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    a = engine.generate(ids, SamplingParams(max_new_tokens=5, top_k=5, top_p=0.9, seed=4))
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, top_k=5, top_p=0.9, seed=4))
    assert torch.equal(a.input_ids, b.input_ids)
    # every sampled token lies in the top-5 of the recomputed distribution
    with torch.no_grad():
        logits = model(input_ids=a.input_ids, attention_mask=a.attention_mask,
                       position_ids=(a.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    top5 = logits[:, :-1].topk(5, -1).indices
    m = a.response_mask[:, 1:].bool()
    assert (top5 == a.input_ids[:, 1:, None]).any(-1)[m].all()


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=0)
    with pytest.raises(TypeError, match="stop_strings"):
        SamplingParams(stop_strings="x")
    with pytest.raises(ValueError, match="stop_strings"):
        SamplingParams(stop_strings=("",))


def test_engine_bad_input(tok, model):
    engine = HFRolloutEngine(model, tok)
    with pytest.raises(TypeError, match="prompts"):
        engine.generate("hello", SamplingParams())
    with pytest.raises(TypeError, match="prompts"):
        engine.generate(["a", [1, 2]], SamplingParams())
    with pytest.raises(TypeError, match="params"):
        engine.generate(["a"], {"temperature": 1.0})


def test_logprob_gap():
    a = torch.tensor([[0.0, -1.0, -2.0]])
    b = torch.tensor([[5.0, -1.5, -2.0]])
    m = torch.tensor([[0, 1, 1]])
    g = logprob_gap(a, b, m)
    assert float(g["mean"]) == pytest.approx(0.25) and float(g["max"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="recomputed_logp"):
        logprob_gap(a, b[:, :2], m)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_behaviour_logp_other_families(tok, family):
    model = tiny_causal_lm(len(tok), family=family, seed=5)
    b = HFRolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=2))
    with torch.no_grad():
        lp = sequence_logprobs(model, b.input_ids, b.attention_mask, response_mask=b.response_mask)
    torch.testing.assert_close(lp, b.behaviour_logp, rtol=1e-4, atol=1e-4)


def test_engine_on_lora_policy_and_training_mode(tok):
    from rlhf_fast.models import load_policy

    policy = load_policy(tiny_causal_lm(len(tok), seed=6), lora={"r": 4, "lora_dropout": 0.5})
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    policy.train()
    b = HFRolloutEngine(policy, tok).generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=0))
    assert policy.training  # restored after generation (which runs in eval mode: no dropout)
    policy.eval()
    with torch.no_grad():
        lp = sequence_logprobs(policy, b.input_ids, b.attention_mask, response_mask=b.response_mask)
    torch.testing.assert_close(lp, b.behaviour_logp, rtol=1e-4, atol=1e-4)


def test_greedy_stops_at_eos_like_hf_generate(tok, eos_model):
    batch = HFRolloutEngine(eos_model, tok).greedy(PROMPTS, max_new_tokens=10)
    exp = _hf_responses(eos_model, tok, PROMPTS, do_sample=False, max_new_tokens=10)
    assert _responses(batch) == exp
    assert [r == "stop" for r in batch.finish_reasons] == [e[-1] == tok.eos_token_id for e in exp]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("llama", 2), ("qwen2", 2), ("mistral", None),
                                             ("qwen3", 2)])
def test_fast_decode_path_equals_generic_path(tok, family, kv_heads, device):
    """The preallocated-KV decoder (_LlamaDecoder) must give the tokens and behaviour
    log-probs of the generic transformers forward, which a no-op forward hook forces: on the
    CPU through the C++ decode op (prefill included; Qwen3's per-head q / k norms inside it
    too), on a GPU as a CUDA graph."""
    from rlhf_fast.rollout.hf_engine import _LlamaDecoder

    m = tiny_causal_lm(len(tok), family=family, num_heads=4, num_kv_heads=kv_heads, seed=3).to(device)
    if family == "mistral":
        m.config.sliding_window = None
    assert _LlamaDecoder.supported(m), family
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, n=2, seed=11)
    fast = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    handle = m.register_forward_hook(lambda *a: None)
    try:
        assert not _LlamaDecoder.supported(m)
        slow = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    finally:
        handle.remove()
    assert torch.equal(fast.input_ids, slow.input_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.behaviour_logp, slow.behaviour_logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("qwen2", 2), ("qwen3", 2)])
def test_static_decode_steps_equal_sliced_steps(tok, family, kv_heads, monkeypatch):
    """The graph-capturable static steps (whole KV buffer under a mask, column as a tensor)
    give the tokens and behaviour log-probs of the sliced steps; on the CPU the same code runs
    without the capture, so the CUDA test below only has to check the graph itself."""
    m = tiny_causal_lm(len(tok), family=family, num_heads=4, num_kv_heads=kv_heads, seed=5)
    params = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=12, n=3, seed=4)
    sliced = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    monkeypatch.setattr(HFRolloutEngine, "_decode_plan", lambda self, gathered: (True, False))
    static = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    assert torch.equal(static.input_ids, sliced.input_ids)
    assert torch.equal(static.response_mask, sliced.response_mask)
    torch.testing.assert_close(static.behaviour_logp, sliced.behaviour_logp, rtol=0, atol=1e-5)


class _FakeGraph:
    """CPU stand-in for torch.cuda.CUDAGraph with a graph's semantics: the decoder step called
    between capture_begin and capture_end is recorded with its argument tensors, and replay()
    re-runs it on whatever those tensors hold then, writing into the captured output."""

    capturing = None
    replays = 0

    def __init__(self, corrupt=False):
        self.corrupt, self.call = corrupt, None

    def capture_begin(self):
        _FakeGraph.capturing = self

    def capture_end(self):
        _FakeGraph.capturing = None

    def replay(self):
        step, args, out = self.call
        out.copy_(step(*args) + (1.0 if self.corrupt else 0.0))
        _FakeGraph.replays += 1


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


def _fake_cuda_graphs(monkeypatch, corrupt=False):
    """Runs _CUDAGraphStep's Python plumbing (static buffers, column, replay, fallback) on the CPU."""
    import contextlib

    from rlhf_fast.rollout import hf_engine

    real_step = hf_engine._LlamaDecoder.step

    def step(self, *args):
        out = real_step(self, *args)
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.call = (lambda *a: real_step(self, *a), args, out)
        return out

    monkeypatch.setattr(hf_engine._LlamaDecoder, "step", step)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _FakeGraph(corrupt))
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(HFRolloutEngine, "_decode_plan", lambda self, gathered: (True, True))
    _FakeGraph.replays = 0


@pytest.mark.parametrize("corrupt", [False, True])
def test_graph_replay_plumbing_equals_sliced_steps(tok, corrupt, monkeypatch):
    """With a stand-in graph that replays by re-running the captured step on its static input
    buffers, generation gives the sliced steps' tokens: the engine feeds each token, position
    and column through the buffers. A graph whose logits differ from the eager step's is
    refused with a warning and the call decodes eagerly, with the same result."""
    m = tiny_causal_lm(len(tok), family="qwen2", num_heads=4, num_kv_heads=2, seed=8)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2, seed=1)
    sliced = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    _fake_cuda_graphs(monkeypatch, corrupt=corrupt)
    if corrupt:
        with pytest.warns(RuntimeWarning, match="CUDA-graph decoding is off"):
            graphed = HFRolloutEngine(m, tok).generate(PROMPTS, params)
        assert _FakeGraph.replays == 1  # the check's replay only
    else:
        graphed = HFRolloutEngine(m, tok).generate(PROMPTS, params)
        assert _FakeGraph.replays == graphed.response_mask.shape[1] - graphed.prompt_length - 1
    assert torch.equal(graphed.input_ids, sliced.input_ids)
    torch.testing.assert_close(graphed.behaviour_logp, sliced.behaviour_logp, rtol=0, atol=1e-5)


def test_penalties_with_graph_replay_plumbing_equal_sliced_steps(tok, monkeypatch):
    """Penalties are applied outside the decode step: with the stand-in graph (replays into
    its output buffer, which the penalties must not write into) and with static steps, a
    penalised sampled run gives the sliced steps' tokens and log-probs, and the graph is used."""
    m = tiny_causal_lm(len(tok), family="qwen2", num_heads=4, num_kv_heads=2, seed=8)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2, seed=1, repetition_penalty=1.5,
                            frequency_penalty=0.5, presence_penalty=0.3, no_repeat_ngram_size=2, min_new_tokens=3)
    sliced = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    assert not torch.equal(sliced.input_ids, HFRolloutEngine(m, tok).generate(
        PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2, seed=1)).input_ids)
    _fake_cuda_graphs(monkeypatch)
    graphed = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    assert _FakeGraph.replays == graphed.response_mask.shape[1] - graphed.prompt_length - 1
    assert torch.equal(graphed.input_ids, sliced.input_ids)
    torch.testing.assert_close(graphed.behaviour_logp, sliced.behaviour_logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("every", [3, 8])
def test_checking_for_finished_rows_every_few_steps_changes_nothing(tok, model, every):
    """On a GPU the engine reads "all rows finished?" every 8 steps; the steps run after the
    last row finished are trimmed, so the batch is the one a check at every step gives."""
    # stop tokens common enough that every row stops early, at different steps
    params = SamplingParams(temperature=1.0, max_new_tokens=20, n=3, seed=5, stop_token_ids=tuple(range(120)))
    each = HFRolloutEngine(model, tok).generate(PROMPTS, params)
    engine = HFRolloutEngine(model, tok)
    engine.alive_check_every = every
    few = engine.generate(PROMPTS, params)
    assert set(each.finish_reasons) == {"stop"} and each.response_mask.shape[1] < each.prompt_length + 20
    assert len(set(each.response_mask.sum(1).tolist())) > 1
    assert torch.equal(few.input_ids, each.input_ids) and torch.equal(few.response_mask, each.response_mask)
    assert torch.equal(few.behaviour_logp, each.behaviour_logp) and few.finish_reasons == each.finish_reasons


def test_cuda_graphs_must_be_a_bool(model, tok):
    with pytest.raises(TypeError, match="cuda_graphs"):
        HFRolloutEngine(model, tok, cuda_graphs="yes")


@pytest.mark.cuda
@pytest.mark.parametrize("stop_early", [False, True])
def test_cuda_graph_decode_equals_eager_decode(tok, stop_early, monkeypatch):
    """On a GPU the decode step is captured once per call and replayed: same tokens and
    log-probs as eager decoding, the graph really used, no fallback warning."""
    import warnings

    from rlhf_fast.rollout import hf_engine

    m = tiny_causal_lm(len(tok), family="qwen2", num_heads=4, num_kv_heads=2, seed=6).cuda()
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, n=4, seed=9,
                            ignore_eos=not stop_early)
    eager = HFRolloutEngine(m, tok, cuda_graphs=False).generate(PROMPTS, params)
    built = []
    real = hf_engine._CUDAGraphStep

    class Counting(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(hf_engine, "_CUDAGraphStep", Counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graphed = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    assert len(built) == 1
    assert torch.equal(graphed.input_ids, eager.input_ids)
    assert torch.equal(graphed.response_mask, eager.response_mask)
    torch.testing.assert_close(graphed.behaviour_logp, eager.behaviour_logp, rtol=0, atol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_decode_with_penalties_equals_eager_decode(tok):
    """On a GPU, penalties on top of the captured decode step: the eager call's tokens."""
    import warnings

    m = tiny_causal_lm(len(tok), family="qwen2", num_heads=4, num_kv_heads=2, seed=6).cuda()
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, n=4, seed=9, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.2, no_repeat_ngram_size=3, min_new_tokens=5)
    eager = HFRolloutEngine(m, tok, cuda_graphs=False).generate(PROMPTS, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graphed = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    assert torch.equal(graphed.input_ids, eager.input_ids)
    torch.testing.assert_close(graphed.behaviour_logp, eager.behaviour_logp, rtol=0, atol=1e-4)


def _rows(batch: RolloutBatch):
    """(response token list, response behaviour log-probs) of every row."""
    P = batch.prompt_length
    out = []
    for ids, lp, m in zip(batch.response_ids, batch.behaviour_logp[:, P:], batch.response_mask[:, P:].bool()):
        out.append((ids[m].tolist(), lp[m]))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the preallocated-KV decoder and the generic path
def test_per_sample_seeds_independent_of_batch_composition(tok, family):
    """A row seeded with s draws the same response whatever else is in the batch: alone, with
    other prompts (other left padding), in another order — how ranks reproduce one process."""
    model = tiny_causal_lm(len(tok), family=family, seed=7)
    engine = HFRolloutEngine(model, tok)
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=8, n=2)
    seeds = {p: (100 + 2 * i, 101 + 2 * i) for i, p in enumerate(PROMPTS)}

    def run(prompts):
        row_seeds = [s for p in prompts for s in seeds[p]]
        b = engine.generate(prompts, SamplingParams(sample_seeds=row_seeds, **kw))
        return {(p, k): r for (p, k), r in zip([(p, k) for p in prompts for k in range(2)], _rows(b))}

    full = run(PROMPTS)
    parts = {**run(PROMPTS[:1]), **run(PROMPTS[3:0:-1])}  # alone; the others reversed, other padding
    assert full.keys() == parts.keys()
    for key in full:
        assert full[key][0] == parts[key][0], key
        torch.testing.assert_close(full[key][1], parts[key][1], rtol=0, atol=1e-5)
    # the seeds decide: the two answers of a prompt differ, and other seeds give other samples
    assert any(full[(p, 0)][0] != full[(p, 1)][0] for p in PROMPTS)
    seeds = {p: (s + 1000, t + 1000) for p, (s, t) in seeds.items()}
    other = run(PROMPTS)
    assert any(other[key][0] != full[key][0] for key in full)
    # behaviour log-probs are those of the drawn tokens (no filter: as a fresh forward gives them)
    b = engine.generate(PROMPTS, SamplingParams(sample_seeds=list(range(8)), max_new_tokens=8, n=2))
    fresh = sequence_logprobs(model, b.input_ids, b.attention_mask, response_mask=b.response_mask)
    torch.testing.assert_close(b.behaviour_logp, fresh * b.response_mask, rtol=0, atol=1e-4)


def test_per_sample_seeds_validation(tok, model):
    with pytest.raises(ValueError, match="sample_seeds"):
        SamplingParams(sample_seeds=[1, -2])
    with pytest.raises(ValueError, match="sample_seeds"):
        SamplingParams(sample_seeds=[])
    with pytest.raises(TypeError, match="sample_seeds"):
        SamplingParams(sample_seeds=3)
    assert SamplingParams(sample_seeds=[3, 4]).sample_seeds == (3, 4)
    engine = HFRolloutEngine(model, tok)
    with pytest.raises(ValueError, match="one seed per response row"):
        engine.generate(PROMPTS[:2], SamplingParams(n=2, sample_seeds=[1, 2, 3]))
    # greedy draws nothing: the seeds change nothing
    g = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=5, sample_seeds=[1, 2, 3, 4]))
    assert torch.equal(g.input_ids, engine.greedy(PROMPTS, max_new_tokens=5).input_ids)


def test_engine_refuses_ids_params_and_lengths_it_cannot_run(tok):
    """Probe: out-of-vocabulary / negative / bool prompt ids, a tokenizer larger than the model,
    prompts past a learned position table (GPT-2), max_new_tokens past the positions, non-finite
    temperature / length_penalty and an out-of-range seed are named, not IndexError / OverflowError
    deep in torch or tokenizers (or a whole-response-buffer allocation)."""
    small = train_tokenizer(sample_texts(64), 96)
    m = tiny_causal_lm(len(small), hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64)
    eng = HFRolloutEngine(m, small)
    p = SamplingParams(max_new_tokens=2)
    for bad in ([[5, len(small)]], [[5, -1]], [[True, 5]]):
        with pytest.raises(ValueError, match=r"prompts\[0\] holds token id .* must be ints in \[0, 96\)"):
            eng.generate(bad, p)
        with pytest.raises(ValueError, match=r"prompts\[0\] holds token id"):
            eng.beam_search(bad, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 40\)"):  # tokenizer bigger than the model
        HFRolloutEngine(tiny_causal_lm(40, hidden_size=32, num_layers=2, num_heads=2), small).generate(
            ["the cat sat on the mat"], p)
    with pytest.raises(ValueError, match=r"max_new_tokens \(1000000000000\) is more than"):
        eng.generate(["the cat"], SamplingParams(max_new_tokens=10**12))
    g = tiny_causal_lm(len(small), family="gpt2", hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"longest prompt .* \+ max_new_tokens \(4\) is more than the 64 positions"):
        HFRolloutEngine(g, small).generate(["the cat " * 100], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="longest prompt"):
        HFRolloutEngine(g, small).beam_search(["the cat " * 100], num_beams=2, max_new_tokens=4)
    assert eng.generate(["the cat " * 100], SamplingParams(max_new_tokens=2)).batch_size == 1  # RoPE: no table
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            SamplingParams(temperature=t)
    with pytest.raises(ValueError, match="seed must be an int in"):
        SamplingParams(seed=2**70)
    for lp in (float("nan"), "x"):
        with pytest.raises(ValueError, match="length_penalty must be a finite number"):
            eng.beam_search(["the cat"], num_beams=2, max_new_tokens=2, length_penalty=lp)
    with pytest.raises(TypeError, match="model must be a transformers causal LM"):
        HFRolloutEngine(None, small)
    with pytest.raises(TypeError, match="device must be a str"):
        HFRolloutEngine(m, small, device=3.5)
