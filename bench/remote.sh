#!/usr/bin/env bash
# Remote cache benchmark: saeflow's object-store tier against DVC's S3 remote, both on the same loopback S3
# server (moto, scripts/s3-test-server.py), on the same workload: 4 stages of 64 MiB of output each.
#   - push: saeflow `cache push` of a computed local cache vs `dvc push` of a reproduced workspace
#   - pull: saeflow `cache pull` into an empty cache vs `dvc pull` into a fresh clone
#   - fully cached rerun on an empty machine: saeflow `run --cache s3://…` with an empty scratch directory
#     (pulls the 4 objects, computes nothing) vs `dvc pull && dvc repro` in a fresh clone
# Rounds alternate saeflow and DVC; each line is mean ± sd over ROUNDS rounds (default 5).
# moto keeps objects in memory and answers one request at a time: the numbers compare the two clients on
# one server, not either against S3.
# Usage: bench/remote.sh [WORKDIR]   (VENV=/path: the venv with DVC; moto[server] must be importable by python3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-/tmp/dvc-venv}
work=${1:-/tmp/saeflow-bench-remote}
rounds=${ROUNDS:-5}
export DVC_NO_ANALYTICS=1

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
[ -x "$venv/bin/dvc" ] || "$venv/bin/pip" install -q 'dvc==3.67.1' 'dvc-s3==3.3.0'
dvc="$venv/bin/dvc"
(cd "$root" && cargo build -q --release)
saeflow="$root/target/release/saeflow"

rm -rf "$work" && mkdir -p "$work" && cd "$work"
python3 "$root/scripts/s3-test-server.py" 0 > server.out 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null' EXIT
until grep -q '^port ' server.out 2>/dev/null; do sleep 0.1; done
port=$(awk '/^port /{print $2}' server.out)
endpoint="http://127.0.0.1:$port"
# moto wants a signed-looking request; it does not check the signature.
curl -sf -X PUT "$endpoint/bench" \
  -H 'Authorization: AWS4-HMAC-SHA256 Credential=bench/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0' >/dev/null
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="$endpoint" AWS_ALLOW_HTTP=true

mib=64
stage_cmd() { echo "head -c $((mib << 20)) /dev/urandom > $1"; }

# ---- saeflow: 4 command stages, computed once into a local cache (each names its own file: a key is the
# action, so four identical commands would be one object)
mkdir sf && cat > sf/p.toml <<EOF
[pipeline]
name = "bench_remote"
$(for s in 0 1 2 3; do printf '\n[stages.s%s]\nkind = "command"\nshell = "%s"\n' "$s" "$(stage_cmd "{out}/s$s.bin")"; done)
EOF
(cd sf && "$saeflow" run -q --cache computed p.toml)
[ "$(du -sm sf/computed/objects | cut -f1)" -ge $((4 * mib)) ] || { echo "expected 4 objects of $mib MiB"; exit 1; }

# ---- DVC: the same 4 stages in a git repo, reproduced once
mkdir dvc && cd dvc
git init -q && git config user.email bench@localhost && git config user.name bench
"$dvc" init -q
"$dvc" remote add -q -d bench s3://bench/dvc
"$dvc" remote modify -q bench endpointurl "$endpoint"
{
  echo 'stages:'
  for s in 0 1 2 3; do
    echo "  s$s:"
    echo "    cmd: mkdir -p out && $(stage_cmd "out/s$s.bin")"
    echo "    outs: [out/s$s.bin]"
  done
} > dvc.yaml
"$dvc" repro -q > /dev/null
git add -A && git commit -qm bench
cd "$work"

now() { date +%s.%N; }
declare -A t
record() { t[$1]="${t[$1]:-} $2"; }
timed() { # name command...: appends the wall seconds of the command to t[name]
  local name=$1 start
  shift
  start=$(now)
  "$@" > /dev/null
  record "$name" "$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$start" "$(now)")"
}
fresh_clone() { # a new workspace of the DVC project, reading round $1's remote
  rm -rf "$work/clone" && git clone -q "$work/dvc" "$work/clone"
  (cd "$work/clone" && "$dvc" remote modify -q --local bench url "s3://bench/dvc-$1")
}
sf() { (cd "$work/sf" && "$saeflow" "$@"); }
# Each round uses fresh prefixes, so every push sends everything.
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds"
  timed sf_push sf cache push --cache computed --cache-remote "s3://bench/saeflow-$r"
  (cd dvc && "$dvc" remote modify -q --local bench url "s3://bench/dvc-$r")
  timed dvc_push bash -c "cd '$work/dvc' && '$dvc' push -q"
  rm -rf "$work/sf/pulled"
  timed sf_pull sf cache pull --cache pulled --cache-remote "s3://bench/saeflow-$r"
  fresh_clone "$r"
  timed dvc_pull bash -c "cd '$work/clone' && '$dvc' pull -q"
  rm -rf "$work/sf/scratch"
  timed sf_rerun sf run -q --cache "s3://bench/saeflow-$r" --scratch scratch p.toml
  fresh_clone "$r"
  timed dvc_rerun bash -c "cd '$work/clone' && '$dvc' pull -q && '$dvc' repro -q"
done
# The rerun really was a hit on both sides.
(cd sf && "$saeflow" status --cache "s3://bench/saeflow-$rounds" --scratch scratch p.toml | grep -c 'local + remote' | grep -qx 4)
(cd clone && "$dvc" status -q)

stats() { python3 -c "import statistics as s, sys; v=[float(x) for x in sys.argv[1:]]; print(f'{s.mean(v):.2f} ± {s.stdev(v):.2f} s')" ${t[$1]}; }
rate() { python3 -c "import statistics as s, sys; v=[float(x) for x in sys.argv[2:]]; print(f'{int(sys.argv[1]) / s.mean(v):.0f} MiB/s')" $((4 * mib)) ${t[$1]}; }
echo
echo "== Summary: 4 x $mib MiB through moto on loopback; $rounds alternating rounds; $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%F)"
printf '%-34s %-18s %-12s %-18s %s\n' step saeflow "" "dvc $("$dvc" --version)" ""
for step in push pull; do
  printf '%-34s %-18s %-12s %-18s %s\n' "$step (256 MiB)" "$(stats sf_$step)" "$(rate sf_$step)" "$(stats dvc_$step)" "$(rate dvc_$step)"
done
printf '%-34s %-18s %-12s %-18s\n' "cached rerun on an empty machine" "$(stats sf_rerun)" "" "$(stats dvc_rerun)"
