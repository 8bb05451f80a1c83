"""Tool calling in RL rollouts (TRL GRPOTrainer's ``tools`` / ``max_tool_calling_iterations``).

TRL's pieces are called where they are functions or methods that need no trainer
(``supports_tool_calling``, ``parse_response``, ``GRPOTrainer._get_tool_suffix_ids`` on a
stand-in ``self``); its tool-execution lines, inline in ``_tool_call_loop``, are transcribed.
A scripted engine checks the loop token by token; a tiny model trains end to end with a
calculator whose first call is scripted (a random tiny model never writes one)."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from rlhf_fast.rollout import HFRolloutEngine, RolloutBatch, RolloutEngine, SamplingParams
from rlhf_fast.rollout import tools as T
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# A Qwen2.5-style template with a short system text: tools in the system turn, an assistant's
# tool_calls as <tool_call> JSON blocks, consecutive tool messages in one user turn.
TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\nTools:' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\nCall one as <tool_call>\\n{\"name\": <name>, \"arguments\": <args>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system'"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": '"
    " + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression, e.g. "1+2".
    """
    return str(eval(expression, {"__builtins__": {}}))  # noqa: S307 - digits and + only in these tests


async def slow_add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("boom")


CHATS = [[{"role": "user", "content": f"what is {a}+{b}?"}] for a, b in ((1, 2), (3, 4), (2, 5), (6, 1))]


def call_text(name="calculator", args='{"expression": "1+2"}'):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok():
    return tool_tokenizer()


def tool_tokenizer():
    """A tiny BPE tokenizer with TEMPLATE, trained on the rendered tool prompts and exchanges
    (deterministic: tests/distributed/trainer_worker.py builds it on every rank)."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    probe = train_tokenizer(["x"], 8, special_tokens=("<|endoftext|>", "<|im_end|>", "<|im_start|>", "<unk>"))
    probe.chat_template = TEMPLATE
    rendered = [probe.apply_chat_template(c, tools=[calculator, slow_add, broken], tokenize=False,
                                          add_generation_prompt=True) for c in CHATS]
    texts = sample_texts(64) + rendered * 8 + [call_text(), "<tool_response>\n3\n</tool_response>", "the answer is 3"] * 8
    tok = train_tokenizer(texts, 400, special_tokens=("<|endoftext|>", "<|im_end|>", "<|im_start|>", "<unk>"))
    tok.chat_template = TEMPLATE
    return tok


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def make_policy(tok, seed=0):
    from rlhf_fast.models.tiny import tiny_causal_lm

    return tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=seed,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def make_batch(tok, prompts, responses, n, finish=None):
    """A RolloutBatch of token-id ``prompts`` (each answered n times, consecutive rows) and
    ``responses`` (id lists), behaviour log-probs −0.01·(k+1) for the k-th response token."""
    P, R = max(map(len, prompts)), max(1, max(map(len, responses)))
    B = len(responses)
    ids = torch.full((B, P + R), tok.pad_token_id)
    am, rm, lp = torch.zeros(B, P + R, dtype=torch.long), torch.zeros(B, P + R, dtype=torch.long), torch.zeros(B, P + R)
    for i, r in enumerate(responses):
        p = prompts[i // n]
        ids[i, P - len(p):P], am[i, P - len(p):P] = torch.tensor(p), 1
        ids[i, P:P + len(r)], am[i, P:P + len(r)], rm[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long), 1, 1
        lp[i, P:P + len(r)] = -0.01 * torch.arange(1, len(r) + 1)
    return RolloutBatch(ids, am, rm, lp, [tok.decode(p) for p in prompts for _ in range(n)],
                        tok.batch_decode(responses, skip_special_tokens=True),
                        torch.arange(len(prompts)).repeat_interleave(n), int(rm.sum()), 1.0, P,
                        finish or ["stop" if r and r[-1] == tok.eos_token_id else "length" for r in responses])


class ScriptedEngine(RolloutEngine):
    """Answers from ``script(prompt_ids, row) -> text`` (eos appended unless the text ends with
    '…'), cut at max_new_tokens; text prompts are tokenized. Records each call."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls, self.pad_id = tok, script, [], tok.pad_token_id

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        ids = [ids_of(self.tok, p) if isinstance(p, str) else list(p) for p in prompts]
        out = []
        for i, p in enumerate(ids):
            for k in range(params.n):
                text = self.script(p, i * params.n + k)
                r = ids_of(self.tok, text.rstrip("…")) + ([] if text.endswith("…") else [self.tok.eos_token_id])
                out.append(r[:params.max_new_tokens])
        return make_batch(self.tok, ids, out, params.n)


