#!/usr/bin/env bash
# How often vow-jepsen catches each deliberate bug, over seeds 1..SEEDS: every sabotage of the
# test-only `sabotage` build against the fault that reveals it, one table row per bug.
# Usage: [BUGS="a b"] scripts/sabotage-rates.sh [SEEDS=5] [SECONDS=20] [OUT=/tmp/vow-sabotage-rates]
# (BUGS: only these sabotages; default every one below.)
# Needs root and the binaries scripts/test.sh builds (vowd-sabotage among them).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-5}"; secs="${2:-20}"; out="${3:-/tmp/vow-sabotage-rates}"
bin="${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}/debug"
mkdir -p "$out"
printf '| sabotage | nemesis | caught | anomalies seen |\n|---|---|---|---|\n'
# Each row: sabotage, nemesis, then optionally one VOW_ setting for every vowd ("-" for none) and
# further vow-jepsen flags.
while read -r bug nemesis extra flags; do
  [ "$extra" = "-" ] && extra=
  if [ -n "${BUGS:-}" ] && ! [[ " $BUGS " == *" $bug "* ]]; then continue; fi
  caught=0; kinds=""
  for seed in $(seq 1 "$seeds"); do
    dir="$out/$bug-$seed"; rm -rf "$dir"
    "$bin/vow-jepsen" test --nodes 3 --time-limit "$secs" --clients "${CLIENTS:-8}" --nemesis "$nemesis" --seed "$seed" \
      --out "$dir" --vowd "$bin/vowd-sabotage" --vowd-env "VOW_SABOTAGE=$bug" ${extra:+--vowd-env "$extra"} $flags >"$dir.log" 2>&1 || true
    if [ -f "$dir/results.json" ] && python3 -c "import json,sys; sys.exit(0 if json.load(open('$dir/results.json'))['valid'] else 1)"; then
      :
    else
      caught=$((caught+1))
    fi
    kinds="$kinds $(python3 -c "import json; print(' '.join(sorted({a['kind'] for a in json.load(open('$dir/results.json'))['anomalies']})))" 2>/dev/null || echo run-failed)"
  done
  printf '| %s | %s | %d/%d | %s |\n' "$bug" "$nemesis" "$caught" "$seeds" "$(echo $kinds | tr ' ' '\n' | sort | uniq -c | awk '{printf "%s×%s ", $2, $1}')"
done <<'LIST'
skip-settled-check none
stale-reads partition,pause
ack-before-commit kill,partition
read-index-without-heartbeat partition
ack-before-fsync power
drop-snapshot-announcements pause VOW_SNAPSHOT_LOGS=20 --shards 1
LIST
