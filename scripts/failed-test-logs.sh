#!/usr/bin/env bash
# Prints the nodes' logs of every cluster test that failed a try in a nextest run.
#
#   scripts/failed-test-logs.sh DIR
#
# DIR is the run's VOW_TEST_LOGS directory (every DevCluster copies its nodes' logs to
# DIR/<test>-<pid>/ when it goes, tests/src/lib.rs) holding nextest's output as DIR/nextest.txt.
# A test that returns an error, rather than panicking, has no other way to show what its nodes
# did, and a FLAKY test passes on its retry and shows nothing at all: this is how a failure in
# CI can be read afterwards. Each log is cut to its last LINES_PER_LOG lines (default 200).
set -euo pipefail
dir=$1
lines=${LINES_PER_LOG:-200}
# nextest reports a failed try as `TRY n FAIL [ time] crate::binary test` (retried) or
# `FAIL [ time] crate::binary test`, and a test that passed on a retry as `FLAKY m/n [...]`.
failed=$(grep -E '^ *(TRY [0-9]+ )?(FAIL|FLAKY|SIGSEGV|SIGABRT|TIMEOUT)( |$)' "$dir/nextest.txt" \
  | awk '{print $NF}' | sort -u || true)
[ -n "$failed" ] || exit 0
for test in $failed; do
  name=${test//::/-}
  found=0
  for run in "$dir/$name"-*/; do
    [ -d "$run" ] || continue
    found=1
    for log in "$run"*.log; do
      [ -f "$log" ] || continue
      echo "==== $test: $(basename "$run")/$(basename "$log") (last $lines lines) ===="
      tail -n "$lines" "$log"
    done
  done
  [ "$found" = 1 ] || echo "==== $test: no node logs kept (not a cluster test, or it failed before its cluster started)"
done