class FirstCallScripted(RolloutEngine):
    """The first turn (text prompts) answers with a scripted tool call — row k of each group
    calls ``names[k % len(names)]`` — continuations (token-id prompts) are the model's own."""

    def __init__(self, inner, tok, names=("calculator",)):
        self.inner, self.tok, self.names, self.pad_id = inner, tok, names, inner.pad_id

    def generate(self, prompts, params):
        if not isinstance(prompts[0], str):
            return self.inner.generate(prompts, params)
        ids = [ids_of(self.tok, p) for p in prompts]
        resp = []
        for p in prompts:
            a, b = p.split("what is ")[1].split("?")[0].split("+")
            for k in range(params.n):
                resp.append(ids_of(self.tok, call_text(self.names[k % len(self.names)],
                                                       json.dumps({"expression": f"{a}+{b}"})))
                            + [self.tok.eos_token_id])
        return make_batch(self.tok, ids, [r[:params.max_new_tokens] for r in resp], params.n)

    def update_weights(self, model):
        pass


# ----------------------------------------------------------------------------- TRL parity


def test_test_template_supports_tool_calling_as_trl(tok):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling

    assert T.supports_tool_calling(tok) and supports_tool_calling(tok)
    assert is_chat_template_prefix_preserving(tok)
    from rlhf_fast.models.tiny import CHAT_TEMPLATE  # "role: content" lines: drops tool calls

    old = tok.chat_template
    try:
        tok.chat_template = CHAT_TEMPLATE
        assert not T.supports_tool_calling(tok) and not supports_tool_calling(tok)
    finally:
        tok.chat_template = old


@pytest.mark.parametrize("contents", [["3"], ["3", "{'error': 'Tool nope not found.'}"], ["line one\nline two"]])
def test_suffix_ids_equal_trl(tok, contents):
    from trl.trainer.grpo_trainer import GRPOTrainer

    msgs = [{"role": "tool", "name": "calculator", "content": c} for c in contents]
    me = SimpleNamespace(processing_class=tok, _tokenizer=tok, _is_vlm=False, chat_template=None,
                         chat_template_kwargs={})
    ours = T.tool_suffix_ids(tok, msgs)
    assert ours == GRPOTrainer._get_tool_suffix_ids(me, msgs)
    assert tok.decode(ours).startswith("\n<|im_start|>user\n<tool_response>\n" + contents[0])
    assert tok.decode(ours).endswith("<|im_start|>assistant\n")


ANSWERS = [
    call_text() + "<|im_end|>",
    "let me compute\n" + call_text() + "<|im_end|>",
    call_text() + "\n" + call_text("slow_add", '{"a": 1, "b": 2}') + "<|im_end|>",
    '<tool_call>\n{"name": "calculator"}\n</tool_call><|im_end|>',  # no arguments: {}
    "the answer is 3<|im_end|>",
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": </tool_call><|im_end|>',  # malformed
    call_text()[:-5],  # cut before the closing tag
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_parsing_equals_trl(tok, answer):
    """Our Hermes parser (tokenizers without a response template) equals TRL's parse_response
    with its Qwen response template, and with that template set ours is TRL's call."""
    from trl.chat_template_utils import parse_response, qwen3_template

    prompt = ids_of(tok, tok.apply_chat_template(CHATS[0], tools=[calculator], tokenize=False,
                                                 add_generation_prompt=True))
    ids = ids_of(tok, answer)
    hermes = T.parse_turn(tok, ids, prompt, [calculator])
    tok.response_template = qwen3_template
    try:
        trl = parse_response(tok, ids, prefix=prompt, tools=[calculator])
        templated = T.parse_turn(tok, ids, prompt, [calculator])
    finally:
        del tok.response_template
    assert templated == trl
    assert hermes.get("tool_calls") == trl.get("tool_calls")
    assert hermes["content"].strip() == trl["content"].strip()


def test_run_tool_calls_as_trl():
    """Transcribed from trl/trainer/grpo_trainer.py, _tool_call_loop: unknown tools and raising
    tools give {"error": str(e)} and count as failures; async results follow the sync ones."""
    calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in
             [("slow_add", {"a": 1, "b": 2}), ("calculator", {"expression": "2+2"}), ("nope", {}),
              ("broken", {"x": 1}), ("calculator", {"wrong": 1}), ("calculator", "2+2")]]
    tools = {"calculator": calculator, "slow_add": slow_add, "broken": broken}
    res, failures = T.run_tool_calls(calls, tools)
    assert failures == 4
    assert res[0] == ("calculator", "4") and res[1] == ("nope", {"error": "Tool nope not found."})
    assert res[2] == ("broken", {"error": "boom"})
    assert res[3][0] == "calculator" and "wrong" in res[3][1]["error"]
    assert res[4][0] == "calculator" and "mapping" in res[4][1]["error"]
    assert res[5] == ("slow_add", 3)
    assert T.tool_messages(res[:2]) == [{"role": "tool", "name": "calculator", "content": "4"},
                                        {"role": "tool", "name": "nope", "content": "{'error': 'Tool nope not found.'}"}]


