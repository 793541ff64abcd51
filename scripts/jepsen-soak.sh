#!/usr/bin/env bash
# Runs vow-jepsen RUNS times back to back (5 nodes, every nemesis) and prints one table row per
# run. Usage: scripts/jepsen-soak.sh [RUNS=20] [SECONDS=60] [OUT=/tmp/vow-jepsen-soak]
# Seeds are 1..RUNS, so any row can be replayed with --seed.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"; secs="${2:-60}"; out="${3:-/tmp/vow-jepsen-soak}"
mkdir -p "$out/bin"
# Copies of the binaries, so a rebuild during the soak does not change what is under test.
for b in vowd vow-jepsen vow-functions; do cp "${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}/debug/$b" "$out/bin/$b"; done
bin="$out/bin"
printf '| run | seed | shards | nemesis mix | ops | ok | fail | info | ok writes | chains done/acked | anomalies | valid |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n'
failed=0
for i in $(seq 1 "$runs"); do
  dir="$out/run-$i"
  rm -rf "$dir"
  # A run that could not tear its namespaces down in time must not refuse every run after it.
  "$bin/vow-jepsen" cleanup >/dev/null 2>&1 || true
  "$bin/vow-jepsen" test --vowd "$bin/vowd" --nodes 5 --time-limit "$secs" --nemesis all --seed "$i" --out "$dir" >"$dir.log" 2>&1 || true
  if [ -f "$dir/results.json" ]; then
    python3 - "$dir/results.json" "$i" <<'PY'
import json, sys, collections
r = json.load(open(sys.argv[1]))
mix = collections.Counter(e["action"] for e in r["nemesis"] if e["action"] != "heal")
kinds = collections.Counter(a["kind"] for a in r["anomalies"])
p = r.get("pipelines") or {}
chains = f'{p.get("completed", "")}/{p.get("acknowledged", "")}' if p else ""
print(f'| {sys.argv[2]} | {r["seed"]} | {r.get("shards", "")} | {", ".join(f"{k}×{v}" for k, v in sorted(mix.items()))} | {r["ops"]} | {r["ok"]} | {r["fail"]} | {r["info"]} | {r.get("writes", {}).get("ok", "")} | {chains} | {", ".join(f"{k}×{v}" for k, v in sorted(kinds.items())) or 0} | {r["valid"]} |')
PY
    python3 -c "import json,sys; sys.exit(0 if json.load(open('$dir/results.json'))['valid'] else 1)" || failed=$((failed+1))
  else
    echo "| $i | $i | | (run failed: see $dir.log) | | | | | | | | false |"
    failed=$((failed+1))
  fi
done
echo "invalid or failed runs: $failed of $runs"
[ "$failed" -eq 0 ]
