"""Constrained decoding and the sampling controls (logit_bias, top_logprobs, n) at the engine
level: the generate front over the real engine loop on a thread (`LocalEngine`), tiny Llama."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import torch

from bitserve.engine import workers
from bitserve.errors import InvalidArgument
from bitserve.frontend.generate import CausalLMGenerateEngine
from bitserve.metrics import Metrics
from bitserve.settings import ModelSettings
from bitserve.types import Constraint, FinishReason, SamplingParams

PROMPTS = ["Hello world", "The quick brown fox jumps over", "I love"]
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


def _settings(path, persistent: bool = True) -> ModelSettings:
    return ModelSettings(name="lm", task="generate", path=str(path), persistent_batch=persistent)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return workers.load(_settings(tiny_models["lm"]))


@pytest.fixture(params=[True], ids=["persistent"])
async def engine(request, loaded, tiny_models):
    from bitserve.engine.workers import workers_for
    from bitserve.ipc.local import LocalEngine

    settings = _settings(tiny_models["lm"], request.param)
    core = LocalEngine(workers_for(loaded, [settings]))
    await core.start()
    e = CausalLMGenerateEngine(settings, loaded, Metrics(), core)
    e.scheduler = core.scheduler  # type: ignore[attr-defined]
    await e.start()
    yield e
    await e.stop()
    await core.stop()


def ids(gen) -> list[int]:
    return [t.id for t in gen.logprobs]


async def gen(engine, prompt: str, **kw):
    return (await engine.generate([prompt], SamplingParams(logprobs=True, **kw), deadline=None))[0]


def slow_steps(engine, seconds: float = 0.003) -> None:
    decode = engine.scheduler.lm.decode

    def slow(batch):
        time.sleep(seconds)
        return decode(batch)

    engine.scheduler.lm.decode = slow


# constraints ----------------------------------------------------------------------------------
async def test_constrained_and_free_rows_in_one_batch_equal_their_solo_runs(engine):
    schema = Constraint("json_schema", json.dumps(SCHEMA))
    regex = Constraint("regex", r"[a-z]{3}-[0-9]{2,4}")
    solo_json = await gen(engine, PROMPTS[0], max_new_tokens=60, constraint=schema)
    solo_regex = await gen(engine, PROMPTS[1], max_new_tokens=60, constraint=regex)
    solo_free = await gen(engine, PROMPTS[2], max_new_tokens=40)
    assert engine.scheduler.stats.max_running == 1
    slow_steps(engine)  # the free row decodes long enough for the others to join it
    free, js, rx = await asyncio.gather(
        gen(engine, PROMPTS[2], max_new_tokens=40),
        gen(engine, PROMPTS[0], max_new_tokens=60, constraint=schema),
        gen(engine, PROMPTS[1], max_new_tokens=60, constraint=regex),
    )
    assert engine.scheduler.stats.max_running == 3  # they really shared a batch
    assert ids(free) == ids(solo_free) and ids(js) == ids(solo_json) and ids(rx) == ids(solo_regex)
    # The greedy constrained output is valid and differs from what the model says unconstrained.
    assert js.finish_reason is FinishReason.EOS and rx.finish_reason is FinishReason.EOS
    value = json.loads(js.text)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", rx.text), rx.text
    # Logprobs stay those of the model's own distribution: the constrained row's first token
    # reports the log-softmax of unmasked logits, not 0 (what a renormalized mask would give).
    assert js.logprobs[0].logprob < 0


@pytest.mark.parametrize("seed", range(6))
async def test_sampled_choice_and_regex_outputs_match(engine, seed):
    options = ["red", "green", "blue sky", 'say "hi"']
    c = await gen(
        engine,
        PROMPTS[seed % 3],
        max_new_tokens=30,
        temperature=1.5,
        seed=seed,
        constraint=Constraint("choice", json.dumps(options)),
    )
    assert c.text in options and c.finish_reason is FinishReason.EOS
    pattern = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    r = await gen(
        engine,
        PROMPTS[0],
        max_new_tokens=30,
        temperature=1.0,
        seed=seed,
        constraint=Constraint("regex", pattern),
    )
    assert re.fullmatch(pattern, r.text), r.text


async def test_ebnf_grammar_and_json_object(engine):
    grammar = 'root ::= expr\nexpr ::= num | "(" expr ("+" | "*") expr ")"\nnum ::= [1-9]'
    g = await gen(
        engine,
        PROMPTS[0],
        max_new_tokens=120,
        temperature=1.0,
        seed=1,
        constraint=Constraint("grammar", grammar),
    )
    if g.finish_reason is FinishReason.EOS:
        assert re.fullmatch(r"[()+*1-9]+", g.text) and isinstance(eval(g.text), int)  # noqa: S307 - digits and + * ( ) only
    else:  # cut by max_new_tokens: says so, and used every token
        assert g.finish_reason is FinishReason.LENGTH and g.generated_tokens == 120


async def test_json_object_is_an_object_and_bias_works_within_the_mask(engine, loaded):
    # A random model writes strings that never close: cut by max_new_tokens, and says so.
    o = await gen(engine, PROMPTS[2], max_new_tokens=40, constraint=Constraint("json_object", ""))
    assert o.finish_reason is FinishReason.LENGTH and o.generated_tokens == 40 and o.text.startswith("{")
    # "}" forced where the grammar allows it: the shortest object. The bias cannot break the
    # mask (the first token must open the object although "}" is forced).
    close = loaded.tokenizer.convert_tokens_to_ids("}")
    c = await gen(
        engine,
        PROMPTS[2],
        max_new_tokens=10,
        constraint=Constraint("json_object", ""),
        logit_bias=((close, 100.0),),
    )
    assert c.text == "{}" and c.finish_reason is FinishReason.EOS and c.generated_tokens == 3  # {, }, EOS


async def test_sampled_json_strings_hold_no_raw_control_characters_or_special_tokens(engine, loaded):
    """xgrammar's JSON strings admit raw control bytes (strict JSON does not) and special tokens
    as literal text (which the front's decode drops); the engine bans both for JSON rows."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 30}}, "required": ["s"]}
    c = Constraint("json_schema", json.dumps(schema))
    gens = await asyncio.gather(
        *(
            gen(engine, PROMPTS[i % 3], max_new_tokens=80, temperature=1.5, seed=i, constraint=c)
            for i in range(16)
        )
    )
    for g in gens:
        assert g.finish_reason is FinishReason.EOS
        assert len(json.loads(g.text)["s"]) <= 30  # strict: raises on a raw control character
        assert g.text == loaded.tokenizer.decode(ids(g)[:-1], skip_special_tokens=False)


async def test_cut_by_max_new_tokens_says_length(engine):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 50}}, "required": ["s"]}
    g = await gen(
        engine, PROMPTS[0], max_new_tokens=8, constraint=Constraint("json_schema", json.dumps(schema))
    )
    assert g.finish_reason is FinishReason.LENGTH and g.generated_tokens == 8
    assert g.text.startswith('{"s"')