# ----------------------------------------------------------------------------- the loop, scripted


def _prompt_ids(tok, chat=CHATS[0], tools=(calculator,)):
    return ids_of(tok, tok.apply_chat_template(chat, tools=list(tools), tokenize=False, add_generation_prompt=True))


def test_loop_appends_tool_results_as_holes(tok):
    def script(p, row):
        return "the answer is 3" if "<tool_response>" in tok.decode(p) else call_text()

    eng = ScriptedEngine(tok, script)
    prompt = _prompt_ids(tok)
    params = SamplingParams(max_new_tokens=200, n=2)
    batch, st = T.tool_rollout(eng, [prompt], params, tools=[calculator], tokenizer=tok)
    call = ids_of(tok, call_text()) + [tok.eos_token_id]
    suffix = T.tool_suffix_ids(tok, [{"role": "tool", "name": "calculator", "content": "3"}])
    answer = ids_of(tok, "the answer is 3") + [tok.eos_token_id]
    P = batch.prompt_length
    for i in range(2):
        row = batch.input_ids[i, P:][batch.attention_mask[i, P:].bool()].tolist()
        assert row == call + suffix + answer
        mask = batch.response_mask[i, P:P + len(row)].tolist()
        assert mask == [1] * len(call) + [0] * len(suffix) + [1] * len(answer)
        lp = batch.behaviour_logp[i, P:P + len(row)]
        exp = [-0.01 * (k + 1) for k in range(len(call))] + [0.0] * len(suffix) + \
              [-0.01 * (k + 1) for k in range(len(answer))]
        torch.testing.assert_close(lp, torch.tensor(exp))
        assert "<tool_response>\n3\n</tool_response>" in batch.response_texts[i]
        assert batch.response_texts[i].endswith("the answer is 3")
    assert batch.finish_reasons == ["stop", "stop"]
    assert batch.num_generated_tokens == 2 * (len(call) + len(answer))
    assert (st.calls, st.failures, st.iterations, st.rows) == (2, 0, 1, 2)
    assert st.messages[0][1] == {"role": "tool", "name": "calculator", "content": "3"}
    assert st.messages[0][2]["content"] == "the answer is 3"
    # the continuation: one sample per answer, from the grown sequence
    (cont, cp) = eng.calls[1]
    assert cont == [prompt + call + suffix] * 2 and cp.n == 1


@pytest.mark.parametrize("limit,expected", [(0, 0), (1, 1), (3, 3), (None, 6)])
def test_iterations_capped(tok, limit, expected):
    eng = ScriptedEngine(tok, lambda p, row: call_text())  # calls the tool forever
    suffix = T.tool_suffix_ids(tok, [{"role": "tool", "name": "calculator", "content": "3"}])
    turn = len(ids_of(tok, call_text())) + 1
    budget = 7 * turn + 6 * len(suffix)  # room for 6 rounds, not a 7th result
    batch, st = T.tool_rollout(eng, [_prompt_ids(tok)], SamplingParams(max_new_tokens=budget), tools=[calculator],
                               tokenizer=tok, max_iterations=limit)
    assert len(eng.calls) == 1 + expected
    P = batch.prompt_length
    assert int(batch.attention_mask[0, P:].sum()) == (expected + 1) * turn + expected * len(suffix)
    assert int(batch.response_mask[0].sum()) == (expected + 1) * turn
    assert st.calls == (expected if limit is not None else 7)  # the 7th ran, then was rolled back


