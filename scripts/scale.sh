#!/usr/bin/env bash
# Scale figures for issue #4: a three-node `vow dev` cluster holding N settled promises of 256 B.
# Prints RSS per node, disk use per node, how long a node takes to restart and serve, and how long
# a new node takes to catch up (by snapshot). Usage: scripts/scale.sh [N=1000000] [DIR=/tmp/vow-scale]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000000}"; dir="${2:-/tmp/vow-scale}"
bin="${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}/debug"
export VOW_VOWD="$bin/vowd"
vow() { "$bin/vow" "$@"; }
now_ms() { date +%s%3N; }
json() { python3 -c "import json,sys; d=json.load(open('$dir/cluster.json')); print($1)"; }

[ -e "$dir" ] && { vow dev down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"; }
vow dev up --nodes 3 --dir "$dir" >/dev/null
eps=$(json "','.join(x['grpc'] for x in d['nodes'])")
echo "loading $n create+resolve pairs (256-byte values) with 64 clients..."
start=$(now_ms)
vow --endpoints "$eps" bench --workload create-settle --clients 64 --promises "$n" --value-size 256 --quiet | tail -1
echo "load took $(( ($(now_ms) - start) / 1000 )) s"

for i in 0 1 2; do
  pid=$(json "d['nodes'][$i]['pid']"); id=$(json "d['nodes'][$i]['node_id']")
  echo "node $id: RSS $(( $(ps -o rss= -p "$pid") / 1024 )) MiB, disk $(du -sm "$dir/n$id" | cut -f1) MiB"
done

# Restart a follower from its disk and time until it serves (/readyz: it knows the leader and has
# applied what the leader had committed): once after a clean stop, once after kill -9.
leader=$(vow -o json --endpoints "$eps" cluster status | python3 -c "import json,sys; print(json.load(sys.stdin)['shards'][0]['leader_id'])")
victim=$(json "[x for x in d['nodes'] if x['node_id'] != $leader][0]['node_id']")
vhttp=$(json "[x for x in d['nodes'] if x['node_id'] == $victim][0]['http']")
for signal in TERM KILL; do
  vpid=$(json "[x for x in d['nodes'] if x['node_id'] == $victim][0]['pid']")
  kill -"$signal" "$vpid"
  while kill -0 "$vpid" 2>/dev/null && ! grep -q ') Z ' "/proc/$vpid/stat" 2>/dev/null; do sleep 0.05; done
  start=$(now_ms)
  vow dev up --nodes 3 --dir "$dir" >/dev/null
  until curl -sf "http://$vhttp/readyz" >/dev/null; do sleep 0.05; done
  echo "node $victim restarted after SIG$signal and ready in $(( $(now_ms) - start )) ms (RSS after restart $(( $(ps -o rss= -p "$(json "[x for x in d['nodes'] if x['node_id'] == $victim][0]['pid']")") / 1024 )) MiB)"
done

# A new node joins and catches up by snapshot.
mkdir -p "$dir/n4"
port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
g4="127.0.0.1:$(port)"; h4="127.0.0.1:$(port)"; p4="127.0.0.1:$(port)"
peers=$(json "','.join(x['peer'] for x in d['nodes'])")
start=$(now_ms)
"$bin/vowd" --node-id 4 --data-dir "$dir/n4" --grpc-addr "$g4" --http-addr "$h4" --peer-addr "$p4" --join "$peers" >"$dir/n4/vowd.log" 2>&1 &
n4=$!
until vow -o json --endpoints "$eps" cluster status 2>/dev/null | python3 -c "import json,sys; s=json.load(sys.stdin)['shards'][0]; sys.exit(0 if 4 in s['voters'] else 1)"; do sleep 0.2; done
until curl -sf "http://$h4/readyz" >/dev/null; do sleep 0.1; done
echo "node 4 joined, caught up and ready in $(( $(now_ms) - start )) ms; disk $(du -sm "$dir/n4" | cut -f1) MiB; snapshot installs: $(grep -c 'snapshot installed' "$dir/n4/vowd.log")"
kill "$n4"; wait "$n4" 2>/dev/null || true
vow dev down --dir "$dir" >/dev/null
# The data is gigabytes; keep it only when asked.
[ -n "${VOW_SCALE_KEEP:-}" ] || rm -rf "$dir"
