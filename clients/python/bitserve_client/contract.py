"""Contract revisions: what a request needs of the server, and the error when the server is older.

The revision lives in the contract itself (`option (contract_revision)` in inference.proto), and
every field or RPC added after revision 1 carries `[(since) = N]`. A proto3 server drops fields
it does not know without a word, so before sending a request that sets such a field, a client
asks the server's revision once (ListModels) and refuses to send what the server would drop.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from bitserve_proto.v1 import inference_pb2 as pb

from .errors import IncompatibleServerError

FIRST = 1
REVISION: int = pb.DESCRIPTOR.GetOptions().Extensions[pb.contract_revision]


def client_version() -> str:
    try:
        return metadata.version("bitserve-client")
    except metadata.PackageNotFoundError:  # imported from a source tree that was not installed
        return "unknown"


def field_since(f: FieldDescriptor) -> int:
    return f.GetOptions().Extensions[pb.since] or FIRST


def method_since(rpc: str) -> int:
    for service in pb.DESCRIPTOR.services_by_name.values():  # Inference, Admin
        if rpc in service.methods_by_name:
            return service.methods_by_name[rpc].GetOptions().Extensions[pb.method_since] or FIRST
    raise KeyError(rpc)


def _added(message: Message, prefix: str) -> Iterator[tuple[str, int]]:
    """(path, revision) of each set field, nested ones included, added after revision 1."""
    for f, value in message.ListFields():
        path = f"{prefix}.{f.name}"
        if field_since(f) > FIRST:
            yield path, field_since(f)
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        for item in value if f.is_repeated else (value,):
            yield from _added(item, path)


def added(rpc: str, request: Message) -> list[tuple[str, int]]:
    """(what, revision) of each part of this call that came after revision 1."""
    late = list(_added(request, type(request).__name__))
    if method_since(rpc) > FIRST:
        late.append((rpc, method_since(rpc)))
    return late


def needs(rpc: str, request: Message) -> int:
    """The lowest server revision that understands all of this call."""
    return max((r for _, r in added(rpc, request)), default=FIRST)


def check(rpc: str, request: Message, target: str, server_version: str, server_revision: int) -> None:
    late = [f"{what} (revision {r})" for what, r in added(rpc, request) if r > server_revision]
    if not late:
        return
    raise IncompatibleServerError(
        f"the server at {target} (bitserve {server_version}) speaks contract revision "
        f"{server_revision}, older than what this call uses: {', '.join(late)}; it would drop "
        f"them without a word (bitserve-client {client_version()} speaks revision {REVISION}): "
        "upgrade the server, or leave those fields unset"
    )