def test_no_iteration_returns_the_first_batch(tok):
    eng = ScriptedEngine(tok, lambda p, row: call_text())
    first = []
    real = eng.generate
    eng.generate = lambda *a: first.append(real(*a)) or first[-1]
    batch, st = T.tool_rollout(eng, [_prompt_ids(tok)], SamplingParams(max_new_tokens=64), tools=[calculator],
                               tokenizer=tok, max_iterations=0)
    assert batch is first[0] and st.calls == 0


def test_budget_rolls_back_and_cuts(tok):
    call = ids_of(tok, call_text()) + [tok.eos_token_id]
    suffix = T.tool_suffix_ids(tok, [{"role": "tool", "name": "calculator", "content": "3"}])
    answer = ids_of(tok, "the answer is 3") + [tok.eos_token_id]

    def script(p, row):
        return "the answer is 3" if "<tool_response>" in tok.decode(p) else call_text()

    def run(budget, **kw):
        eng = ScriptedEngine(tok, script)
        return T.tool_rollout(eng, [_prompt_ids(tok)], SamplingParams(max_new_tokens=budget), tools=[calculator],
                              tokenizer=tok, **kw), eng

    # the result does not fit: rolled back, the answer ends with its call (stopped, not truncated)
    (b, st), eng = run(len(call) + len(suffix) - 1)
    P = b.prompt_length
    assert b.input_ids[0, P:][b.attention_mask[0, P:].bool()].tolist() == call
    assert b.finish_reasons == ["stop"] and st.calls == 1 and len(eng.calls) == 1
    assert st.messages[0] == [st.messages[0][0]]  # the tool message is rolled back too
    # it fits with 3 tokens to spare: the continuation is cut there
    (b, st), eng = run(len(call) + len(suffix) + 3)
    row = b.input_ids[0, P:][b.attention_mask[0, P:].bool()].tolist()
    assert row == call + suffix + answer[:3] and b.finish_reasons == ["length"]
    assert eng.calls[1][1].max_new_tokens == 3
    # exactly full: nothing left to generate, truncated
    (b, st), _ = run(len(call) + len(suffix))
    assert b.finish_reasons == ["length"] and int(b.attention_mask[0, P:].sum()) == len(call) + len(suffix)
    # the model's position limit rolls it back as TRL's max_model_len does
    (b, st), _ = run(500, max_length=len(_prompt_ids(tok)) + len(call) + len(suffix))
    assert int(b.attention_mask[0, P:].sum()) == len(call)


def test_continuation_seeds_are_the_rows_own(tok):
    eng = ScriptedEngine(tok, lambda p, row: "done" if "<tool_response>" in tok.decode(p) else
                         (call_text() if row % 2 == 0 else "no call"))
    T.tool_rollout(eng, [_prompt_ids(tok)], SamplingParams(max_new_tokens=200, n=4, sample_seeds=(11, 12, 13, 14)),
                   tools=[calculator], tokenizer=tok)
    assert eng.calls[1][1].sample_seeds == (T._mix_seed(11, 1), T._mix_seed(13, 1))
    eng.calls.clear()
    T.tool_rollout(eng, [_prompt_ids(tok)], SamplingParams(max_new_tokens=200, n=4, seed=5), tools=[calculator],
                   tokenizer=tok)
    assert eng.calls[1][1].seed == T._mix_seed(5, 1) and eng.calls[1][1].sample_seeds is None


