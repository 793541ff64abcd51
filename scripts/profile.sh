#!/usr/bin/env bash
# Where the CPU goes: a three-node `vow dev` cluster under `vow bench` create-settle load, with the
# CPU time and context switches each process spends per operation, the proposals per Raft entry (the batch
# size), and (with --perf) a flat perf profile of the leader
# grouped by crate, or (with --syscalls) the three nodes' socket, fsync and futex system calls per
# operation, or (with --system) a call-graph profile of the whole machine (nodes, bench, kernel
# threads) as CPU microseconds per operation: by crate, and the kernel's main entry points.
# The figures in docs/performance.md come from this script.
#
# Usage: [SHARDS=8] scripts/profile.sh [--perf|--syscalls|--system] [CLIENTS=64] [SECONDS=12] [DIR=/tmp/vow-profile]
set -euo pipefail
cd "$(dirname "$0")/.."
perf=0; syscalls=0; system=0
if [ "${1:-}" = "--perf" ]; then perf=1; shift; fi
if [ "${1:-}" = "--syscalls" ]; then syscalls=1; shift; fi
if [ "${1:-}" = "--system" ]; then system=1; shift; fi
clients="${1:-64}"; secs="${2:-12}"; dir="${3:-/tmp/vow-profile}"
bin="${CARGO_TARGET_DIR:-$HOME/.cache/vow/target}/debug"
export VOW_VOWD="${VOW_VOWD:-$bin/vowd}"
json() { python3 -c "import json; d=json.load(open('$dir/cluster/cluster.json')); print($1)"; }
ticks() { awk "{print \$14+\$15}" "/proc/$1/stat"; }
# Context switches of all of a process's threads, voluntary and not.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n}'; }
# Proposals and the Raft entries they were batched into, summed over every node and shard.
batching() {
  for addr in $(json "' '.join(x['http'] for x in d['nodes'])"); do curl -s "http://$addr/metrics"; done |
    awk '/^vow_shard_proposals_total/ {p += $NF} /^vow_shard_proposal_batches_total/ {b += $NF} END {print p, b}'
}
hz=$(getconf CLK_TCK)
# `perf report --sort dso,symbol` lines on stdin, summed by crate (the kernel as one, libc's
# allocator apart), each percentage times SCALE, the TOP largest printed with UNIT after the total.
by_crate() {
  grep '%' | python3 -c '
import collections, re, sys
scale, unit, top = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
total = collections.Counter()
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
    if kind == "k":
        key = "kernel"
    elif sym.startswith(("mi_", "_mi_")):
        key = "mimalloc"
    elif "libc" in dso:
        key = "libc malloc/free" if re.search(r"malloc|free|_int_|unlink_chunk|consolidate", sym) else "libc other"
    else:
        c = re.match(r"(?:<|impl )*([A-Za-z_][A-Za-z0-9_]*)::", sym)
        key = c.group(1) if c else sym[:40]
    total[key] += pct * scale
print(f"  {sum(total.values()):6.1f} {unit}  in all")
for k, v in total.most_common(top):
    print(f"  {v:6.1f} {unit}  {k}")' "$@"
}

[ -e "$dir/cluster" ] && { "$bin/vow" dev down --dir "$dir/cluster" >/dev/null 2>&1 || true; }
rm -rf "$dir"; mkdir -p "$dir"
"$bin/vow" dev up --nodes 3 --shards "${SHARDS:-8}" --dir "$dir/cluster" >/dev/null
trap '"$bin/vow" dev down --dir "$dir/cluster" >/dev/null 2>&1 || true' EXIT
eps=$(json "','.join(x['grpc'] for x in d['nodes'])")
leader=$("$bin/vow" -o json --endpoints "$eps" cluster status | python3 -c "import json,sys; print(json.load(sys.stdin)['shards'][0]['leader_id'])")

env -u TOKIO_WORKER_THREADS "$bin/vow" --endpoints "$eps" bench --workload create-settle --clients "$clients" --duration "${secs}s" \
  --warmup 2s --quiet --out "$dir/bench" >"$dir/bench.txt" 2>&1 &
bench=$!
sleep 4 # warm-up plus a little
pids=$(json "' '.join(str(x['pid']) for x in d['nodes'])")
declare -A before switched
for p in $pids $bench; do before[$p]=$(ticks "$p"); switched[$p]=$(switches "$p"); done
batched=$(batching)
window=$(( secs - 4 > 3 ? secs - 4 : 3 ))
if [ "$perf" = 1 ]; then
  lpid=$(json "[x['pid'] for x in d['nodes'] if x['node_id'] == $leader][0]")
  perf record -F 999 -p "$lpid" -o "$dir/perf.data" -- sleep "$window" >/dev/null 2>&1
