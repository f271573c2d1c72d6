#!/usr/bin/env bash
# The nightly job: the whole suite with JUnit output, every benchmark as JSON, then mutation testing, into one
# directory.
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
# Mutation testing per module group (ci/mutation.sh), optional: NIGHTLY_MUTATION=0 skips it.
if [ "${NIGHTLY_MUTATION:-1}" != 0 ]; then
    "$top/ci/mutation.sh" --out "$out/mutation" --minutes "${NIGHTLY_MUTATION_MINUTES:-90}" > "$out/mutation.log" 2>&1
    [ $? -ne 1 ] || status=1  # 2 (a group under its target) is reported in mutation/scores.txt, not a failure
fi
echo "nightly results in $out (status $status)"
exit $status
