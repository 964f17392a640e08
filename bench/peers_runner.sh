#!/usr/bin/env bash
# Peer benchmark: the bench/runner.sh workload (50 stages, 1 GiB of external inputs) run with DVC and Snakemake.
#   - DVC: first `dvc repro` (hashes the 1 GiB of deps with md5, runs 50 stages), then the fully cached rerun.
#     Outs use DVC's default (cache: true): the tiny outputs are stored in .dvc/cache, like a normal DVC project.
#   - Snakemake: first `snakemake -c1`, then the no-op rerun. Snakemake decides by mtimes (plus its
#     .snakemake metadata), never content hashes, so its first run does not read the 1 GiB at all.
# Usage: bench/peers_runner.sh [WORKDIR]   (VENV=/path overrides the venv; hyperfine from Debian)
set -euo pipefail
venv=${VENV:-/tmp/peers-venv}
work=${1:-/tmp/saeflow-bench-peers}
export DVC_NO_ANALYTICS=1 PATH="$venv/bin:$PATH"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
[ -x "$venv/bin/dvc" ] && [ -x "$venv/bin/snakemake" ] || "$venv/bin/pip" install -q dvc snakemake
dvc_v=$(dvc --version) smk_v=$(snakemake --version)

rm -rf "$work" && mkdir -p "$work/inputs" && cd "$work"
# 8 files x 128 MiB = 1 GiB of external inputs.
for i in $(seq 0 7); do head -c $((128 << 20)) /dev/urandom > "inputs/shard-$i.bin"; done
sleep 3 # let mtimes age past the racy-timestamp window
sync
cat inputs/* > /dev/null # warm the page cache: we measure hashing, not the disk

# Stage s depends on inputs/shard-(s%8).bin, and for s>=5 on stages s-5 and s/2 (once if equal).
ups() { [ "$1" -ge 5 ] && { echo $(($1 - 5)); [ $(($1 / 2)) -ne $(($1 - 5)) ] && echo $(($1 / 2)); }; true; }

# ---- DVC (git repo + dvc project in $work/dvc, inputs referenced as ../inputs)
mkdir dvc && cd dvc
git init -q && dvc init -q
dvc config core.site_cache_dir "$work/dvc-site-cache" # keep DVC's hash state db inside the work dir
{
  echo 'stages:'
  for s in $(seq 0 49); do
    echo "  s$s:"
    echo "    cmd: mkdir -p out/s$s && echo $s > out/s$s/o.txt"
    echo "    deps: [../inputs/shard-$((s % 8)).bin$(for u in $(ups $s); do printf ', out/s%s' "$u"; done)]"
    echo "    outs: [out/s$s]"
  done
} > dvc.yaml
echo "== DVC $dvc_v: first repro (hashes 1 GiB of deps, runs 50 stages)"
dvc_first=$( { /usr/bin/time -f "%e" dvc repro -q > /dev/null; } 2>&1 | tail -1)
echo "$dvc_first s wall"
echo "== DVC: fully cached rerun"
hyperfine -N --warmup 2 --runs 10 --export-json "$work/dvc.json" "dvc repro -q"
cd "$work"

# ---- Snakemake (in $work/smk, inputs referenced as ../inputs)
mkdir smk && cd smk
{
  echo 'rule all:'
  echo "    input: [f\"out/s{s}/o.txt\" for s in range(50)]"
  for s in $(seq 0 49); do
    echo
    echo "rule s$s:"
    echo "    input: \"../inputs/shard-$((s % 8)).bin\"$(for u in $(ups $s); do printf ', "out/s%s/o.txt"' "$u"; done)"
    echo "    output: \"out/s$s/o.txt\""
    echo "    shell: \"echo $s > {output}\""
  done
} > Snakefile
echo "== Snakemake $smk_v: first run (50 jobs, -c1; mtimes only, no hashing)"
smk_first=$( { /usr/bin/time -f "%e" snakemake -c1 -q all > /dev/null; } 2>&1 | tail -1)
echo "$smk_first s wall"
echo "== Snakemake: no-op rerun"
hyperfine -N --warmup 2 --runs 10 --export-json "$work/smk.json" "snakemake -c1 -q all"
cd "$work"

meansd() { python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print(f\"{r['mean']:.3f} ± {r['stddev']:.3f} s\")" "$1"; }
echo
echo "== Summary (1 GiB inputs in page cache, 50 stages)"
printf '%-28s %-14s %s\n' tool "first run" "cached rerun (mean ± sd, 10 runs)"
printf '%-28s %-14s %s\n' "dvc $dvc_v" "$dvc_first s" "$(meansd dvc.json)"
printf '%-28s %-14s %s\n' "snakemake $smk_v" "$smk_first s" "$(meansd smk.json)"
