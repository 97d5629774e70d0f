"""The committed stubs must be exactly what protos/ generates (run scripts/gen_protos.sh)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_committed_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Ibitserve_client/pb=protos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "protos/bitserve/v1/inference.proto",
        ],
        cwd=ROOT,
        check=True,
    )
    fresh = tmp_path / "bitserve_client/pb/bitserve/v1"
    committed = ROOT / "clients/python/bitserve_client/pb/bitserve/v1"
    drift = [f for f in GENERATED if not filecmp.cmp(fresh / f, committed / f, shallow=False)]
    assert not drift, f"stubs drift from protos/ ({drift}): run scripts/gen_protos.sh and commit"
