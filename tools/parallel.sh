#!/usr/bin/env bash
# Runs commands side by side, each with its output in a log of its own; prints every log whole, in the
# order given, once all have ended; fails when any failed. `make test` runs the integration and the
# end-to-end suites this way: they use separate clusters (the end-to-end one inside its own network
# namespace), and most of their time is spent waiting on controllers, so together they take about as
# long as the longer one.
#
#   tools/parallel.sh "COMMAND 1" "COMMAND 2" ...
set -uo pipefail
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
pids=()
n=0
for cmd in "$@"; do
  bash -c "$cmd" >"$dir/$n.log" 2>&1 &
  pids+=("$!")
  n=$((n + 1))
done
start=$SECONDS
failed=0
codes=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  codes+=("$?")
done
for i in "${!pids[@]}"; do
  cat "$dir/$i.log"
done
for i in "${!pids[@]}"; do
  args=("$@")
  echo "parallel: exit ${codes[$i]}: ${args[$i]}"
  if [ "${codes[$i]}" != 0 ]; then failed=1; fi
done
echo "parallel: $((SECONDS - start)) s for $# command(s) side by side"
exit "$failed"
