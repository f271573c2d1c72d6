#!/usr/bin/env bash
# The nightly job: the whole suite with JUnit output, then every benchmark as JSON, into one directory.
#   ci/nightly.sh [OUTDIR]     (default: artifacts/nightly-<date>)
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/artifacts/nightly-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
"$top/ci/bootstrap.sh"  # install what is missing
status=0
"$top/.venv/bin/python" -m pytest "$top/tests" --junitxml="$out/junit.xml" \
    --xenpv-artifacts="$out/failures" -o junit_family=xunit1 || status=$?
for bench in $("$top/.venv/bin/xenpv" bench --help | sed -n 's/^    \([a-z]*\) .*/\1/p'); do
    "$top/.venv/bin/xenpv" bench "$bench" --json > "$out/bench-$bench.json" 2> "$out/bench-$bench.log" || status=1
done
echo "nightly results in $out (status $status)"
exit $status