def test_other_ranks_continuing_make_this_rank_call_too(tok):
    """Under FSDP2 generate gathers the weights (a collective): a rank whose answers call no
    tool still makes each continuation call another rank makes."""
    eng = ScriptedEngine(tok, lambda p, row: "no call")
    flags = []

    def sync(flag):  # another rank has an answer to continue in the first round
        flags.append(flag)
        return len(flags) <= 2

    b, st = T.tool_rollout(eng, [_prompt_ids(tok)], SamplingParams(max_new_tokens=16), tools=[calculator],
                           tokenizer=tok, sync_any=sync)
    assert flags == [False, False, False] and len(eng.calls) == 2
    assert eng.calls[1][1].max_new_tokens == 1 and st.calls == 0 and b.batch_size == 1


def test_model_continuation_is_deterministic_per_answer(tok):
    """A continued answer depends on its own seed, not on which other answers share the call."""
    pol = make_policy(tok)
    eng = FirstCallScripted(HFRolloutEngine(pol, tok), tok)
    prompts = [tok.apply_chat_template(c, tools=[calculator], tokenize=False, add_generation_prompt=True)
               for c in CHATS[:2]]
    params = SamplingParams(max_new_tokens=90, n=2, temperature=1.0, sample_seeds=(1, 2, 3, 4))
    both, _ = T.tool_rollout(eng, prompts, params, tools=[calculator], tokenizer=tok)
    again, _ = T.tool_rollout(eng, prompts, params, tools=[calculator], tokenizer=tok)
    one, _ = T.tool_rollout(eng, prompts[:1], dataclasses.replace(params, sample_seeds=(1, 2)), tools=[calculator],
                            tokenizer=tok)
    assert torch.equal(both.input_ids, again.input_ids)
    assert (both.attention_mask.bool() & ~both.response_mask.bool())[:, both.prompt_length:].all(1).eq(False).all()
    assert (both.attention_mask.bool() & ~both.response_mask.bool())[:, both.prompt_length:].any(1).all()  # grown

    def resp(b, i):
        return b.input_ids[i, b.prompt_length:][b.attention_mask[i, b.prompt_length:].bool()].tolist()

    assert [resp(both, i) for i in range(2)] == [resp(one, i) for i in range(2)]
    assert resp(both, 0) != resp(both, 1)  # the answers' own seeds differ


# ----------------------------------------------------------------------------- the trainer


def n_chars(prompts, completions):
    return [float(len(c)) for c in completions]


def correct(prompts, completions, completion_messages, **kw):
    """1 when the tool's answer is the sum (the calculator ran), from the turns as messages."""
    out = []
    for p, msgs in zip(prompts, completion_messages):
        a, b = p.split("what is ")[1].split("?")[0].split("+")
        tool = [m["content"] for m in msgs if m["role"] == "tool"]
        out.append(float(bool(tool) and tool[0] == str(int(a) + int(b))))
    return out


def _config(tmp_path, estimator="grpo", **ro):
    return RLConfig(estimator=estimator, steps=2, output_dir=str(tmp_path / "run"), progress=False, sample_every=1,
                    rollout=RolloutConfig(**{"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 80,
                                             "temperature": 1.0, **ro}),
                    ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=4),
                    optim=OptimConfig(lr=1e-3, critic_lr=1e-3), kl=KLConfig(coef=0.05, placement="loss", kind="k3"))


def _trainer(tmp_path, tok, names=("calculator", "nope"), estimator="grpo", reward_fns=(correct, n_chars),
             eval_every=0, **ro):
    pol = make_policy(tok)
    cfg = dataclasses.replace(_config(tmp_path, estimator, **ro), eval_every=eval_every)
    tr = RLTrainer(cfg, pol, tok, reward_fns=list(reward_fns), prompts=CHATS, tools=[calculator],
                   eval_prompts=CHATS[:2] if eval_every else None)
    tr.engine = FirstCallScripted(tr.engine, tok, names)
    return tr


def test_grpo_with_a_calculator_runs(tmp_path, tok):
    tr = _trainer(tmp_path, tok, eval_every=2)
    hist = tr.train()
    assert len(hist) == 2
    # evaluation answers once per prompt: row 0 of each group, the calculator
    assert hist[-1]["eval/tools/call_frequency"] == 1.0 and hist[-1]["eval/tools/failure_frequency"] == 0.0
    assert hist[-1]["eval/reward/correct"] == 1.0
    for m in hist:
        # rows 0, 2 of each group call the calculator, rows 1, 3 a tool that does not exist
        assert m["tools/call_count"] == 8 and m["tools/call_frequency"] == 1.0
        assert m["tools/failure_frequency"] == 0.5
        assert m["reward/correct"] == 0.5  # the calculator's results reached the reward function
        assert all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if k.startswith("policy/"))
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert any("<tool_response>" in s["completion"] for s in samples)
    assert "tools:" in open(tmp_path / "run" / "metrics.jsonl").read().replace('"tools/', "tools:")


