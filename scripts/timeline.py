#!/usr/bin/env python3
"""The syscalls of a `vow dev` cluster's nodes on one clock, to see where a request's time goes.

Usage (as root, with linux-perf; the docs/performance.md "one client" trace came from this):

    vow dev up --nodes 3 --shards 1 --dir /tmp/tl
    vow --endpoints ... bench --workload create-settle --clients 1 --duration 8s &
    sleep 4; scripts/timeline.py /tmp/tl/cluster.json 0.2 > timeline.txt

It runs `perf trace` on every node for the given seconds (socket reads and writes, WAL writes
and fsyncs), then prints one line per syscall in time order: milliseconds since the trace
began, duration, node (n1, n2, ... in cluster.json order), thread, call. With one client the
requests do not overlap, so a request can be followed from the client's socket through the
leader, the followers and back.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

CALLS = "sendto,recvfrom,writev,write,read,fdatasync,fsync,sendmsg,recvmsg,pwrite64"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    nodes = json.load(open(sys.argv[1]))["nodes"]
    pids = [n["pid"] for n in nodes]
    node_of = {}
    for i, pid in enumerate(pids):
        for tid in os.listdir(f"/proc/{pid}/task"):
            node_of[int(tid)] = f"n{i + 1}"
    with tempfile.NamedTemporaryFile(suffix=".trace") as out:
        subprocess.run(
            ["perf", "trace", "-p", ",".join(map(str, pids)), "-e", CALLS, "-o", out.name,
             "--", "sleep", sys.argv[2]],
            check=True,
        )
        rows = []
        for line in open(out.name):
            m = re.match(r"\s*([\d.]+) \(\s*([\d.]*)\s*(?:ms)?\): (\S+)/(\d+) (\w+)\((.*)", line)
            if m and float(m.group(1)) < 1e9:  # an unfinished call's continuation has no start
                rows.append((float(m.group(1)), m.group(2), node_of.get(int(m.group(4)), "?"),
                             f"{m.group(3)[:10]}/{m.group(4)}", m.group(5), m.group(6)[:70]))
    for row in sorted(rows):
        print("%10.3f %7s %s %-18s %s(%s" % row)


if __name__ == "__main__":
    main()
