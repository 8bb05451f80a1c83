"""Environments in RL rollouts (TRL GRPOTrainer's ``environment_factory``) and the chat
template's extra variables (GRPOConfig's ``chat_template_kwargs``).

TRL's environment code is inline in ``GRPOTrainer.__init__`` / ``_generate_and_score_completions``
(which methods are tools, the reset observation appended to the prompt, the per-environment
tool lists, the ``get_reward`` source): those lines are transcribed below, each naming its
place. ``GRPOTrainer._calculate_rewards`` (how reward functions receive ``environments=``) and
``_get_tool_suffix_ids`` (with ``chat_template_kwargs``) are called on a stand-in ``self``. A
tiny model trains end to end with a counter environment whose first call is scripted."""

import copy
import inspect
import json
from types import SimpleNamespace

import pytest
import torch

from rlhf_fast.rollout import RolloutEngine
from rlhf_fast.rollout import environments as E
from rlhf_fast.rollout import tools as T
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import DataConfig, KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_tools import TEMPLATE, calculator, ids_of, make_batch, make_policy, tok  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class Counter:
    """A counter each answer increments; the reward is where it ends."""

    made = 0  # instances created (the trainer makes fresh ones for every rollout)

    def __init__(self):
        Counter.made += 1
        self.value, self.record = None, None

    def reset(self, **record):
        self.record = record
        self.value = int(record.get("start", 0))

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return self.value

    def get_reward(self) -> float:
        return float(self.value)

    def _secret(self) -> int:
        return 0

    @property
    def explodes(self):  # listing the tools must not evaluate properties (TRL lists on the class)
        raise RuntimeError("evaluated")


class Store:
    """A key-value store; owns no reward."""

    def reset(self, **record):
        self.data = {}
        return f" (the store holds {len(self.data)} keys)"

    def put(self, key: str, value: str) -> str:
        """Store a value.

        Args:
            key: The key.
            value: The value.
        """
        self.data[key] = value
        return "ok"

    def get(self, key: str) -> str:
        """Read a value.

        Args:
            key: The key.
        """
        return self.data.get(key, "")


def counter_value(prompts, completions, environments, **kw):
    """The counters, read by a reward function (TRL passes the instances as environments=)."""
    return [float(e.value) for e in environments]


def inc_text(by):
    return f'<tool_call>\n{{"name": "increment", "arguments": {{"by": {by}}}}}\n</tool_call>'


class Scripted(RolloutEngine):
    """First turn (text prompts): answer k of each prompt calls increment(by=k+1) when k is
    even and says "no call" otherwise; continuations (token ids) are the model's own."""

    def __init__(self, inner, tok):
        self.inner, self.tok, self.pad_id, self.first = inner, tok, inner.pad_id, []

    def generate(self, prompts, params):
        if not isinstance(prompts[0], str):
            return self.inner.generate(prompts, params)
        self.first.append((list(prompts), params))
        resp = [ids_of(self.tok, inc_text(k + 1) if k % 2 == 0 else "no call") + [self.tok.eos_token_id]
                for _ in prompts for k in range(params.n)]
        return make_batch(self.tok, [ids_of(self.tok, p) for p in prompts], resp, params.n)

    def update_weights(self, model):
        pass


RECORDS = [{"prompt": [{"role": "user", "content": f"count from {s}"}], "start": s} for s in (1, 5, 9, 20)]


def _config(tmp_path, steps=2, **kw):
    ro = {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 96, "temperature": 1.0, **kw.pop("ro", {})}
    return RLConfig(estimator="grpo", steps=steps, output_dir=str(tmp_path / "run"), progress=False,
                    rollout=RolloutConfig(**ro), ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=4),
                    optim=OptimConfig(lr=1e-3), kl=KLConfig(coef=0.05, placement="loss", kind="k3"), **kw)


