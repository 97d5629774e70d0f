#!/usr/bin/env bash
# Regenerate the committed Python stubs from protos/ (usage: gen_protos.sh [OUT_DIR]).
#
# Output: clients/python/bitserve_proto/v1/{inference_pb2.py,inference_pb2.pyi,inference_pb2_grpc.py},
# the `bitserve_proto` import package of the bitserve-client distribution. The server imports
# its stubs from there too (one copy).
#
# protoc runs with -Iprotos so the descriptor's file name is the contract's own path,
# `bitserve/v1/inference.proto` (what reflection reports and what other clients ask for). The
# modules live under `bitserve_proto.v1` so they never clash with the server's top-level
# `bitserve`: the two lines protoc writes with the top-level module path are rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-clients/python/bitserve_proto}
py=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m grpc_tools.protoc -Iprotos \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  protos/bitserve/v1/inference.proto
sed -i \
  -e 's/^from bitserve\.v1 import /from bitserve_proto.v1 import /' \
  "$tmp/bitserve/v1/inference_pb2_grpc.py"
sed -i \
  -e "s/BuildTopDescriptorsAndMessages(DESCRIPTOR, 'bitserve\.v1\./BuildTopDescriptorsAndMessages(DESCRIPTOR, 'bitserve_proto.v1./" \
  "$tmp/bitserve/v1/inference_pb2.py"
# protoc's .pyi writes the file-level extensions' numbers as `X_FIELD_NUMBER: _ClassVar[int]` at
# module level, which mypy rejects (ClassVar outside a class): a plain `int` there.
sed -i -e 's/^\([A-Z_]*_FIELD_NUMBER\): _ClassVar\[int\]$/\1: int/' "$tmp/bitserve/v1/inference_pb2.pyi"
mkdir -p "$out/v1"
cp "$tmp"/bitserve/v1/inference_pb2.py "$tmp"/bitserve/v1/inference_pb2.pyi "$tmp"/bitserve/v1/inference_pb2_grpc.py \
  "$out/v1/"
# Each generated folder needs to be a package.
for d in "$out" "$out/v1"; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done
