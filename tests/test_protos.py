"""The committed stubs: exactly what protos/ generates, named as the contract, importable on the pins.

The fresh-venv test installs the lowest grpcio and protobuf that pyproject allows from the package
registry (bounded by a timeout, marked `registry`; CI runs it) and imports the stubs there alone.
"""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PB = ROOT / "clients/python/bitserve_proto"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def _floor(name: str, pyproject: Path) -> tuple[int, ...]:
    # requires-python allows 3.10 (no tomllib): the dependency lines are simple enough for a regex.
    m = re.search(rf'^\s*"{re.escape(name)}>=([0-9.]+)[",]', pyproject.read_text(), re.M)
    assert m, f"{pyproject.relative_to(ROOT)} has no {name}>= lower bound"
    return tuple(int(x) for x in m.group(1).split("."))


def _gencode_versions() -> tuple[tuple[int, ...], tuple[int, ...]]:
    pb2 = (PB / "v1/inference_pb2.py").read_text()
    grpc_py = (PB / "v1/inference_pb2_grpc.py").read_text()
    protobuf = re.search(r"# Protobuf Python Version: ([0-9.]+)", pb2).group(1)  # type: ignore[union-attr]
    grpc = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_py).group(1)  # type: ignore[union-attr]
    return tuple(map(int, protobuf.split("."))), tuple(map(int, grpc.split(".")))


def test_committed_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(
        ["bash", "scripts/gen_protos.sh", str(tmp_path)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = tmp_path / "v1"
    committed = PB / "v1"
    drift = [f for f in GENERATED if not filecmp.cmp(fresh / f, committed / f, shallow=False)]
    assert not drift, f"stubs drift from protos/ ({drift}): run scripts/gen_protos.sh and commit"


def test_descriptor_file_name_is_the_contract_path():
    from bitserve_proto.v1 import inference_pb2 as pb
    from bitserve_proto.v1 import inference_pb2_grpc as pb_grpc

    assert pb.DESCRIPTOR.name == "bitserve/v1/inference.proto"
    assert (ROOT / "protos" / pb.DESCRIPTOR.name).is_file()
    # Messages belong to the stub package's module (pickling, repr), not to a top-level `bitserve`.
    assert pb.GenerateRequest.__module__ == "bitserve_proto.v1.inference_pb2"
    assert pb_grpc.InferenceStub is not None and "bitserve.v1" not in sys.modules


@pytest.mark.parametrize("pyproject", ["pyproject.toml", "clients/python/pyproject.toml"])
def test_pyproject_floors_are_what_the_stubs_need(pyproject):
    # The stubs refuse an older runtime than the one that generated them (and accept newer ones),
    # so the honest lower bound is exactly the generator's version, in the client's distribution
    # and in the server's (which imports the same stubs).
    protobuf, grpc = _gencode_versions()
    path = ROOT / pyproject
    assert _floor("protobuf", path) == protobuf, (
        f"{pyproject} must say protobuf>={'.'.join(map(str, protobuf))}"
    )
    assert _floor("grpcio", path) == grpc, f"{pyproject} must say grpcio>={'.'.join(map(str, grpc))}"


def test_the_server_pins_the_client_distribution_of_this_checkout():
    # One copy of the stubs: the server imports bitserve_proto from bitserve-client, so it must
    # require exactly the version that clients/python builds.
    client = re.search(r'^version = "([^"]+)"', (ROOT / "clients/python/pyproject.toml").read_text(), re.M)
    assert client, "clients/python/pyproject.toml has no version"
    pin = re.search(r'^\s*"bitserve-client==([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert pin and pin.group(1) == client.group(1), (
        f'pyproject.toml must say "bitserve-client=={client.group(1)}"'
    )


def test_the_contract_revision_covers_every_addition():
    # Every field and RPC marked `since` was added at or before the file's revision, and the
    # fields that report versions are marked with the revision that added them.
    from bitserve_client import contract
    from bitserve_proto.v1 import inference_pb2 as pb

    marks = [contract.field_since(f) for m in pb.DESCRIPTOR.message_types_by_name.values() for f in m.fields]
    marks += [
        contract.method_since(name) for name in pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name
    ]
    assert contract.REVISION >= 2 and max(marks) == contract.REVISION and min(marks) == 1
    versions = pb.ListModelsResponse.DESCRIPTOR.fields_by_name
    assert (
        contract.field_since(versions["server_version"])
        == contract.field_since(versions["contract_revision"])
        == 2
    )


@pytest.mark.registry
@pytest.mark.timeout(420)
def test_stubs_import_with_only_grpcio_and_the_lowest_protobuf(tmp_path):
    protobuf, grpc = _gencode_versions()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin/python"
    pins = [f"protobuf=={'.'.join(map(str, protobuf))}", f"grpcio=={'.'.join(map(str, grpc))}"]
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:", *pins],
        check=True,
        timeout=300,
    )
    # Only the stubs' folder on the path: no server, no grpcio-tools, nothing else of ours.
    stubs_root = tmp_path / "client"
    stubs_root.mkdir()
    subprocess.run(["cp", "-r", str(PB), str(stubs_root / "bitserve_proto")], check=True)
    code = (
        "import google.protobuf, grpc\n"
        "from bitserve_proto.v1 import inference_pb2 as pb, inference_pb2_grpc as g\n"
        "print(google.protobuf.__version__, grpc.__version__, pb.DESCRIPTOR.name,"
        " pb.GenerateRequest(texts=['x']).SerializeToString().hex(), g.InferenceStub.__name__)\n"
    )
    out = subprocess.run(
        [py, "-c", code],
        cwd=stubs_root,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(stubs_root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        pins[0].split("==")[1],
        pins[1].split("==")[1],
        "bitserve/v1/inference.proto",
        "0a0178",
        "InferenceStub",
    ]
