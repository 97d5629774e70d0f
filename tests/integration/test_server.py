"""A real in-process gRPC server on a free port, over tiny real checkpoints, through the client."""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bitserve_client import (
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)

PROMPTS = ["Hello world", "The quick brown fox jumps over", "Once upon a time"]


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models):
    m = tiny_models
    return server_factory(
        [
            {"name": "lm", "task": "generate", "path": str(m["lm"])},
            {"name": "lm-int8", "task": "generate", "path": str(m["lm"]), "quantize": "int8"},
            {"name": "lm-nf4", "task": "generate", "path": str(m["lm"]), "quantize": "nf4"},
            {"name": "topics", "task": "classify", "path": str(m["topics"]), "max_batch_delay_ms": 20},
            {"name": "topics-nf4", "task": "classify", "path": str(m["topics"]), "quantize": "nf4"},
            {"name": "tags", "task": "classify", "path": str(m["tags"]), "max_queue_size": 4},
            {"name": "sent", "task": "sentiment", "path": str(m["sentiment"])},
            {"name": "t5", "task": "translate", "path": str(m["t5"])},
        ],
        max_texts_per_request=64,
    )


@pytest.fixture(scope="module")
def client(srv):
    with Client(srv.target, timeout=120) as c:
        yield c


def engine(srv, name):
    return srv.server.registry._engines[name]


# ListModels, health, reflection ---------------------------------------------------------------
def test_list_models_reports_quantization_and_smaller_memory(client, tiny_models):
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models["lm"]).parameters())
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"lm", "lm-int8", "lm-nf4", "topics", "topics-nf4", "tags", "sent", "t5"}
    lm = models["lm"]
    assert (lm.task, lm.quantization, lm.dtype, lm.device) == ("generate", "none", "float32", "cpu")
    assert lm.parameter_count == n_params and lm.ready and lm.architecture == "LlamaForCausalLM"
    assert models["lm-int8"].quantization == "int8" and models["lm-nf4"].quantization == "nf4"
    assert models["lm-int8"].memory_bytes < lm.memory_bytes
    assert models["lm-nf4"].memory_bytes < models["lm-int8"].memory_bytes
    assert models["topics-nf4"].memory_bytes < models["topics"].memory_bytes
    assert models["lm-nf4"].parameter_count == lm.parameter_count
    assert models["topics"].labels == ("business", "sports", "politics", "tech")
    assert models["sent"].labels == ("NEGATIVE", "POSITIVE")
    assert models["t5"].task == "translate"


def test_health_overall_and_per_model(srv):
    with grpc.insecure_channel(srv.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "bitserve.v1.Inference", "lm", "t5"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_not_serving_until_the_model_is_loaded(tiny_models, monkeypatch):
    from bitserve.frontend import registry
    from tests.conftest import RunningServer

    gate = threading.Event()
    original = registry.load_front

    def slow_load(*args, **kwargs):
        gate.wait(30)
        return original(*args, **kwargs)

    # The front's half of loading (tokenizer, config) gates readiness as the engine's does.
    monkeypatch.setattr(registry, "load_front", slow_load)
    from bitserve.settings import build_settings

    settings = build_settings(
        config_data={
            "server": {"host": "127.0.0.1", "port": 0, "metrics_port": -1},
            "models": [{"name": "slow", "task": "classify", "path": str(tiny_models["topics"])}],
        },
        environ={},
    )

    class Lazy(RunningServer):
        def __init__(self, settings):
            import asyncio

            from bitserve.api.server import Server

            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self._thread.start()
            self.server = Server(settings)
            self.run(self.server.start(wait_until_loaded=False))
            self.target = f"127.0.0.1:{self.server.port}"

    s = Lazy(settings)
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "slow"):
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with (
                Client(s.target, timeout=10) as c,
                pytest.raises(UnavailableError, match="model 'slow' is still loading; retry shortly"),
            ):
                c.classify("hi", model="slow")
            gate.set()
            s.run(s.server.wait_loaded())
            for service in ("", "slow"):
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        s.stop()


