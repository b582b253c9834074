#!/usr/bin/env bash
# How the shipped drafts (drafts/) were trained: one run on a single GPU, about 7 minutes.
#
#   scripts/train_drafts_gpu.sh TARGET_GGUF DATA_DIR OUT_DIR
#
# Trains the two shipped students plus two ablations (random embedding init; full-vocabulary head)
# on one shared corpus and one shared target forward per step, then packs the shipped drafts
# (without their tokenizer files, which are the target's) and the report into OUT_DIR.
# TRAIN_EXTRA appends flags (a CPU dry run passes tiny settings).
set -euo pipefail
gguf=$1 data=$2 out=$3
work=${WORK_DIR:-/tmp/specdec-train}
mkdir -p "$out" "$work"

PYTHONUNBUFFERED=1 python3 -m draft_service.train \
  --target "$gguf" --data-dir "$data" --work-dir "$work/work" --out-dir "$work/drafts" \
  --device "${DEVICE:-cuda}" --target-dtype bfloat16 \
  --students smollm2-draft-l6=6x288/8192,smollm2-draft-l2=2x128/8192,ablation-l6-random-init=6x288/8192+random,ablation-l6-full-vocab=6x288/0 \
  --generation-batch 1024 --generation-minutes 2.5 --max-new-tokens 256 \
  --steps 100000 --train-minutes 3 --batch-tokens 32768 --learning-rate 1.5e-3 \
  ${TRAIN_EXTRA:-} 2>&1 | tee "$out/train.log"

cp "$work/work/report.json" "$out/report.json"
tar -C "$work/drafts" --exclude tokenizer.json --exclude tokenizer_config.json --exclude chat_template.jinja \
  -cf - smollm2-draft-l6 smollm2-draft-l2 | split -b 15M - "$out/drafts.tar.part-"
xz -T0 -6 -c "$work/work/corpus.jsonl" > "$out/corpus.jsonl.xz"
ls -la "$out"