@pytest.mark.parametrize(
    ("kind", "value", "field"),
    [
        ("json_schema", "{not json", "parameters.constraint.json_schema is not valid JSON"),
        ("json_schema", '{"type": "no-such-type"}', "parameters.constraint.json_schema: does not compile"),
        ("regex", "(ab", "parameters.constraint.regex: does not compile"),
        ("grammar", "root ::= ", "parameters.constraint.grammar: does not compile"),
        ("choice", "[]", "parameters.constraint.choice must list at least one option"),
        ("cfg", "x", "parameters.constraint: kind must be one of"),
    ],
)
async def test_a_constraint_that_does_not_compile_is_invalid_argument_naming_the_field(
    engine, kind, value, field
):
    with pytest.raises(InvalidArgument, match=re.escape(field)):
        await gen(engine, PROMPTS[0], max_new_tokens=5, constraint=Constraint(kind, value))
    ok = await gen(engine, PROMPTS[0], max_new_tokens=3)  # the engine keeps serving
    assert ok.generated_tokens == 3


async def test_grammars_compile_once_per_text(engine):
    c = Constraint("json_schema", json.dumps(SCHEMA))
    await asyncio.gather(*(gen(engine, p, max_new_tokens=40, constraint=c) for p in PROMPTS))
    await gen(engine, PROMPTS[0], max_new_tokens=40, constraint=c)
    assert len(engine.scheduler.grammars.compile_s) == 1


# logit_bias, top_logprobs -------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_a_banned_token_never_appears_and_a_forced_one_does(engine, temperature):
    free = await gen(engine, PROMPTS[1], max_new_tokens=20, temperature=temperature, seed=2)
    banned = sorted(set(ids(free)))
    bias = tuple((t, -100.0) for t in banned)
    b = await gen(engine, PROMPTS[1], max_new_tokens=20, temperature=temperature, seed=2, logit_bias=bias)
    assert b.generated_tokens == 20 and not set(ids(b)) & set(banned)
    forced = 42
    f = await gen(
        engine, PROMPTS[1], max_new_tokens=6, temperature=temperature, seed=2, logit_bias=((forced, 100.0),)
    )
    assert ids(f) == [forced] * 6


