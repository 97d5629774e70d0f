#!/usr/bin/env bash
# Regenerate the committed Python stubs from protos/ (usage: gen_protos.sh [OUT_PB_DIR]).
# protoc runs with -Iprotos so the descriptor's file name is the contract's own path,
# `bitserve/v1/inference.proto` (what reflection reports and what other clients ask for). The
# stubs still live inside the client package (bitserve_client.pb) so they never clash with the
# server's top-level `bitserve`: the two lines protoc writes with the top-level module path are
# rewritten to the package path.
set -euo pipefail
cd "$(dirname "$0")/.."
pb=${1:-clients/python/bitserve_client/pb}
py=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m grpc_tools.protoc -Iprotos \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  protos/bitserve/v1/inference.proto
sed -i \
  -e 's/^from bitserve\.v1 import /from bitserve_client.pb.bitserve.v1 import /' \
  "$tmp/bitserve/v1/inference_pb2_grpc.py"
sed -i \
  -e "s/BuildTopDescriptorsAndMessages(DESCRIPTOR, 'bitserve\.v1\./BuildTopDescriptorsAndMessages(DESCRIPTOR, 'bitserve_client.pb.bitserve.v1./" \
  "$tmp/bitserve/v1/inference_pb2.py"
mkdir -p "$pb/bitserve/v1"
cp "$tmp"/bitserve/v1/inference_pb2.py "$tmp"/bitserve/v1/inference_pb2.pyi "$tmp"/bitserve/v1/inference_pb2_grpc.py \
  "$pb/bitserve/v1/"
# Each generated folder needs to be a package.
for d in "$pb" "$pb/bitserve" "$pb/bitserve/v1"; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done