elif [ "$syscalls" = 1 ]; then
  events=context-switches
  for call in writev write recvfrom fdatasync futex epoll_wait; do events+=",syscalls:sys_enter_$call"; done
  perf stat -x, -e "$events" -p "$(echo $pids | tr ' ' ,)" -o "$dir/syscalls.csv" -- sleep "$window"
elif [ "$system" = 1 ]; then
  # In the background: writing a whole machine's call graphs out takes a while after the window,
  # and the bench may end meanwhile.
  perf record -a -g -F 499 -o "$dir/perf.data" -- sleep "$window" >/dev/null 2>&1 &
  recorder=$!
  sleep "$window"
else
  sleep "$window"
fi
declare -A used
for p in $pids $bench; do used[$p]=$(( $(ticks "$p") - before[$p] )); switched[$p]=$(( $(switches "$p") - switched[$p] )); done
[ "$system" = 1 ] && wait "$recorder"
read -r proposals batches <<<"$(echo "$batched" "$(batching)" | awk '{print $3 - $1, $4 - $2}')"
wait "$bench" || { cat "$dir/bench.txt"; exit 1; }
line=$(grep create-settle "$dir/bench.txt" | tail -1)
echo "$line"
ops=$(echo "$line" | awk '{print $4}')
for p in $pids $bench; do
  role=bench
  for i in 0 1 2; do
    if [ "$(json "d['nodes'][$i]['pid']")" = "$p" ]; then
      role=$([ "$(json "d['nodes'][$i]['node_id']")" = "$leader" ] && echo leader || echo follower)
    fi
  done
  python3 -c "t=${used[$p]}/$hz; print(f'{\"$role\":9} cpu {t/$window*100:5.0f}%  {t/$window/$ops*1e6:6.0f} us/op  {${switched[$p]}/$window/$ops:5.2f} switches/op')"
done
python3 -c "print(f'proposals per Raft entry {$proposals / max($batches, 1):.2f} ($proposals in $batches over the window)')"
if [ "$syscalls" = 1 ]; then
  # perf stat -x, lines: count,unit,event,...
  awk -F, -v n="$(python3 -c "print($ops * $window)")" '$1 ~ /^[0-9]+$/ {
    sub("syscalls:sys_enter_", "", $3); printf "%s %.2f  ", $3, $1 / n } END {print "per operation, three nodes"}' "$dir/syscalls.csv"
fi
if [ "$perf" = 1 ]; then
  echo "leader profile by crate (perf report -i $dir/perf.data for symbols):"
  perf report -i "$dir/perf.data" --no-children --sort dso,symbol 2>/dev/null | by_crate 1 % 18
fi
if [ "$system" = 1 ]; then
  # CPU microseconds per operation: a sample's share of the machine's CPU time over the window,
  # divided by the operations in it. Self time by crate (see by_crate), then the kernel's entry
  # points with what they call (children), which overlap one another.
  cpus=$(nproc)
  perf report -i "$dir/perf.data" --children --sort symbol -g none --stdio 2>/dev/null | grep '%' >"$dir/children.txt"
  us=$(python3 -c "print($cpus * 1e6 / 100 / $ops)")
  echo "whole machine, us of CPU per operation, by crate:"
  perf report -i "$dir/perf.data" --no-children --sort dso,symbol -g none --stdio 2>/dev/null | by_crate "$us" us 14
  python3 - "$dir" "$us" <<'PY'
import re, sys
d, scale = sys.argv[1], float(sys.argv[2])
entry = {"fdatasync": "__x64_sys_fdatasync", "sendto": "__x64_sys_sendto",
         "recvfrom": "__x64_sys_recvfrom", "futex": "__x64_sys_futex",
         "epoll_wait": "__x64_sys_epoll_wait", "page faults": "asm_exc_page_fault",
         "softirqs": "handle_softirqs", "device interrupts": "asm_common_interrupt",
         "scheduler": "__schedule", "block requeue (flushes)": "blk_mq_requeue_work"}
found = {}
for line in open(f"{d}/children.txt"):
    m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[(.)\]\s+(.*)", line)
    if m:
        # perf pads each line with columns of its own after the symbol
        found.setdefault(m.group(4).strip().split("  ")[0], float(m.group(1)))
print("kernel entry points, with their callees:")
for name, sym in entry.items():
    print(f"  {found.get(sym, 0) * scale:6.1f} us  {name}")
PY
fi
