#!/usr/bin/env bash
# Runner benchmark: a 50-stage pipeline whose external inputs total ~1 GB.
#   - first planning of the pipeline hashes the 1 GB (reported as GB/s; files in the page cache)
#   - a fully cached rerun of `saeflow run` (timed with hyperfine)
# Usage: bench/runner.sh [WORKDIR]   (needs a release build: cargo build --release; hyperfine from Debian)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/saeflow"
work=${1:-/tmp/saeflow-bench-runner}
rm -rf "$work" && mkdir -p "$work/inputs" && cd "$work"

# 8 files x 128 MiB = 1 GiB of external inputs.
for i in $(seq 0 7); do head -c $((128 << 20)) /dev/urandom > "inputs/shard-$i.bin"; done
sleep 3 # let mtimes age past the racy-timestamp window, as for any file not written this instant

{
  echo '[pipeline]'
  echo 'name = "bench"'
  for s in $(seq 0 49); do
    echo
    echo "[stages.s$s]"
    echo 'kind = "command"'
    echo "shell = \"echo $s > {out}/o.txt\""
    echo "deps = [\"inputs/shard-$((s % 8)).bin\"]"
    if [ "$s" -ge 5 ]; then echo "inputs = { a = \"s$((s - 5))\", b = \"s$((s / 2))\" }"; fi
  done
} > bench.toml
# Stage s depends on s-5 and s/2 (when different): a 50-node DAG with depth ~10 and fan-in 2.
sed -i 's/inputs = { a = "\(s[0-9]*\)", b = "\1" }/inputs = { a = "\1" }/' bench.toml

du -sh inputs
sync
cat inputs/* > /dev/null # warm the page cache: we measure hashing, not the disk
echo "== first plan (hashes 1 GiB of inputs)"
start=$(date +%s.%N)
"$bin" status bench.toml > /dev/null
end=$(date +%s.%N)
python3 -c "t=$end-$start; print(f'hash+plan: {t:.3f} s -> {1.0737/t:.2f} GB/s over 1.07 GB')"

echo "== first run (50 stages)"
/usr/bin/time -f "%e s wall" "$bin" run -q bench.toml

echo "== fully cached rerun"
hyperfine -N --warmup 3 --runs 30 "$bin run -q bench.toml"