def _holes(data):
    """``[B, L]`` bool: attended tokens after the prompts that are not the model's (tool results)."""
    P = int(data.response_mask.float().argmax(1).min())  # every row here answers something
    cols = torch.arange(data.input_ids.shape[1])
    return data.attention_mask & ~data.response_mask & (cols >= P)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_loss_ignores_tool_tokens(tmp_path, tok, estimator):
    tr = _trainer(tmp_path, tok, names=("calculator",), estimator=estimator, reward_fns=(n_chars,))
    data, m = tr.rollout()
    holes = _holes(data)
    assert holes.any() and m["tools/call_count"] == 8
    for t in (data.old_logp, data.ref_logp, data.behaviour_logp, data.advantages, data.values, data.returns):
        assert not t[holes].any()  # nothing of the tool tokens reaches the loss, KL or GAE
    # response_length counts the model's tokens only (TRL's completion lengths under tools)
    assert m["response_length/mean"] == pytest.approx(float(data.response_mask.sum(1).float().mean()))

    def loss_and_grads(d):
        tr.policy.zero_grad(set_to_none=True)
        st = tr.policy_backward(d)
        return st["loss"], [p.grad.clone() for p in tr.policy.parameters() if p.grad is not None]

    base, g0 = loss_and_grads(data)
    noisy = dataclasses.replace(data, **{k: getattr(data, k).masked_fill(holes, v) for k, v in
                                         (("old_logp", -7.0), ("ref_logp", 3.0), ("advantages", 50.0),
                                          ("values", 9.0), ("returns", -9.0))})
    same, g1 = loss_and_grads(noisy)
    assert same == base
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the same change on a model token moves the loss: the check can fail
    tok_mask = torch.zeros_like(holes)
    r, c = data.response_mask.nonzero()[0]
    tok_mask[r, c] = True
    moved, _ = loss_and_grads(dataclasses.replace(data, advantages=data.advantages.masked_fill(tok_mask, 50.0)))
    assert moved != base


def test_no_tools_rollouts_unchanged(tmp_path, tok):
    """Tools that no answer calls change nothing: the rollout is the one without tools, bit for bit."""
    def run(tools):
        pol = make_policy(tok)
        texts = [f"what is {a}+{b}?" for a, b in ((1, 2), (3, 4))]  # text prompts: not rendered with the tools
        tr = RLTrainer(_config(tmp_path / str(bool(tools)), max_new_tokens=8), pol, tok, reward_fns=[n_chars],
                       prompts=texts, tools=tools)
        return tr.rollout()

    (a, ma), (b, mb) = run(None), run([calculator])
    assert mb["tools/call_count"] == 0 and not any(k.startswith("tools/") for k in ma)
    for k in a.__dataclass_fields__:
        x, y = getattr(a, k), getattr(b, k)
        assert (x is None and y is None) or torch.equal(x, y), k


def test_max_iterations_zero_lists_tools_but_never_runs_them(tmp_path, tok):
    tr = _trainer(tmp_path, tok, max_tool_calling_iterations=0, reward_fns=(n_chars,))
    assert "calculator" in tr.prompts[0]  # the schema is in the prompt
    data, m = tr.rollout()
    assert m["tools/call_count"] == 0 and not _holes(data).any()


# ----------------------------------------------------------------------------- configuration


