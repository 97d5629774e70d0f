#!/usr/bin/env bash
# Fails when the committed stubs (clients/python/bitserve_proto) differ from what protos/ generates.
set -euo pipefail
cd "$(dirname "$0")/.."
stubs=clients/python/bitserve_proto
bash scripts/gen_protos.sh "$stubs"
if ! git diff --exit-code -- "$stubs"; then
  echo "generated stubs drift from protos/: run scripts/gen_protos.sh and commit" >&2
  exit 1
fi
if [ -n "$(git status --porcelain -- "$stubs")" ]; then
  git status --porcelain -- "$stubs" >&2
  echo "untracked generated stubs: run scripts/gen_protos.sh and commit" >&2
  exit 1
fi
echo "protobuf stubs are up to date"
