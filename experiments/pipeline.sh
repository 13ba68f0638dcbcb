#!/usr/bin/env bash
# The whole Med3DVLM recipe in one command, hand-offs wired:
#   stage 1 siglip -> stage 2 pretrain -> stage 3 finetune -> export (LoRA merged, one folder)
#
#   experiments/pipeline.sh [OUT_DIR] [override ...]          (or: make pipeline OUT=DIR)
#
# OUT_DIR defaults to outputs/pipeline/<timestamp>; each stage runs in OUT_DIR/<stage> and the
# exported model lands in OUT_DIR/med3dvlm (load it with med3dvlm.Med3DVLM.from_pretrained).
# Overrides after OUT_DIR go to every stage (e.g. paths.data_dir=/data/M3D); per-stage ones go in
# SIGLIP_ARGS / PRETRAIN_ARGS / FINETUNE_ARGS. The experiments default to the offline CPU ones;
# the paper's recipe:
#   SIGLIP_EXPERIMENT=siglip_paper PRETRAIN_EXPERIMENT=pretrain_paper FINETUNE_EXPERIMENT=finetune_paper \
#     experiments/pipeline.sh outputs/paper paths.data_dir=/data/M3D
# Hand-offs: siglip/image_encoder -> pretrain (encoder.pretrained); pretrain/image_encoder and
# pretrain/projector -> finetune (encoder.pretrained, model.projector_path); the finetune run's best
# checkpoint -> export. Stage 1 and the VLM stages must use the same volume size (the phantom
# default: 32x64x64 for all three).
set -euo pipefail

OUT=${1:-outputs/pipeline/$(date +%Y-%m-%d_%H-%M-%S)}
[[ $# -gt 0 ]] && shift
PYTHON=${PYTHON:-python}
SIGLIP_EXPERIMENT=${SIGLIP_EXPERIMENT:-siglip}
PRETRAIN_EXPERIMENT=${PRETRAIN_EXPERIMENT:-pretrain}
FINETUNE_EXPERIMENT=${FINETUNE_EXPERIMENT:-finetune}
read -r -a SIGLIP_EXTRA <<< "${SIGLIP_ARGS:-}"
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_ARGS:-}"
read -r -a FINETUNE_EXTRA <<< "${FINETUNE_ARGS:-}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# OpenMP threads that busy-wait stall each other when other processes share the CPU (up to 10x
# slower on a busy 2-core machine); passive waiting costs nothing on an idle one.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

mkdir -p "$OUT"
stage() {  # stage NAME OVERRIDES...: one training run in $OUT/NAME, timed
  local name=$1 start
  shift
  echo "=== $name: $PYTHON -m med3dvlm.train $*"
  start=$(date +%s)
  "$PYTHON" -m med3dvlm.train "$@" hydra.run.dir="$OUT/$name"
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/timings.txt"
}

stage siglip experiment="$SIGLIP_EXPERIMENT" "$@" "${SIGLIP_EXTRA[@]}"
stage pretrain experiment="$PRETRAIN_EXPERIMENT" encoder.pretrained="$OUT/siglip/image_encoder" \
  "$@" "${PRETRAIN_EXTRA[@]}"
stage finetune experiment="$FINETUNE_EXPERIMENT" encoder.pretrained="$OUT/pretrain/image_encoder" \
  model.projector_path="$OUT/pretrain/projector" "$@" "${FINETUNE_EXTRA[@]}"

# the best checkpoint by validation loss (save_top_k=1), else the last one
best=$(ls "$OUT"/finetune/checkpoints/epoch_*.ckpt 2>/dev/null | tail -n 1 || true)
"$PYTHON" -m med3dvlm.export "${best:-$OUT/finetune/checkpoints/last.ckpt}" "$OUT/med3dvlm"
echo "=== done: model in $OUT/med3dvlm, closed-VQA results in $OUT/finetune/vqa_closed.json"
cat "$OUT/timings.txt"
