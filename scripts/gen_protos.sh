#!/usr/bin/env bash
# Regenerate the committed Python stubs from protos/.
# The -I mapping places the stubs inside the client package (bitserve_client.pb) so that their
# own imports resolve there and never clash with another top-level "bitserve" module.
set -euo pipefail
cd "$(dirname "$0")/.."
out=clients/python
python -m grpc_tools.protoc \
  -Ibitserve_client/pb=protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/bitserve/v1/inference.proto
# Each generated folder needs to be a package.
for d in "$out/bitserve_client/pb" "$out/bitserve_client/pb/bitserve" "$out/bitserve_client/pb/bitserve/v1"; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done