def _trainer(tmp_path, tok, factory=Counter, records=RECORDS, reward_fns=(counter_value,), **kw):
    tr = RLTrainer(_config(tmp_path, **kw), make_policy(tok), tok, reward_fns=list(reward_fns), prompts=records,
                   environment_factory=factory)
    tr.engine = Scripted(tr.engine, tok)
    return tr


# ----------------------------------------------------------------------------- TRL parity


def trl_env_methods(environment):
    """Transcribed from trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions
    (the per-rollout tool dicts)."""
    return [getattr(environment, member_name)
            for member_name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
            if member_name not in ("reset", "get_reward") and not member_name.startswith("_")]


def trl_prompt_after_reset(prompt, observation):
    """Transcribed from trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions
    (after ``environment.reset(**reset_kwargs)``)."""
    if observation is None:
        return prompt
    content = prompt[-1]["content"]
    if isinstance(observation, list) and isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(observation, str) and isinstance(content, list):
        observation = [{"type": "text", "text": observation}]
    return prompt[:-1] + [{**prompt[-1], "content": content + observation}]


def test_tools_of_an_environment_as_trl():
    env = Counter()
    ours = E.environment_tools(env)
    assert ours == trl_env_methods(env) and [m.__name__ for m in ours] == ["increment"]
    store = Store()
    assert E.environment_tools(store) == trl_env_methods(store)
    # a bound method describes itself like the function (self is not an argument)
    assert T.tool_schemas(ours)[0]["function"]["parameters"]["properties"] == {"by": {"type": "integer",
                                                                                     "description": "How much to add."}}


@pytest.mark.parametrize("obs", [None, " (at 3)", ""])
def test_observation_appended_as_trl(obs):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count", "name": "u"}]
    before = copy.deepcopy(chat)
    assert E.with_observation(chat, obs) == trl_prompt_after_reset(chat, obs)
    assert chat == before  # the record is left as it was
    assert E.with_observation("count", obs) == "count" + (obs or "")  # text prompts (TRL: chats only)
    with pytest.raises(TypeError, match="string or None"):
        E.with_observation(chat, 3)


def test_reset_kwargs_as_trl():
    """TRL resets with the dataset row (prompt and other columns); with several environments
    without the ``environment`` field that selects one."""
    fields = {"start": 3, "environment": "counter"}
    assert E.reset_kwargs("p", fields, multi=False) == {"prompt": "p", **fields}
    assert E.reset_kwargs("p", fields, multi=True) == {"prompt": "p", "start": 3}


def trl_reward_funcs(probes, reward_funcs):
    """Transcribed from trl/trainer/grpo_trainer.py, GRPOTrainer.__init__: one get_reward source
    per environment class that defines it (sync here), after the reward functions."""
    funcs, names, env_reward_types = list(reward_funcs), [f.__name__ for f in reward_funcs], []
    for instance in probes:
        has_reward = any(n == "get_reward" for n, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction))
        if has_reward and type(instance) not in env_reward_types:
            env_type = type(instance)
            env_reward_types.append(env_type)

            def get_reward(environments, _env_type=env_type, **kwargs):
                return [e.get_reward() if type(e) is _env_type else None for e in environments]

            funcs.append(get_reward)
            names.append(env_type.__name__)
    return funcs, names