def test_reflection_lists_services(srv):
    with grpc.insecure_channel(srv.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"bitserve.v1.Inference", "grpc.health.v1.Health"} <= names


# Classify / Sentiment -------------------------------------------------------------------------
def _reference_probs(path, texts, sigmoid=False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding in the reference
            logits = model(**tok(t, return_tensors="pt")).logits[0]
            out.append((torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)).tolist())
    return out, [model.config.id2label[i] for i in range(model.config.num_labels)]


def test_classify_matches_in_process_forward(client, tiny_models):
    texts = ["The team won the match", "Stocks fell sharply today after the long weekend", "hi"]
    ref, labels = _reference_probs(tiny_models["topics"], texts)
    results = client.classify(texts, model="topics")
    assert len(results) == 3
    for res, probs in zip(results, ref):
        assert len(res) == 4
        assert [r.score for r in res] == sorted((r.score for r in res), reverse=True)
        got = {r.label: r.score for r in res}
        for label, p in zip(labels, probs):
            assert got[label] == pytest.approx(p, abs=1e-4)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-4)
    single = client.classify(texts[0], model="topics", top_k=2)
    assert [r.label for r in single] == [r.label for r in results[0][:2]]


def test_multi_label_classifier_uses_sigmoid(client, tiny_models):
    texts = ["red and blue", "green"]
    ref, labels = _reference_probs(tiny_models["tags"], texts, sigmoid=True)
    results = client.classify(texts, model="tags")
    for res, probs in zip(results, ref):
        got = {r.label: r.score for r in res}
        for label, p in zip(labels, probs):
            assert got[label] == pytest.approx(p, abs=1e-4)


def test_sentiment_normalizes_labels(client, tiny_models):
    texts = ["I love this movie", "This was terrible"]
    ref, labels = _reference_probs(tiny_models["sentiment"], texts)
    results = client.sentiment(texts)  # the only sentiment model: name may be omitted
    for res, probs in zip(results, ref):
        i = max(range(len(probs)), key=probs.__getitem__)
        assert res.raw_label == labels[i]
        assert res.label == labels[i].lower()
        assert res.score == pytest.approx(probs[i], abs=1e-4)
    assert client.sentiment("fine").label in {"positive", "negative"}


def test_sentiment_with_unmappable_labels_is_a_clear_error(tiny_models):
    from bitserve.engine.workers import load
    from bitserve.errors import ConfigError
    from bitserve.frontend.classify import HeadSentimentEngine
    from bitserve.metrics import Metrics
    from bitserve.settings import ModelSettings

    ms = ModelSettings(name="x", task="sentiment", path=str(tiny_models["tags"]))
    with pytest.raises(ConfigError, match="cannot map labels"):
        HeadSentimentEngine(ms, load(ms), Metrics(), None)


