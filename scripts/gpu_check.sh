#!/usr/bin/env bash
# Every CUDA path once, on the default model, in at most ~8 minutes; one table at the end. Run it on the first GPU at
# hand and put the table in the README:
#   bash scripts/gpu_check.sh            (PYTHON=... to pick the interpreter; one row per path, PASS or FAIL)
# Paths: compiled decode in bf16 / int8 / int4 (CUDA graphs), speculative decoding compiled (int4 draft), prompt
# lookup compiled, GPTQ on the GPU, tensor parallelism with NCCL over the GPUs present, and the server (compiled,
# one streamed and one plain request). Each step has its own time limit; a failing step is a FAIL row, not the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
C=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
LOG=$(mktemp -d)
ROWS=()
PROMPT="The history of the printing press begins"

row() {   # name, seconds, status, detail
  ROWS+=("| $1 | $3 | $2 | $4 |")
}

step() {   # name, time limit (s), command...: run it, keep its log, record tok/s (or its last line) as the detail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS out="$LOG/$(echo "$name" | tr -c 'a-z0-9' _).log"
  if timeout "$limit" "$@" >"$out" 2>&1; then
    local detail
    detail=$(grep -Eo "decode [0-9.]+ tokens/s|[0-9.]+% of draft tokens accepted|peak memory: [0-9.]+ GB" "$out" |
             tail -3 | paste -sd ';' -)
    row "$name" $((SECONDS - t0)) PASS "${detail:-ok}"
  else
    row "$name" $((SECONDS - t0)) FAIL "$(grep -v '^\s*$' "$out" | tail -1 | cut -c1-150)"
  fi
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  { echo "error: torch sees no CUDA device here" >&2; exit 1; }
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
GPU=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB')")
bash scripts/prepare.sh >/dev/null 2>&1 || { echo "error: scripts/prepare.sh failed" >&2; exit 1; }

GEN=("$PY" generate.py --device cuda --compile --temperature 0 --max_new_tokens 128 --prompt "$PROMPT")
step "bf16 compiled decode" 150 "${GEN[@]}" --checkpoint_path $C/model.pth
step "int8 quantize + compiled decode" 150 bash -c "$PY quantize.py --checkpoint_path $C/model.pth --mode int8 &&
  ${GEN[*]@Q} --checkpoint_path $C/model_int8.pth"
step "int4 quantize + compiled decode" 150 bash -c "$PY quantize.py --checkpoint_path $C/model.pth --mode int4 &&
  ${GEN[*]@Q} --checkpoint_path $C/model_int4.g32.pth"
step "speculative compiled (int4 draft)" 180 "${GEN[@]}" --checkpoint_path $C/model.pth \
  --draft_checkpoint_path $C/model_int4.g32.pth --speculate_k 4
step "prompt lookup compiled" 150 "${GEN[@]}" --checkpoint_path $C/model.pth --prompt_lookup 8
step "GPTQ int4 on cuda" 120 "$PY" quantize.py --checkpoint_path $C/model.pth --mode int4-gptq --device cuda \
  --calibration_file data/pride_and_prejudice_ch1-8.txt --calibration_samples 16
step "device map: 20 layers cuda:0, 10 cpu (eager)" 120 "$PY" generate.py --device_map cuda:0=20,cpu=10 \
  --temperature 0 --max_new_tokens 64 --prompt "$PROMPT" --checkpoint_path $C/model.pth
step "TP over $GPUS GPU(s), NCCL" 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" generate.py \
  --device cuda --temperature 0 --max_new_tokens 64 --prompt "$PROMPT" --checkpoint_path $C/model.pth
step "server compiled: plain + streamed" 180 "$PY" - <<'EOF'
import json, subprocess, sys, time, urllib.request
server = subprocess.Popen([sys.executable, "server.py", "--device", "cuda", "--compile", "--port", "8765",
                           "--max_batch_size", "4"])
try:
    for _ in range(600):
        try:
            urllib.request.urlopen("http://127.0.0.1:8765/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    def post(body):
        req = urllib.request.Request("http://127.0.0.1:8765/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=60).read().decode()
    plain = json.loads(post({"prompt": "The history of the printing press begins", "max_tokens": 32,
                             "temperature": 0}))
    streamed = post({"prompt": "The history of the printing press begins", "max_tokens": 32, "temperature": 0,
                     "stream": True})
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in streamed.splitlines()
                   if line.startswith("data: {"))
    assert text == plain["choices"][0]["text"], (text, plain)
    print("server: streamed equals plain,", plain["usage"]["completion_tokens"], "tokens")
finally:
    server.terminate()
    server.wait(timeout=30)
EOF

echo
echo "GPU check: $GPU x $GPUS, torch $("$PY" -c 'import torch; print(torch.__version__)'), $(date -u +%Y-%m-%d)"
echo
echo "| path | result | seconds | detail |"
echo "|---|---|---:|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "logs: $LOG"
