#!/usr/bin/env bash
# The GPU checks of moa-vllm in one run (< 8 minutes on one H100/H200-class GPU). From the repository root:
#   bash benchmarks/gpu/run.sh            # results under benchmarks/results/gpu/ (and $OUT when set)
# Stages (each logged; a stage whose needs are missing is skipped and says why):
#   1. kernels: moa_kernels' ring prefill vs its torch reference at real shapes + time vs dense (torch + Triton only)
#   2. engine tests: tests/gpu (dense plan == stock FLASH_ATTN greedy, sparse == reference, CUDA graphs == eager)
#   3. throughput: decode tok/s of moa plans vs stock FLASH_ATTN at 8k and 32k, equal batch and equal KV budget
# Stages 2-3 need the vLLM GPU wheel (0.32.x): already installed, or from wheel files in $WHEELS (machines without
# network), or from the package index; and the embedded model (`moa-vllm model prepare`) or MODEL_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "[gpu/run.sh $(date +%T)] $*"; }
status=0
declare -A stage

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA GPU visible to torch: nothing to run"
    exit 2
fi
$PY -c "import pydantic" 2>/dev/null || $PY -m pip install -q "pydantic>=2.6" || log "pydantic missing"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

log "stage 1: kernels at real shapes"
timeout 300 $PY -m benchmarks.gpu.kernel_check --out "$RESULTS/kernel_check.json" 2>&1 | tee "$RESULTS/kernel_check.log"
stage[kernels]=${PIPESTATUS[0]}

if ! $PY -c "import vllm" 2>/dev/null; then
    if [ -n "${WHEELS:-}" ]; then
        $PY -m pip install -q --no-index --find-links "$WHEELS" "vllm>=0.32,<0.33"
    else
        timeout 240 $PY -m pip install -q "vllm>=0.32,<0.33"
    fi
fi
if $PY -c "import vllm" 2>/dev/null; then
    $PY -m pip install -q --no-deps -e . >/dev/null 2>&1 || log "editable install failed; using PYTHONPATH"
    log "stage 2: engine tests"
    timeout 240 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml "$RESULTS/gpu_tests.xml" 2>&1 \
        | tee "$RESULTS/gpu_tests.log"
    stage[tests]=${PIPESTATUS[0]}
    log "stage 3: decode throughput"
    timeout 300 $PY -m benchmarks.gpu.decode_throughput ${MODEL_DIR:+--model "$MODEL_DIR"} \
        --out "$RESULTS/decode_throughput.json" 2>&1 | tee "$RESULTS/decode_throughput.log"
    stage[throughput]=${PIPESTATUS[0]}
else
    log "vLLM GPU wheel not installed and not installable here: stages 2-3 skipped"
    stage[tests]=skipped
    stage[throughput]=skipped
fi

{
    echo "{"
    echo "  \"kernels\": \"${stage[kernels]}\", \"tests\": \"${stage[tests]}\", \"throughput\": \"${stage[throughput]}\","
    echo "  \"finished\": \"$(date -u +%FT%TZ)\""
    echo "}"
} >"$RESULTS/run_summary.json"
cat "$RESULTS/run_summary.json"
for s in kernels tests throughput; do
    case "${stage[$s]}" in 0 | skipped) ;; *) status=1 ;; esac
done
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*.json "$RESULTS"/*.log "$OUT"/ 2>/dev/null; fi
exit $status