def test_tools_from_config_and_bad_paths(tmp_path, tok, monkeypatch):
    f = tmp_path / "my_tools.py"
    f.write_text("def add(a: int, b: int) -> int:\n    \"\"\"Add.\n\n    Args:\n        a: A.\n        b: B.\n    \"\"\"\n"
                 "    return a + b\n")
    tr = RLTrainer(_config(tmp_path, tools=[f"{f}:add"]), make_policy(tok), tok, reward_fns=[n_chars], prompts=CHATS)
    assert [t.__name__ for t in tr.tools] == ["add"] and '"name": "add"' in tr.prompts[0]
    with pytest.raises(ValueError, match=r"rollout\.tools\[0\]"):
        RLTrainer(_config(tmp_path, tools=["no_such_module_xyz:f"]), make_policy(tok), tok, reward_fns=[n_chars],
                  prompts=CHATS)
    with pytest.raises(ValueError, match=r"rollout\.tools\[0\]"):
        RolloutConfig(tools=["no_colon"])
    with pytest.raises(ValueError, match="rollout.max_tool_calling_iterations"):
        RolloutConfig(max_tool_calling_iterations=-1)
    with pytest.raises(ValueError, match=r"rollout\.tools\[0\].*also in tools"):
        RLTrainer(_config(tmp_path, tools=[f"{f}:add"]), make_policy(tok), tok, reward_fns=[n_chars], prompts=CHATS,
                  tools=[_named("add")])
    with pytest.raises(ValueError, match=r"tools\[0\].*docstring"):
        RLTrainer(_config(tmp_path), make_policy(tok), tok, reward_fns=[n_chars], prompts=CHATS,
                  tools=[lambda x: x])


def _named(name):
    def fn(x: int) -> int:
        """A tool.

        Args:
            x: X.
        """
        return x

    fn.__name__ = name
    return fn


def test_template_without_tool_support_is_refused(tmp_path):
    from tests.test_rl_learning import make_policy as plain

    pol, tok = plain()
    with pytest.raises(ValueError, match="chat template renders tool calls"):
        RLTrainer(_config(tmp_path), pol, tok, reward_fns=[n_chars], prompts=["a"], tools=[calculator])


def test_cli_override(tmp_path):
    from rlhf_fast.trainers.rl_cli import build_config

    cfg = build_config("grpo", ["none", "--rollout.tools", "a.b:c,d.py:e", "--rollout.max_tool_calling_iterations",
                                "2"])
    assert cfg.rollout.tools == ["a.b:c", "d.py:e"] and cfg.rollout.max_tool_calling_iterations == 2
    assert build_config("grpo", ["none"]).rollout.max_tool_calling_iterations is None


def test_tool_timeout_answers_a_hung_call_and_goes_on():
    """rollout.tool_timeout: a sync or async call still running after it gives the model a
    timed-out error and counts as a failure (with no timeout a hung tool stalled the run for
    ever); a TimeoutError the tool raises itself stays its own error; calls that finish in time
    give their results, in TRL's order."""
    import asyncio
    import threading
    import time

    release = threading.Event()

    def hang():
        release.wait(30)
        return "late"

    async def ahang():
        await asyncio.sleep(30)

    def raises_timeout():
        raise TimeoutError("socket timed out")

    calls = [{"type": "function", "function": {"name": n, "arguments": {}}}
             for n in ("hang", "ahang", "raises_timeout")]
    calls.insert(1, {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}})
    tools = {"hang": hang, "ahang": ahang, "raises_timeout": raises_timeout, "calculator": calculator}
    t0 = time.monotonic()
    res, failures = T.run_tool_calls(calls, tools, timeout=0.2)
    assert time.monotonic() - t0 < 10
    release.set()
    assert failures == 3
    assert res == [("hang", {"error": "Tool hang timed out after 0.2 s."}), ("calculator", "5"),
                   ("raises_timeout", {"error": "socket timed out"}),
                   ("ahang", {"error": "Tool ahang timed out after 0.2 s."})]
    # in time: the plain results
    assert T.run_tool_calls(calls[1:2], tools, timeout=5.0) == ([("calculator", "5")], 0)
    for bad in (0, -1, float("nan"), "5"):
        with pytest.raises(ValueError, match="rollout.tool_timeout"):
            RolloutConfig(tool_timeout=bad)


def test_tool_timeout_reaches_the_rollout(tmp_path, tok, monkeypatch):
    seen = []
    real = T.run_tool_calls
    monkeypatch.setattr(T, "run_tool_calls", lambda calls, tools, timeout=None: (seen.append(timeout),
                                                                                  real(calls, tools, timeout))[1])
    tr = _trainer(tmp_path, tok, tool_timeout=7.5)
    tr.train()
    assert seen and set(seen) == {7.5}
