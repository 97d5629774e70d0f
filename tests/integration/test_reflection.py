"""Server reflection, asked as a real client would under both service names (v1 and v1alpha)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

SERVICES = {
    "bitserve.v1.Inference",
    "bitserve.v1.Admin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


@pytest.fixture(scope="module")
def srv(server_factory, tiny_models):
    return server_factory([{"name": "lm", "task": "generate", "path": str(tiny_models["lm"])}])


def _ask(target: str, version: str, *requests: reflection_pb2.ServerReflectionRequest):
    # v1 and v1alpha messages are field-for-field the same: only the method path differs.
    with grpc.insecure_channel(target) as ch:
        info = ch.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(info(iter(requests), timeout=10))


def _files(response) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in response.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_every_service(srv, version):
    (r,) = _ask(srv.target, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert {s.name for s in r.list_services_response.service} == SERVICES


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_finds_the_contract_by_its_path_and_by_symbol(srv, version):
    by_name, by_symbol = _ask(
        srv.target,
        version,
        reflection_pb2.ServerReflectionRequest(file_by_filename="bitserve/v1/inference.proto"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="bitserve.v1.Inference"),
    )
    for r in (by_name, by_symbol):
        assert not r.HasField("error_response"), r.error_response.error_message
        # The contract and what it imports (descriptor.proto, for its `since` options): a
        # reflection client needs every file to build the descriptors.
        files = {f.name: f for f in _files(r)}
        assert set(files) == {"bitserve/v1/inference.proto", "google/protobuf/descriptor.proto"}
        f = files["bitserve/v1/inference.proto"]
        assert f.package == "bitserve.v1"
        assert [m.name for m in f.service[0].method][:2] == ["Generate", "GenerateStream"]


def test_reflection_unknown_file_is_not_found(srv):
    (r,) = _ask(srv.target, "v1", reflection_pb2.ServerReflectionRequest(file_by_filename="nope.proto"))
    assert r.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
