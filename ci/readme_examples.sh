#!/usr/bin/env bash
# Runs every command the README's command block shows (the pytest ones are the suite itself, .ci/run) and
# fails when any of them fails. A crash dump for `xenpv repro` and `xenpv triage` comes from a guest told
# to stop at its console.
#   ci/readme_examples.sh [OUTDIR]
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
x=.venv/bin/xenpv
out=${1:-$(mktemp -d /tmp/xpv-readme-XXXXXX)}
mkdir -p "$out"
failed=()
step() {
    echo "== $*"
    if ! "$@"; then failed+=("$*"); echo "!! failed: $*"; fi
}
step "$x" version
step "$x" run guests/default.yaml
step "$x" run guests/vendor-c000.yaml
step "$x" pci guests/default.yaml --assign
step "$x" bench machine
step "$x" clean --dry-run
step "$x" clean
# A dump to replay: the console's injected STOP, kept in the run's artifacts.
printf 'bugcheck 0xE2\n' | "$x" run guests/default.yaml --console --artifacts "$out/run" > "$out/console.txt" 2>&1
dump=$(find "$out/run" -name 'crash-*.json' | head -1)
if [ -z "$dump" ]; then failed+=("no crash dump from the console's bugcheck"); cat "$out/console.txt"
else
    step "$x" repro "$dump" --runs 20
    step "$x" triage "$out/run"
fi
step "$x" explore --seconds 60 --seed 1
# The nightly's seeded one-line bugs (the README's nightly section): the list, and one of them caught.
step .venv/bin/python ci/seeded_bugs.py --list
step .venv/bin/python ci/seeded_bugs.py xs-rm-needs-only-read
if [ ${#failed[@]} -gt 0 ]; then
    printf 'README examples that failed:\n'; printf '  %s\n' "${failed[@]}"; exit 1
fi
echo "every README example ran and exited 0 (outputs in $out)"
