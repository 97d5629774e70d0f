"""LoRA adapters through the real server (gRPC front, engine process): a configured adapter
answers as the merged model does (a second model entry serves the `quantize export` merge of
the same adapter); an unknown adapter is NOT_FOUND naming it, never the base; the Admin service
hot-loads, lists and unloads (then NOT_FOUND); loading while 32 streams run loses none of them;
an evicted adapter reloads on request; the Admin service sits behind the token auth."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from bitserve_client import Client, NotFoundError
from bitserve_proto.v1 import inference_pb2 as pb
from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

from ..adapters import make_adapter, merged_checkpoint

PROMPTS = ["Hello world", "The quick brown fox jumps over", "I love", "la maison"]
N = 12


@pytest.fixture(scope="module")
def lora_dirs(tiny_chat_lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-srv")
    base = tiny_chat_lm
    dirs = {name: make_adapter(base, d / name, seed=seed) for name, seed in (("a", 11), ("b", 12), ("c", 13))}
    dirs["merged-a"] = merged_checkpoint(base, dirs["a"], d / "merged-a")
    return dirs


@pytest.fixture(scope="module")
def srv(server_factory, tiny_chat_lm, lora_dirs):
    return server_factory(
        [
            {
                "name": "lm",
                "task": "generate",
                "path": str(tiny_chat_lm),
                "adapters": {"a": str(lora_dirs["a"])},
                "max_resident_adapters": 2,
            },
            {"name": "merged", "task": "generate", "path": str(lora_dirs["merged-a"])},
        ]
    )


def gen(stub, model: str, text: str, adapter: str = "") -> str:
    p = pb.GenerationParameters(max_new_tokens=N)
    req = pb.GenerateRequest(texts=[text], model=model, parameters=p, adapter=adapter)
    (g,) = stub.Generate(req, timeout=120).generations
    return g.text


@pytest.fixture(scope="module")
def stubs(srv):
    with grpc.insecure_channel(srv.target) as ch:
        yield pb_grpc.InferenceStub(ch), pb_grpc.AdminStub(ch)


def test_configured_adapter_answers_as_the_merged_model(stubs):
    stub, _ = stubs
    for text in PROMPTS:
        assert gen(stub, "lm", text, "a") == gen(stub, "merged", text)
    assert [gen(stub, "lm", t) for t in PROMPTS] != [gen(stub, "merged", t) for t in PROMPTS]
    # chat takes it too
    msgs = [pb.ChatMessage(role="user", content="hi")]
    chat = stub.Chat(pb.ChatRequest(messages=msgs, model="lm", adapter="a"), timeout=120)
    ref = stub.Chat(pb.ChatRequest(messages=msgs, model="merged"), timeout=120)
    assert chat.generation.text == ref.generation.text


def test_unknown_adapter_is_not_found_never_the_base(stubs):
    stub, _ = stubs
    req = pb.GenerateRequest(texts=["hi"], model="lm", adapter="nope")
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(texts=["hi"], model="lm", adapter="bad name!"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_hot_load_request_unload_not_found(srv, stubs, lora_dirs):
    stub, admin = stubs
    base = gen(stub, "lm", PROMPTS[1])
    with Client(srv.target, timeout=120) as c:
        info = c.load_adapter("lm", "b", str(lora_dirs["b"]))
        assert (info.name, info.rank, info.resident) == ("b", 4, True)
        with_b = c.generate(PROMPTS[1], model="lm", adapter="b", max_new_tokens=N).text
        assert with_b != base
        listed = {m.name: [a.name for a in m.adapters] for m in c.list_models()}
        assert listed["lm"] == ["a", "b"] and listed["merged"] == []
        assert [a.name for a in c.list_adapters("lm")["lm"]] == ["a", "b"]
        # a third adapter with room for two: the least recently used one leaves the device,
        # and a request for it brings it back, answering as before
        c.load_adapter("lm", "c", str(lora_dirs["c"]))
        resident = {a.name: a.resident for a in c.list_adapters("lm")["lm"]}
        assert sum(resident.values()) == 2 and not resident["a"]
        assert c.generate(PROMPTS[0], model="lm", adapter="a", max_new_tokens=N).text == gen(
            stub, "merged", PROMPTS[0]
        )
        assert c.unload_adapter("lm", "b") == 0
        with pytest.raises(NotFoundError, match="'b'"):
            c.generate(PROMPTS[1], model="lm", adapter="b", max_new_tokens=N)
        with pytest.raises(NotFoundError):
            c.unload_adapter("lm", "b")
        c.unload_adapter("lm", "c")
    # what does not fit is FAILED_PRECONDITION with the reason; no model is NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        admin.LoadAdapter(
            pb.LoadAdapterRequest(model="lm", name="x", path=str(lora_dirs["merged-a"])), timeout=60
        )
    assert (
        e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "adapter_config.json" in e.value.details()
    )
    with pytest.raises(grpc.RpcError) as e:
        admin.LoadAdapter(pb.LoadAdapterRequest(model="zz", name="x", path=str(lora_dirs["b"])), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_loading_while_32_streams_run_loses_none(srv, stubs, lora_dirs):
    stub, admin = stubs
    jobs = [(PROMPTS[i % len(PROMPTS)], "a" if i % 2 else "") for i in range(32)]
    want = {(t, a): gen(stub, "lm", t, a) for t, a in set(jobs)}
    started = threading.Barrier(33)

    def run(job):
        text, adapter = job
        req = pb.GenerateRequest(
            texts=[text], model="lm", adapter=adapter, parameters=pb.GenerationParameters(max_new_tokens=N)
        )
        first, pieces, final = True, [], None
        for m in stub.GenerateStream(req, timeout=300):
            if first:
                first = False
                started.wait(timeout=120)
            pieces.append(m.text)
            if m.HasField("final"):
                final = m.final
        assert final is not None
        return "".join(pieces)

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(run, j) for j in jobs]
        started.wait(timeout=120)  # every stream has its first token: all are running
        admin.LoadAdapter(
            pb.LoadAdapterRequest(model="lm", name="hot", path=str(lora_dirs["b"])), timeout=120
        )
        got = [f.result(timeout=300) for f in futures]
    assert got == [want[j] for j in jobs]
    admin.UnloadAdapter(pb.UnloadAdapterRequest(model="lm", name="hot"), timeout=60)


def test_admin_is_behind_the_token_auth(server_factory, tiny_models, tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("s3cret\n")
    s = server_factory(
        [{"name": "lm", "task": "generate", "path": str(tiny_models["lm"])}], auth_tokens_file=str(f)
    )
    with grpc.insecure_channel(s.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.AdminStub(ch).ListAdapters(pb.ListAdaptersRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(s.target, token="s3cret", timeout=30) as c:
        assert c.list_adapters() == {"lm": []}


def test_metrics_carry_the_adapter_label_of_accepted_names_only(srv, stubs):
    import urllib.request

    stub, _ = stubs
    gen(stub, "lm", PROMPTS[0], "a")
    with pytest.raises(grpc.RpcError):
        gen(stub, "lm", PROMPTS[0], "never-loaded")
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30).read().decode()
    lines = [line for line in text.splitlines() if line.startswith("bitserve_adapter_")]
    assert any('adapter="a"' in line and "generated_tokens_total" in line for line in lines), lines
    assert not any("never-loaded" in line for line in lines)


def test_a_hot_loaded_adapter_survives_an_engine_restart(srv, lora_dirs):
    """Runs last in this module: it kills the engine process of model `lm`."""
    import os
    import signal
    import time

    core = srv.server.registry._engines["lm"].core
    with Client(srv.target, timeout=120) as c:
        c.load_adapter("lm", "kept", str(lora_dirs["c"]))
        before = c.generate(PROMPTS[2], model="lm", adapter="kept", max_new_tokens=N).text
        old = core.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while not (core.ready and core.pid != old) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert core.ready and core.pid != old
        assert c.generate(PROMPTS[2], model="lm", adapter="kept", max_new_tokens=N).text == before
        assert "kept" in [a.name for a in c.list_adapters("lm")["lm"]]
