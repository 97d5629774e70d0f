#!/usr/bin/env bash
# Fails when the committed stubs differ from what protos/ generates.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/gen_protos.sh
if ! git diff --exit-code -- clients/python/bitserve_client/pb; then
  echo "generated stubs drift from protos/: run scripts/gen_protos.sh and commit" >&2
  exit 1
fi
if [ -n "$(git status --porcelain -- clients/python/bitserve_client/pb)" ]; then
  git status --porcelain -- clients/python/bitserve_client/pb >&2
  echo "untracked generated stubs: run scripts/gen_protos.sh and commit" >&2
  exit 1
fi
echo "protobuf stubs are up to date"
