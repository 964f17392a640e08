#!/usr/bin/env bash
# Wide pipelines: N trivial `command` stages (`cmd = ["true"]`), for N = 1,000 and 10,000 (or the sizes
# given), to show that planning and scheduling grow ~linearly in stages. Two thirds of the stages read the
# previous one (chains of three), every seventh also reads stage i/7 (fan-out from the early stages).
# Timed, per N, with a fresh cache:
#   - `saeflow run --dry-run` (parse, validate, plan, keys, status of every instance) on the empty cache
#   - `saeflow run -j $JOBS` first run (every stage computed; JOBS defaults to 8: each stage's publish
#     syncs to disk, which dominates a trivial stage)
#   - `saeflow run` fully cached rerun
#   - `saeflow run --dry-run` on the full cache
# Usage: bench/wide.sh [N...]   (needs a release build: cargo build --release -p saeflow)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="${CARGO_TARGET_DIR:-$here/target}/release/saeflow"
work=${WORK:-/tmp/saeflow-bench-wide}
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(1000 10000)

echo "saeflow wide-pipeline benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"
echo "$bin ($(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo '?'))"

timed() { # label, command...
  local label=$1
  shift
  local start end
  start=$(date +%s.%N)
  "$@" > /dev/null 2> "$work/log" || { tail "$work/log"; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'  {\"$label\":<22} {$end - $start:8.3f} s   ', end='')"
  grep -E 'computed, .* cached' "$work/log" || echo
}

for n in "${sizes[@]}"; do
  rm -rf "$work/$n" && mkdir -p "$work/$n" && cd "$work/$n"
  {
    echo '[pipeline]'
    echo 'name = "wide"'
    for ((i = 0; i < n; i++)); do
      echo
      echo "[stages.s$i]"
      echo 'kind = "command"'
      echo "cmd = [\"true\", \"s$i\"]" # distinct keys: identical stages would share one object
      ins=()
      if ((i % 3 != 0)); then ins+=("a = \"s$((i - 1))\""); fi
      if ((i >= 7 && i % 7 == 0)); then ins+=("b = \"s$((i / 7))\""); fi
      if ((${#ins[@]})); then
        (IFS=,; echo "inputs = { ${ins[*]} }")
      fi
    done
  } > wide.toml
  export SAEFLOW_CACHE="$work/$n/cache"
  echo "== $n stages"
  timed "dry-run (empty cache)" "$bin" run --dry-run wide.toml
  timed "first run" "$bin" run -j "${JOBS:-8}" wide.toml
  timed "cached rerun" "$bin" run wide.toml
  timed "dry-run (cached)" "$bin" run --dry-run wide.toml
done
