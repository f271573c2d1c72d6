#!/usr/bin/env bash
# The nightly job: `xenpv nightly` (the whole suite with JUnit on xdist workers, failures rerun once to
# label flaky tests, every benchmark as JSON; the commit, versions and host recorded; the night stored in
# the history database), then mutation testing, then the seeded one-line bugs (ci/seeded_bugs.py), then
# the morning report from the history.
#   ci/nightly.sh [OUTDIR]     (default: artifacts/nightly-<date>-<time>)
# NIGHTLY_DB: the history's database URL (default: the SQLite file artifacts/nightly-history.sqlite);
# NIGHTLY_SINCE: how far back the report looks (default 14d).
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out=${1:-$top/artifacts/nightly-$(date +%Y%m%d-%H%M%S)}
"$top/ci/bootstrap.sh" || exit 1  # install what is missing
db=(); [ -z "${NIGHTLY_DB:-}" ] || db=(--db "$NIGHTLY_DB")
status=0
"$top/.venv/bin/xenpv" nightly --out "$out" "${db[@]}" || status=$?
# Mutation testing per module group (ci/mutation.sh), optional: NIGHTLY_MUTATION=0 skips it.
# Each group goes on from the caches of the night before (NIGHTLY_MUTATION_STATE, default
# artifacts/mutation-state): killed mutants stay killed, the others are tried again, new ones tested; a group
# larger than one night's minutes is finished over several nights.
if [ "${NIGHTLY_MUTATION:-1}" != 0 ]; then
    state=${NIGHTLY_MUTATION_STATE:-$top/artifacts/mutation-state}
    for cache in "$state"/*/mutmut-cache; do
        [ -f "$cache" ] || continue
        group=$(basename "$(dirname "$cache")")
        mkdir -p "$out/mutation/$group" && cp "$cache" "$out/mutation/$group/mutmut-cache"
    done
    "$top/ci/mutation.sh" --out "$out/mutation" --minutes "${NIGHTLY_MUTATION_MINUTES:-90}" > "$out/mutation.log" 2>&1
    rc=$?
    for cache in "$out"/mutation/*/mutmut-cache; do
        [ -f "$cache" ] || continue
        group=$(basename "$(dirname "$cache")")
        mkdir -p "$state/$group" && cp "$cache" "$state/$group/mutmut-cache"
    done
    [ $rc -ne 1 ] || status=1  # 2 (a group under its target) is reported in mutation/scores.txt, not a failure
fi
# The rules' hand-made one-line bugs (ci/seeded-bugs.toml): each must still fail the tests it names.
mkdir -p "$out" && "$top/.venv/bin/python" "$top/ci/seeded_bugs.py" > "$out/seeded-bugs.log" 2>&1 || status=1
"$top/.venv/bin/xenpv" report --since "${NIGHTLY_SINCE:-14d}" "${db[@]}" --out "$out/report" || status=1
echo "nightly results in $out (status $status); the morning report: $out/report/report.html"
exit $status
