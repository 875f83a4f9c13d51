#!/usr/bin/env bash
# Runs the embedded model's speed harnesses on a base commit and on the working tree, one after another (never two
# at once), each writing to its own folder: OUT/base/... and OUT/head/...
#   bash benchmarks/before_after.sh BASE_COMMIT OUT [PART ...]
# PART: decode (decode_speed equal-batch), prefill (prefill_speed alone), concurrency (ring_cache concurrency),
#       serve (prefix_cache: stock once, then each moa config on base and head). Default: all four.
# The base commit runs from a git worktree through PYTHONPATH, which shadows the editable install of this tree.
set -euo pipefail
base=$1; out=$(realpath -m "$2"); shift 2
[ $# -gt 0 ] || set -- decode prefill concurrency serve
head_dir=$(cd "$(dirname "$0")/.." && pwd)
py="$head_dir/.venv/bin/python"
wt="$out/worktree"
[ -d "$wt" ] || git -C "$head_dir" worktree add --detach "$wt" "$base" >/dev/null
mkdir -p "$out/base" "$out/head"
git -C "$wt" rev-parse HEAD > "$out/base/commit"
git -C "$head_dir" rev-parse HEAD > "$out/head/commit"

at() {  # at base|head CMD...: run a harness module from that tree
    local side=$1; shift
    if [ "$side" = base ]; then (cd "$wt" && PYTHONPATH="$wt:$wt/kernels" "$py" "$@")
    else (cd "$head_dir" && "$py" "$@"); fi
}
for part in "$@"; do
    case $part in
        decode)      for s in base head; do at $s benchmarks/decode_speed.py equal-batch --out "$out/$s"; done ;;
        prefill)     for s in base head; do at $s -m benchmarks.prefill_speed alone --out "$out/$s"; done ;;
        concurrency) for s in base head; do at $s benchmarks/ring_cache.py concurrency --out "$out/$s"; done ;;
        serve)
            at head -m benchmarks.prefix_cache --configs stock --out "$out/head/prefix_cache"
            for c in moa-d0.50 moa-d0.25; do
                for s in base head; do at $s -m benchmarks.prefix_cache --configs "$c" --out "$out/$s/prefix_cache"; done
            done ;;
        *) echo "unknown part $part" >&2; exit 2 ;;
    esac
done