# Translate -------------------------------------------------------------------------------------
def test_translate_equals_transformers_generate(client, tiny_models):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = tiny_models["t5"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    texts = ["the house is blue", "hello world"]
    got = client.translate(texts, source_lang="en", target_lang="fr", max_new_tokens=12)
    for text, res in zip(texts, got):
        enc = tok("translate English to French: " + text, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=12)
        assert res.text == tok.decode(ref[0], skip_special_tokens=True).strip()
    assert (
        client.translate("hello world", source_lang="en", target_lang="fr", max_new_tokens=12).text
        == got[1].text
    )
    with pytest.raises(InvalidArgumentError, match="source_lang and target_lang are required"):
        client.translate("hello")
    with pytest.raises(InvalidArgumentError, match="target_lang: unknown language code 'xx'"):
        client.translate("hello", source_lang="en", target_lang="xx")


# Generate ---------------------------------------------------------------------------------------
def _reference_generate(path, prompt, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist(), tok


def test_greedy_generation_equals_transformers_generate(client, tiny_models):
    for prompt in PROMPTS:
        ids, tok = _reference_generate(tiny_models["lm"], prompt, 12)
        g = client.generate(prompt, model="lm", max_new_tokens=12, logprobs=True)
        got_ids = [t.id for t in g.logprobs]
        assert got_ids == ids[: len(got_ids)]
        if len(got_ids) < len(ids):
            assert g.finish_reason == "eos"
        else:
            assert g.finish_reason == "length" and g.tokens == 12
        assert g.text == tok.decode(got_ids, skip_special_tokens=True)
        assert g.prompt_tokens == len(tok(prompt)["input_ids"])
    batch = client.generate(PROMPTS, model="lm", max_new_tokens=12)
    assert [b.text for b in batch] == [
        client.generate(p, model="lm", max_new_tokens=12).text for p in PROMPTS
    ]


def _reference_scores(path, prompt, n, quantize):
    """Greedy ids and each chosen token's log-probability from transformers at `quantize`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitserve.models.quantization import bnb_config

    tok = AutoTokenizer.from_pretrained(path)
    q = {} if quantize == "none" else {"quantization_config": bnb_config(quantize), "device_map": {"": "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **q).eval()
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(
        **enc, max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    ids = out.sequences[0, enc["input_ids"].shape[1] :].tolist()
    return ids, [torch.log_softmax(s[0].float(), -1)[i].item() for s, i in zip(out.scores, ids)]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_generation_equals_transformers_at_that_precision(client, tiny_models, mode):
    """The served tokens and log-probabilities are those of the bitsandbytes model, not fp32's."""
    ids, lps = _reference_scores(tiny_models["lm"], "Hello world", 8, mode)
    _, fp32_lps = _reference_scores(tiny_models["lm"], "Hello world", 8, "none")
    g = client.generate("Hello world", model=f"lm-{mode}", max_new_tokens=8, logprobs=True)
    # This prompt decodes all 8 tokens without EOS at every precision.
    assert (g.finish_reason, g.tokens) == ("length", 8)
    assert [t.id for t in g.logprobs] == ids
    got = [t.logprob for t in g.logprobs]
    assert got == pytest.approx(lps, abs=2e-3)
    # ...and quantization really happened: fp32 log-probabilities differ by more than that.
    assert max(abs(a - b) for a, b in zip(got, fp32_lps)) > 1e-2


def test_generate_stream_yields_tokens_then_final(client):
    events = list(client.generate_stream("Hello world", model="lm", max_new_tokens=8))
    assert [e.final is None for e in events] == [True] * (len(events) - 1) + [False]
    final = events[-1].final
    assert "".join(e.text for e in events) == final.text
    unary = client.generate("Hello world", model="lm", max_new_tokens=8)
    assert final.text == unary.text and final.tokens == unary.tokens


@pytest.mark.parametrize("n", [1, 4, 6])
def test_stream_pieces_add_up_to_the_final_text(client, n):
    """A stream's pieces concatenate to the final text, whatever token the length cap falls on."""
    events = list(client.generate_stream("Hello world", model="lm", max_new_tokens=n, logprobs=True))
    final = events[-1].final
    assert final.finish_reason == "length" and final.tokens == n
    assert [t.id for e in events for t in e.tokens] == [t.id for t in final.logprobs]
    assert "".join(e.text for e in events) == final.text


# Errors ----------------------------------------------------------------------------------------
def test_error_codes_and_server_keeps_serving(client, srv):
    with pytest.raises(NotFoundError, match="model 'nope' is not loaded"):
        client.classify("x", model="nope")
    with pytest.raises(FailedPreconditionError, match="serves task 'classify', not 'generate'"):
        client.generate("x", model="topics")
    with pytest.raises(InvalidArgumentError, match="several models serve 'classify'"):
        client.classify("x")
    with pytest.raises(InvalidArgumentError, match=r"texts\[1\] is empty"):
        client.classify(["ok", "  "], model="topics")
    with pytest.raises(InvalidArgumentError, match="texts: at least one text"):
        client.classify([], model="topics")
    with pytest.raises(InvalidArgumentError, match="65 texts exceed the limit of 64"):
        client.classify(["a"] * 65, model="topics")
    with pytest.raises(InvalidArgumentError, match=r"parameters.top_p must be in \(0, 1\]"):
        client.generate("x", model="lm", top_p=1.5)
    with pytest.raises(InvalidArgumentError, match="parameters.temperature"):
        client.generate("x", model="lm", temperature=-1)
    with pytest.raises(
        InvalidArgumentError, match=r"texts\[0\] is \d+ tokens; model 'topics' accepts at most 128"
    ):
        client.classify("word " * 400, model="topics")
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        client.generate("Hello", model="lm", max_new_tokens=5000)
    with pytest.raises(InvalidArgumentError, match="candidate_labels"):
        client.classify("x", model="topics", candidate_labels=["a", "b"])
    with pytest.raises(InvalidArgumentError, match="5 texts can never fit model 'tags'"):
        client.classify(["a"] * 5, model="tags")
    # still serving after every error
    assert client.classify("still here", model="topics")[0].score > 0
    assert client.generate("Hello", model="lm", max_new_tokens=2).tokens >= 1


def test_expired_deadline_does_not_run_the_model(srv, tiny_models, server_factory):
    slow = server_factory(
        [
            {
                "name": "slow",
                "task": "classify",
                "path": str(tiny_models["topics"]),
                "max_batch_delay_ms": 3000,
                "max_batch_size": 64,
            }
        ],
        metrics_port=-1,
    )
    batcher = slow.server.registry._engines["slow"]._batcher
    before = batcher.stats.items
    with Client(slow.target) as c:
        with pytest.raises(DeadlineExceededError):
            c.classify("x", timeout=0.3)
        time.sleep(3.5)  # past the batch delay: the expired text must have been dropped
        assert batcher.stats.items == before
        assert c.classify("y", timeout=30)[0].label


# Batching + metrics ----------------------------------------------------------------------------
def _scrape(srv) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    return {f.name: f for f in text_string_to_metric_families(body)}


def _value(fams, family, sample_name, **labels) -> float:
    return sum(
        s.value
        for s in fams[family].samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_concurrent_classify_calls_share_batches_and_metrics_show_it(client, srv, tiny_models):
    texts = [f"text number {i}" for i in range(32)]
    ref, labels = _reference_probs(tiny_models["topics"], texts)
    batcher = engine(srv, "topics")._batcher
    batches_before, items_before = batcher.stats.batches, batcher.stats.items
    sizes_before = len(batcher.stats.sizes)
    before = _scrape(srv)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda t: client.classify(t, model="topics"), texts))
    # Each caller gets the answer for its own text, not a batch neighbour's.
    for res, probs in zip(results, ref):
        got = {r.label: r.score for r in res}
        assert [got[label] for label in labels] == pytest.approx(probs, abs=1e-4)
    batches = batcher.stats.batches - batches_before
    assert batcher.stats.items - items_before == 32
    sizes = batcher.stats.sizes[sizes_before:]
    assert sum(sizes) == 32 and len(sizes) == batches
    assert batches < 32 and max(sizes) > 1

    after = _scrape(srv)
    for name in (
        "bitserve_requests",
        "bitserve_request_duration_seconds",
        "bitserve_queue_wait_seconds",
        "bitserve_batch_size",
        "bitserve_queue_depth",
        "bitserve_generated_tokens",
        "bitserve_time_to_first_token_seconds",
        "bitserve_model_weight_memory_bytes",
    ):
        assert name in after, name

    def delta(family, sample_name, **labels):
        return _value(after, family, sample_name, **labels) - _value(before, family, sample_name, **labels)

    ok = {"model": "topics", "code": "OK"}
    assert delta("bitserve_requests", "bitserve_requests_total", **ok) == 32
    assert (
        delta("bitserve_request_duration_seconds", "bitserve_request_duration_seconds_count", model="topics")
        == 32
    )
    assert delta("bitserve_batch_size", "bitserve_batch_size_count", model="topics") == batches
    assert delta("bitserve_batch_size", "bitserve_batch_size_sum", model="topics") == 32
    assert _value(
        after, "bitserve_model_weight_memory_bytes", "bitserve_model_weight_memory_bytes", model="lm-nf4"
    ) == (engine(srv, "lm-nf4").loaded.memory_bytes)


def test_metrics_count_errors_and_generated_tokens(client, srv):
    before = _scrape(srv)
    with pytest.raises(NotFoundError):
        client.classify("x", model="nope")
    g = client.generate("Hello world", model="lm", max_new_tokens=6)
    after = _scrape(srv)

    def delta(family, sample_name, **labels):
        return _value(after, family, sample_name, **labels) - _value(before, family, sample_name, **labels)

    # An unknown name is no label value (a client could add series without bound).
    assert delta("bitserve_requests", "bitserve_requests_total", model="(unresolved)", code="NOT_FOUND") == 1
    assert delta("bitserve_generated_tokens", "bitserve_generated_tokens_total", model="lm") == g.tokens
    ttft = "bitserve_time_to_first_token_seconds"
    assert delta(ttft, ttft + "_count", model="lm") == 1


async def test_async_client(srv):
    from bitserve_client import AsyncClient, NotFoundError

    # The sync client's answers are checked against transformers above: the async one must agree.
    with Client(srv.target, timeout=60) as sync:
        want = (
            sync.classify("The team won", model="topics"),
            sync.sentiment(["good", "bad"]),
            sync.generate("Hello world", model="lm", max_new_tokens=6),
            sync.translate("hello", source_lang="en", target_lang="fr"),
            {m.name for m in sync.list_models()},
            list(sync.generate_stream("Hello world", model="lm", max_new_tokens=6)),
        )
    async with AsyncClient(srv.target, timeout=60) as c:
        assert await c.classify("The team won", model="topics") == want[0]
        assert await c.sentiment(["good", "bad"]) == want[1]
        g = await c.generate("Hello world", model="lm", max_new_tokens=6)
        assert g == want[2]
        pieces = [ev async for ev in c.generate_stream("Hello world", model="lm", max_new_tokens=6)]
        # Piece boundaries depend on timing (a slower reader gets tokens grouped); what they add
        # up to and the final result do not.
        assert "".join(p.text for p in pieces) == "".join(p.text for p in want[5]) == g.text
        assert pieces[-1].final == want[5][-1].final == g
        assert await c.translate("hello", source_lang="en", target_lang="fr") == want[3]
        assert {m.name for m in await c.list_models()} == want[4]
        with pytest.raises(NotFoundError, match="model 'missing' is not loaded"):
            await c.generate("x", model="missing")


def test_cancelled_grpc_stream_stops_decoding(client, srv):
    sched = engine(srv, "lm").core  # the front's view of the engine process
    # Left alone, this prompt decodes all 100 tokens (no EOS): an early end can only be the cancel.
    assert client.generate("Once upon a time", model="lm", max_new_tokens=100).finish_reason == "length"
    stream = client.generate_stream("Once upon a time", model="lm", max_new_tokens=100)
    first = [next(stream) for _ in range(2)]
    assert all(ev.final is None for ev in first)
    stream.close()  # the client cancels the call
    deadline = time.monotonic() + 10
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sched.running == 0, "a cancelled stream must leave the batch"
    steps = sched.steps
    time.sleep(0.3)
    assert sched.steps == steps, "nothing may keep decoding after the cancel"


def test_stream_deadline_ends_generation_with_deadline_exceeded(client, srv):
    sched = engine(srv, "lm").core
    with pytest.raises(DeadlineExceededError):
        for _ in client.generate_stream(
            "Once upon a time", model="lm", max_new_tokens=100, temperature=1.0, timeout=0.05
        ):
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sched.running == 0