async def test_logit_bias_checked_against_the_vocabulary(engine, loaded):
    vocab = len(loaded.tokenizer)
    with pytest.raises(InvalidArgument, match=f"token id {vocab} is not in"):
        await gen(engine, PROMPTS[0], max_new_tokens=2, logit_bias=((vocab, 1.0),))
    with pytest.raises(InvalidArgument, match=r"logit_bias\[3\] must be in \[-100, 100\]"):
        await gen(engine, PROMPTS[0], max_new_tokens=2, logit_bias=((3, 101.0),))


async def test_top_logprobs_are_the_model_log_softmax_top_k(engine, loaded):
    g = await gen(engine, PROMPTS[2], max_new_tokens=6, temperature=0.8, seed=5, top_logprobs=5)
    prompt = loaded.tokenizer(PROMPTS[2])["input_ids"]
    full = torch.tensor([prompt + ids(g)], device=loaded.device)
    with torch.inference_mode():
        logp = torch.log_softmax(loaded.model(input_ids=full).logits[0].float(), -1)
    for k, t in enumerate(g.logprobs):
        row = logp[len(prompt) - 1 + k]
        want = row.topk(5)
        assert [i for i, _, _ in t.top] == want.indices.tolist(), k
        # One float32 forward over <= 40 positions vs the KV-cached decode: the logits differ by
        # rounding (~1e-6 relative on |logit| ~ 30); 1e-4 on a log-probability is far above that.
        assert [v for _, _, v in t.top] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert [x for _, x, _ in t.top] == [loaded.tokenizer.decode([i]) for i in want.indices.tolist()]
        assert t.logprob == pytest.approx(float(row[t.id]), abs=1e-4)
    plain = await gen(engine, PROMPTS[2], max_new_tokens=3)
    assert all(t.top == () for t in plain.logprobs)


# n ----------------------------------------------------------------------------------------------
# Both batches prefill identical prompts admitted together once (2 prefill rows for 6
# completions; the front sends a request's completions in one message, so they are admitted
# together): the copying batch copies the rows, the slot batch copies the KV into n slots.
@pytest.mark.parametrize("engine", [True, False], ids=["persistent", "copying"], indirect=True)
async def test_n_completions_share_one_prefill_and_each_equals_its_single_run(engine, loaded):
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=10, n=3, logprobs=True)
    rows_before = engine.scheduler.stats.prefill_rows
    gens = await engine.generate(PROMPTS[:2], sampled, deadline=None)
    assert engine.scheduler.stats.prefill_rows - rows_before == 2
    assert len(gens) == 6
    for i, p in enumerate(PROMPTS[:2]):
        for j in range(3):
            single = await gen(engine, p, max_new_tokens=12, temperature=1.0, seed=10 + j)
            g = gens[i * 3 + j]
            assert ids(g) == ids(single), (i, j)
            assert g.prompt_tokens == len(loaded.tokenizer(p)["input_ids"])
            assert g.generated_tokens == len(g.logprobs) == 12
    assert len({g.text for g in gens[:3]}) > 1  # the completions differ
    greedy = await engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, n=4), deadline=None)
    assert len({g.text for g in greedy}) == 1 and len(greedy) == 4


async def test_n_is_checked_and_streams_take_one(engine):
    with pytest.raises(InvalidArgument, match=r"parameters.n must be in \[1, 32\]"):
        await engine.generate(PROMPTS[:1], SamplingParams(n=33), deadline=None)
    with pytest.raises(InvalidArgument, match="a stream carries one completion"):
        async for _ in engine.generate_stream(PROMPTS[0], SamplingParams(n=2), deadline=None):
            pass


@pytest.mark.parametrize("vocab", [1000, 1024, 49152])
def test_cpu_ban_equals_xgrammar_kernel(vocab):
    """The CPU mask path (numpy-unpacked bits, one masked_fill_) bans exactly the tokens
    xgrammar's own kernel bans: random words (sign bit included), a vocabulary that is not a
    multiple of 32, and an all-ones row (a row no grammar fills) that must lose nothing."""
    import xgrammar as xgr

    from bitserve.engine.worker.logits import ban_cpu

    g = torch.Generator().manual_seed(vocab)
    rows = 6
    bitmask = xgr.allocate_token_bitmask(rows, vocab)
    words = bitmask.shape[1]
    bitmask[:-1] = torch.randint(-(2**31), 2**31, (rows - 1, words), generator=g, dtype=torch.int64).to(
        torch.int32
    )
    logits = torch.randn(rows, vocab, generator=g)
    mine, theirs = logits.clone(), logits.clone()
    ban_cpu(mine, bitmask)
    xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab)
    assert torch.equal(mine, theirs)
    assert torch.equal(mine[-1], logits[-1])
    # Token t is banned iff bit t % 32 of word t // 32 is clear.
    t = torch.arange(vocab)
    allowed = (bitmask[0, t // 32].long() >> (t % 32)) & 1
    assert torch.equal(torch.isinf(mine[0]), allowed == 0)
