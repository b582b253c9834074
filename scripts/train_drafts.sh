#!/usr/bin/env bash
# Rebuild the shipped drafts (drafts/smollm2-draft-l6, drafts/smollm2-draft-l2) and the two
# ablations reported beside them (random embedding initialization; full-vocabulary head), on one
# GPU: about 12 minutes on an H200 (2.5 min of corpus generation, 7.5 min of distillation, the
# rest loading and evaluation). All four students share the corpus and each step's target forward.
#
#   scripts/train_drafts.sh [TARGET] [extra distill flags]
#
# TARGET defaults to the embedded SmolLM2-135M-Instruct. The shipped drafts came from this
# command in two runs: --train-minutes 3, then the same command resumed from its checkpoint with
# --train-minutes 7.5 --generation-minutes 0.01 --no-sampled-responses (the learning rate rose
# again at the resume, so one 7.5-minute run gives a similar, not an identical, model).
set -euo pipefail
target=${1:-embedded}
shift || true
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 exec python3 -m distill \
  --target "$target" --device "${DEVICE:-cuda}" --target-dtype bfloat16 \
  --students smollm2-draft-l6=6x288/8192,smollm2-draft-l2=2x128/8192,ablation-l6-random-init=6x288/8192+random,ablation-l6-full-vocab=6x288/0 \
  --generation-batch 1024 --generation-minutes 2.5 --max-new-tokens 256 \
  --steps 100000 --train-minutes 7.5 --batch-tokens 32768 --learning-rate 1.5e-3 \
  --work-dir .train --out-dir drafts "$@"
