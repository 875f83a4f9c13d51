#!/usr/bin/env bash
# moa-vllm container entrypoint: serve MOA_MODEL (a mounted model folder, or "embedded") with its MoA plan through
# `moa-vllm serve` (vLLM's OpenAI server, the moa backend, the /moa inspection routes). Extra arguments go to vLLM.
#   MOA_MODEL  model folder (default /model) or "embedded" (the CPU image's built-in SmolLM2 + its best plan)
#   MOA_PLAN   plan file; empty: the plan the folder carries (moa_plan.json or config.json's sparse_attention_config)
#   MOA_HOST   bind address INSIDE the container (default 0.0.0.0: a published port needs it; compose.yaml
#              publishes on the host's 127.0.0.1 only)
#   MOA_PORT   default 8000
#   MOA_API_KEY (or VLLM_API_KEY) the key every client must send (Authorization: Bearer KEY) on /v1/* and /moa/*;
#              passed to vLLM as VLLM_API_KEY (never on the command line, where `ps` would show it). Without
#              one, anyone who reaches the port can use the server: the entrypoint says so on stderr.
#   MOA_DRY_RUN=1 prints the command instead of running it (tests)
set -euo pipefail

model="${MOA_MODEL:-/model}"
plan="${MOA_PLAN:-}"
host="${MOA_HOST:-0.0.0.0}"
port="${MOA_PORT:-8000}"

fail() {
  echo "moa-vllm entrypoint: $*" >&2
  exit 2
}

cmd=(moa-vllm serve)
if [[ "$model" != embedded ]]; then
  [[ -f "$model/config.json" ]] || fail "$model is not a model folder (no config.json): mount one at /model or set MOA_MODEL"
  if [[ -n "$plan" ]]; then
    [[ -f "$plan" ]] || fail "MOA_PLAN=$plan: no such file"
  elif [[ ! -f "$model/moa_plan.json" ]] && ! grep -q '"sparse_attention_config"' "$model/config.json"; then
    fail "no plan for $model: set MOA_PLAN, or attach one first (moa-vllm plan attach PLAN $model)"
  fi
  cmd+=("$model")
fi
if [[ -n "$plan" ]]; then
  cmd+=(--plan "$plan")
fi
cmd+=(--host "$host" --port "$port" "$@")

if [[ -n "${MOA_API_KEY:-}" ]]; then
  export VLLM_API_KEY="$MOA_API_KEY"
  echo "moa-vllm entrypoint: API key required on /v1 and /moa (from MOA_API_KEY)" >&2
elif [[ -n "${VLLM_API_KEY:-}" ]]; then
  echo "moa-vllm entrypoint: API key required on /v1 and /moa (from VLLM_API_KEY)" >&2
else
  echo "moa-vllm entrypoint: WARNING: no API key (set MOA_API_KEY): anyone who reaches port $port can use this server" >&2
fi

if [[ "${MOA_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