def test_rewards_receive_environments_as_trl(tmp_path, tok):
    """The rewards of one rollout with two environments (counter prompts and store prompts):
    ours equal TRL's ``_calculate_rewards`` given the same instances, rows and columns."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    records = [{**r, "environment": "counter"} for r in RECORDS[:1]] + \
              [{"prompt": [{"role": "user", "content": "remember"}], "environment": "store", "start": 0}]
    tr = _trainer(tmp_path, tok, factory={"counter": Counter, "store": Store}, records=records,
                  reward_fns=(counter_value_or_none,), data=DataConfig(shuffle=False))
    batch, fields, extra = tr._generate(0)
    out = tr._score(batch, fields, extra)
    envs = extra["environments"]
    assert [type(e) for e in envs] == [Counter] * 4 + [Store] * 4
    funcs, names = trl_reward_funcs([Counter(), Store()], [counter_value_or_none])
    me = SimpleNamespace(accelerator=SimpleNamespace(device="cpu", is_main_process=True), reward_funcs=funcs,
                         reward_processing_classes=[None] * len(funcs), reward_func_names=names, environments=envs,
                         state=SimpleNamespace(global_step=0), args=SimpleNamespace(report_to=[]),
                         _log_completion_extra=None, _log_metric=None)
    inputs = [dict(r) for r in records for _ in range(4)]  # TRL's rows: each prompt's columns, repeated
    trl = GRPOTrainer._calculate_rewards(me, inputs, list(batch.prompt_texts), list(batch.response_texts),
                                         [[0]] * 8)
    assert names == ["counter_value_or_none", "Counter"] and tr.reward.names == names
    # TRL's None (the store answers of a counter-only source) is NaN, out of its nansum; ours 0
    for i, n in enumerate(names):
        torch.testing.assert_close(out.per_source[n], torch.nan_to_num(trl[:, i].float(), nan=0.0))
    assert trl[:4, 1].tolist() == [2.0, 1.0, 4.0, 1.0]  # start 1; answers 0 and 2 called increment(k + 1)
    assert out.total.tolist() == (trl.nan_to_num(0.0)).sum(1).tolist()


def counter_value_or_none(prompts, completions, environments, **kw):
    """The counter where the answer has one, else 0."""
    return [float(e.value) if isinstance(e, Counter) else 0.0 for e in environments]


# ----------------------------------------------------------------------------- the trainer


def test_each_answer_has_its_own_fresh_environment(tmp_path, tok):
    seen = []

    def spy(prompts, completions, environments, start, **kw):
        seen.append((list(environments), list(start), list(completions)))
        return [0.0] * len(completions)

    tr = _trainer(tmp_path, tok, reward_fns=(spy,))
    made = Counter.made
    data, m = tr.rollout()
    assert Counter.made - made == 8  # one fresh instance per answer, no pool
    envs, starts, completions = seen[0]
    assert len({id(e) for e in envs}) == 8
    for k, (e, s, c) in enumerate(zip(envs, starts, completions)):
        # reset with its own prompt's record; answers 0 and 2 of a group incremented theirs
        assert e.record["start"] == s and e.record["prompt"][0]["content"] == f"count from {s}"
        assert e.value == s + ((k % 4) + 1 if k % 2 == 0 else 0)
        assert ("<tool_response>" in c) == (k % 2 == 0)
    assert m["tools/call_count"] == 4 and m["tools/failure_frequency"] == 0.0
    # the prompts list the environment's tools (rendered as TRL: apply_chat_template(tools=...))
    first_prompts = tr.engine.first[0][0]
    chats = {json.dumps(r["prompt"]): r["prompt"] for r in RECORDS}
    for p in first_prompts:
        assert any(p == tok.apply_chat_template(c, tools=trl_env_methods(Counter()), tokenize=False,
                                                add_generation_prompt=True) for c in chats.values())
    assert '"name": "increment"' in first_prompts[0] and "explodes" not in first_prompts[0]


def test_grpo_with_a_counter_environment_runs(tmp_path, tok):
    tr = _trainer(tmp_path, tok)
    hist = tr.train()
    assert len(hist) == 2
    for m in hist:
        # the two sources read the same counters: the reward function and get_reward
        assert m["reward/counter_value"] == m["reward/Counter"] and m["reward/total"] == 2 * m["reward/Counter"]
        assert m["tools/call_count"] == 4
        assert all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if k.startswith("policy/"))


def test_environment_rollouts_are_deterministic_and_resume_exactly(tmp_path, tok):
    """Environments are re-created from the records for every rollout: a run resumed from a
    checkpoint equals the uninterrupted one (nothing of them is saved)."""
    a = _trainer(tmp_path / "a", tok, steps=2)
    ha = a.train()
    b = _trainer(tmp_path / "b", tok, steps=2, save_every=1)
    b.train(steps=1)
    cfg = b.config
    cfg.resume = cfg.output_dir
    c = RLTrainer(cfg, make_policy(tok), tok, reward_fns=[counter_value], prompts=RECORDS,
                  environment_factory=Counter)
    c.engine = Scripted(c.engine, tok)
    hc = c.train()
    assert len(hc) == 1 and len(ha) == 2  # step 2 alone, from the checkpoint of step 1

    def clean(m):
        return {k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per"))}

    assert clean(hc[-1]) == clean(ha[-1])
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def test_several_environments_each_with_its_tools(tmp_path, tok):
    records = [{**RECORDS[0], "environment": "counter"},
               {"prompt": [{"role": "user", "content": "remember"}], "environment": "store"}]
    tr = _trainer(tmp_path, tok, factory={"counter": Counter, "store": Store}, records=records,
                  reward_fns=(counter_value_or_none,), data=DataConfig(shuffle=False))
    # TRL's _env_tools: the standalone tools, then the environment's methods; only those in its prompt
    assert [t.__name__ for t in tr._env_tools["counter"]] == ["increment"]
    assert [t.__name__ for t in tr._env_tools["store"]] == ["get", "put"]
    assert '"increment"' in tr.prompts[0] and '"put"' not in tr.prompts[0]
    assert '"put"' in tr.prompts[1] and '"increment"' not in tr.prompts[1]
    data, m = tr.rollout()
    # the store's answers call increment, not one of its tools: failures, answered with an error
    assert m["tools/call_count"] == 4 and m["tools/failure_frequency"] == 0.5
    # the store's reset observation is appended to its prompt (the same for its 4 answers: one group)
    (prompts, params), = tr.engine.first
    assert prompts[1].count("remember (the store holds 0 keys)") == 1 and params.n == 4


class Numbered:
    """reset() tells each instance its own number: the answers of a prompt read different prompts."""

    n = 0

    def reset(self, **record):
        Numbered.n += 1
        return f" #{Numbered.n % 4}"

    def increment(self, by: int) -> int:
        """Add.

        Args:
            by: How much.
        """
        return by


def test_answers_with_different_observations_are_one_group(tmp_path, tok):
    Numbered.n = 0
    tr = _trainer(tmp_path, tok, factory=Numbered, reward_fns=(_n_chars,), data=DataConfig(shuffle=False),
                  ro={"per_sample_seeds": True})
    batch, fields, extra = tr._generate(0)
    (prompts, params), = tr.engine.first
    assert params.n == 1 and len(prompts) == 8 and len(params.sample_seeds) == 8
    assert [p.split("count from ")[1].split("<|im_end|>")[0] for p in prompts] == \
        [f"{s} #{k}" for s in (1, 5) for k in (1, 2, 3, 0)]
    assert batch.group_index.tolist() == [0] * 4 + [1] * 4
    assert list(batch.prompt_texts) == prompts
    out = tr._score(batch, fields, extra)
    assert out.total.shape == (8,)


def test_trl_convention_prompts_hold_the_observation(tmp_path, tok):
    """reward.calling_convention trl: each row's ``prompts`` entry is its record's messages with
    what its environment's reset() returned appended to the last one, as TRL's
    _generate_and_score_completions rebuilds them before _calculate_rewards."""
    from rlhf_fast.trainers.rl_config import RewardConfig

    seen = []

    def spy(prompts, completions, **kw):
        seen.extend(prompts)
        return [0.0] * len(completions)

    Numbered.n = 0
    tr = _trainer(tmp_path, tok, factory=Numbered, reward_fns=(spy,), data=DataConfig(shuffle=False),
                  reward=RewardConfig(calling_convention="trl"))
    batch, fields, extra = tr._generate(0)
    tr._score(batch, fields, extra)
    assert len(seen) == 8
    for row, p in enumerate(seen):
        assert isinstance(p, list) and p[-1]["content"].endswith(f" #{(row + 1) % 4}"), (row, p)
    records = [r["prompt"] for r in RECORDS[:2]]
    assert [p[-1]["content"] for p in seen] == [records[r // 4][-1]["content"] + f" #{(r + 1) % 4}" for r in range(8)]


# ----------------------------------------------------------------------------- chat_template_kwargs

# Qwen3's switch: with enable_thinking false the generation prompt holds an empty think block
THINK = TEMPLATE.replace(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


@pytest.fixture
def think_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = THINK
    return t


def test_template_kwargs_reach_prompts_and_tool_suffixes(tmp_path, think_tok):
    from trl.trainer.grpo_trainer import GRPOTrainer

    tok, kw = think_tok, {"enable_thinking": False}
    assert THINK != TEMPLATE
    chats = [r["prompt"] for r in RECORDS]
    tr = RLTrainer(_config(tmp_path, data=DataConfig(chat_template_kwargs=kw, shuffle=False)), make_policy(tok), tok,
                   reward_fns=[counter_value], prompts=RECORDS[:2], eval_prompts=RECORDS[2:],
                   environment_factory=Counter)
    tools = trl_env_methods(Counter())
    want = [tok.apply_chat_template(c, tools=tools, tokenize=False, add_generation_prompt=True, **kw) for c in chats]
    assert tr.prompts == want[:2] and tr.eval_prompts == want[2:]
    assert tok.apply_chat_template(chats[0], tools=tools, tokenize=False, add_generation_prompt=True) != want[0]
    assert want[0].endswith("<think>\n\n</think>\n\n")
    # the tool results appended to an answer: TRL's suffix with its chat_template_kwargs
    msgs = [{"role": "tool", "name": "increment", "content": "3"}]
    me = SimpleNamespace(processing_class=tok, _tokenizer=tok, _is_vlm=False, chat_template=None,
                         chat_template_kwargs=kw)
    suffix = GRPOTrainer._get_tool_suffix_ids(me, msgs)
    assert T.tool_suffix_ids(tok, msgs, chat_template_kwargs=kw) == suffix
    assert T.tool_suffix_ids(tok, msgs) != suffix
    tr.engine = Scripted(tr.engine, tok)
    batch, _, _ = tr._generate(0)
    P, row = batch.prompt_length, 0
    grown = batch.input_ids[row, P:][batch.attention_mask[row, P:].bool()].tolist()
    call = ids_of(tok, inc_text(1)) + [tok.eos_token_id]
    assert grown[:len(call)] == call
    assert grown[len(call):len(call) + len(suffix)] == T.tool_suffix_ids(tok, [{**msgs[0], "content": "2"}],
                                                                        chat_template_kwargs=kw)
    # evaluation renders and appends alike
    ev = tr.evaluate()
    assert tr.engine.first[-1][0] == want[2:] and ev["eval/tools/call_frequency"] == 1.0


def test_template_kwargs_config():
    from rlhf_fast.trainers.rl_cli import build_config

    cfg = build_config("grpo", ["none", "--data.chat_template_kwargs.enable_thinking", "false",
                                "--data.chat_template_kwargs.reasoning_effort", "low"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False, "reasoning_effort": "low"}
    assert build_config("grpo", ["none"]).data.chat_template_kwargs == {}
    with pytest.raises(ValueError, match=r"data\.chat_template_kwargs\.tools"):
        DataConfig(chat_template_kwargs={"tools": []})
    with pytest.raises(ValueError, match="data.chat_template_kwargs must be a mapping"):
        DataConfig(chat_template_kwargs=["enable_thinking"])


# ----------------------------------------------------------------------------- configuration


ENV_FILE = '''
class Counter:
    def reset(self, **record):
        self.value = int(record.get("start", 0))

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return self.value


class NoReset:
    def step(self, x: int) -> int:
        """Step.

        Args:
            x: X.
        """
        return x
'''


def test_environment_from_config_and_bad_input(tmp_path, tok):
    f = tmp_path / "envs.py"
    f.write_text(ENV_FILE)

    def make(factory=None, **ro):
        return RLTrainer(_config(tmp_path, ro=ro), make_policy(tok), tok, reward_fns=[counter_value],
                         prompts=RECORDS, environment_factory=factory)

    tr = make(environment_factory=f"{f}:Counter")
    assert type(tr._env_probes[None]).__name__ == "Counter" and '"increment"' in tr.prompts[0]
    with pytest.raises(ValueError, match=r"train prompt 0: .*'environment' field, one of \['a'\]; got None"):
        make(environment_factory={"a": f"{f}:Counter"})  # the records name no environment
    recs = [{**r, "environment": "a"} for r in RECORDS]
    tr = RLTrainer(_config(tmp_path, ro={"environment_factory": {"a": f"{f}:Counter"}}), make_policy(tok), tok,
                   reward_fns=[counter_value], prompts=recs)
    assert list(tr._env_tools) == ["a"] and '"increment"' in tr.prompts[0]
    with pytest.raises(ValueError, match="rollout.environment_factory.a"):
        make(environment_factory={"a": "no_such_module_xyz:C"})
    with pytest.raises(ValueError, match="rollout.environment_factory: expected 'module:Class'"):
        make(environment_factory=f"{f}:Nope")
    with pytest.raises(ValueError, match="both set"):
        make(Counter, environment_factory=f"{f}:Counter")
    with pytest.raises(ValueError, match="environment_factory: each environment must define a callable reset"):
        make(lambda: object())
    with pytest.raises(TypeError, match="environment_factory must be a callable"):
        make(3)
    with pytest.raises(ValueError, match=r"train prompt 0: .*'environment' field, one of \['a', 'b'\]"):
        make({"a": Counter, "b": Store})
    with pytest.raises(ValueError, match=r"method\(s\) \['increment'\] have the names of tools"):
        RLTrainer(_config(tmp_path), make_policy(tok), tok, reward_fns=[counter_value], prompts=RECORDS,
                  tools=[_increment], environment_factory=Counter)


def _increment(by: int) -> int:
    """Add.

    Args:
        by: How much.
    """
    return by


_increment.__name__ = "increment"


def test_get_reward_alone_is_a_reward_source(tmp_path, tok):
    tr = RLTrainer(_config(tmp_path), make_policy(tok), tok, prompts=RECORDS, environment_factory=Counter)
    assert tr.reward.names == ["Counter"]
    with pytest.raises(ValueError, match="no reward source"):
        RLTrainer(_config(tmp_path), make_policy(tok), tok, prompts=RECORDS, environment_factory=Store)


def test_no_environment_leaves_the_rollout_as_before(tmp_path, tok):
    """An environment whose reset returns None and whose method is the calculator: the rollout
    is the one with tools=[calculator], bit for bit (prompts, tokens, masks, log-probs)."""

    class Calc:
        def reset(self, **record):
            return None

        def calculator(self, expression: str) -> str:
            """Evaluate an arithmetic expression.

            Args:
                expression: The expression, e.g. "1+2".
            """
            return calculator(expression)

    from tests.test_rl_tools import CHATS, FirstCallScripted

    def run(**kw):
        tr = RLTrainer(_config(tmp_path, ro={"max_new_tokens": 60}), make_policy(tok), tok, reward_fns=[_n_chars],
                       prompts=CHATS, **kw)
        tr.engine = FirstCallScripted(tr.engine, tok)
        return tr.prompts, tr._generate(0)[0]

    (pa, a), (pb, b) = run(tools=[calculator]), run(environment_factory=Calc)
    assert pa == pb
    for k in a.__dataclass_fields__:
        if k == "tokens_per_second":  # (a timing)
            continue
        x, y = getattr(a, k), getattr(b, k)
        assert (x == y) if not isinstance(x, torch.Tensor) else torch.equal(x, y), k


def _n_chars(prompts, completions):
    return [float(len(c)) for c in completions]
