#!/usr/bin/env bash
# Mutation testing (mutmut 2) of the modules that enforce the harness's rules, one module group at a time, for
# the nightly job (issue 18). Prints the score per group: killed / (killed + survived), where mutants that
# cannot change a rule are skipped before they run (logging calls, error-message text, and the equivalent
# mutants listed with a reason in ci/mutation-equivalent.txt; see ci/mutmut_config.py).
#
#   ci/mutation.sh [--out DIR] [--minutes N] [--target PCT] [GROUP...]    (default: every group)
#   ci/mutation.sh --list
#
# Each group runs in a private copy of the work tree (mutmut rewrites the files it mutates), its own fixed
# list of unit test files as the runner (pytest -x: the first failure kills the mutant; each mutant first runs
# only the tests that executed its line, by coverage, see ci/mutmut_config.py), niced, one mutant at
# a time, for at most --minutes (default 120; mutants not reached are reported as untested). Results per
# group go to OUT/<group>/: the mutmut cache (a later run with the same tests only tries what is new), the
# log, survivors.txt (the to-do list: add the test that kills each, or list it as equivalent) and
# summary.json. Exit status: 0, or 1 if a group could not run (its tests fail unmutated), or 2 if a group
# scored below --target (default 85).
set -uo pipefail
# The whole script is one function, read by bash before it runs: editing this file during a run is safe.
main() {
top=$(cd "$(dirname "$0")/.." && pwd)
py="$top/.venv/bin/python"
out="$top/artifacts/mutation-$(date +%Y%m%d-%H%M%S)"
minutes=120
target=85

groups=(requests xenstored xenhv driver-model)
declare -A paths tests
# Each group's test files run fastest first (measured one file at a time with the mutation profile below);
# files, not a directory holding a file listed before it (pytest then skips the rest of that directory):
# pytest -x stops at the first failure, so a mutant the quick rule tests kill never waits for the slow ones.
# Back-ends' request and ring validation.
paths[requests]="backends/blkback/requests.py,backends/blkback/queue.py,backends/netback/datapath.py,xenabi/ring.py"
tests[requests]="tests/unit/blkback/test_requests.py tests/unit/blkback/test_queue_rules.py
  tests/unit/blkback/test_queue_stop.py tests/unit/netback/test_datapath.py tests/unit/netback/test_datapath_rules.py
  tests/unit/xenabi/test_xenabi_ring.py tests/unit/xenabi/test_xenabi_ring_batch.py
  tests/unit/xenabi/test_ring_lifetime.py tests/unit/xenabi/test_ring_bounds.py tests/unit/fuzz/test_blkif_fuzz.py tests/unit/fuzz/test_netif_fuzz.py
  tests/conformance/test_xenabi_headers.py"
# xenstored's core, permissions, quotas, transactions, paths and ring (both ends of the ring are xenabi's).
paths[xenstored]="backends/xenstored/core.py,backends/xenstored/perms.py,backends/xenstored/quotas.py,backends/xenstored/transactions.py,backends/xenstored/tree.py,backends/xenstored/paths.py,xenabi/xs_ring.py"
tests[xenstored]="tests/unit/xenstored/test_xs_stateful.py tests/unit/xenstored/test_xs_fuzz.py
  tests/unit/xenstored/test_xs_rules.py tests/unit/xenstored/test_xs_libxenstore_cases.py
  tests/unit/xenstored/test_xs_edge_cases.py tests/unit/fuzz/test_xs_ring_fuzz.py
  tests/unit/xenstored/test_xs_qemu_node_cases.py tests/unit/xenstored/test_xs_ring.py
  tests/unit/xenstored/test_xs_event_batch.py tests/unit/xenstored/test_xs_socket.py tests/unit/xenstored/test_xs_cli.py"
# xenhv's hypercalls, event channels (and the 2-level delivery rule the vCPU shares), grant table and unplug ports.
paths[xenhv]="backends/xenhv/hypercall.py,backends/xenhv/evtchn.py,backends/xenhv/gnttab.py,backends/xenhv/unplug.py,xenabi/evtchn_2l.py"
tests[xenhv]="tests/unit/xenabi/test_evtchn_2l.py tests/unit/xenhv/test_xenhv_server_containment.py tests/unit/xenhv/test_xenhv_evtchn.py
  tests/unit/fuzz/test_xenhv_fuzz.py tests/unit/fuzz/test_unplug_fuzz.py tests/unit/xenhv/test_xenhv_gnttab_concurrency.py
  tests/unit/xenhv/test_xenhv_gnttab.py tests/unit/xenhv/test_xenhv_rules.py"
# The driver model: XENFILT, XENBUS FDO/PDO, xen.sys unplug, the installer.
paths[driver-model]="stack/drivers/xenfilt/driver.py,stack/drivers/xenbus/fdo.py,stack/drivers/xenbus/pdo.py,stack/drivers/xen/unplug.py,stack/install/installer.py"
tests[driver-model]="tests/unit/install/test_installer_veto_bounds.py tests/unit/drivers_core/test_fdo_suspend.py tests/unit/drivers_core/test_fdo_start_stop.py tests/unit/drivers_core/test_query_interface.py
  tests/unit/drivers_core/test_emulated.py tests/unit/drivers_core/test_set_active.py
  tests/unit/drivers_core/test_unplug.py tests/unit/drivers_core/test_pdo_ids.py tests/unit/drivers_core/test_xenbus_pdo.py tests/unit/drivers_core/test_xenfilt.py
  tests/unit/drivers_core/test_safe_mode_and_s4.py tests/unit/drivers_core/test_new_device_id.py
  tests/unit/drivers_core/test_supported_classes.py tests/unit/drivers_fidelity/test_xenbus_pdo_capabilities.py
  tests/unit/drivers_fidelity/test_xentouch.py tests/unit/xenbus_interfaces tests/unit/install/test_installer.py
  tests/unit/install/test_registry_layout.py tests/unit/install/test_coinstaller_era.py tests/unit/install/test_monitor.py
  tests/unit/install/test_monitor_service.py"

selected=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --target) target=$2; shift 2 ;;
    --list) for g in "${groups[@]}"; do echo "$g: ${paths[$g]}"; done; exit 0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "mutation.sh: unknown option $1" >&2; exit 2 ;;
    *) [ -n "${paths[$1]:-}" ] || { echo "mutation.sh: no group $1 (try --list)" >&2; exit 2; }
       selected+=("$1"); shift ;;
  esac
done
[ ${#selected[@]} -gt 0 ] || selected=("${groups[@]}")

if ! "$py" -c 'import mutmut, pytest_cov' 2>/dev/null; then
  "$py" -m pip install -q --disable-pip-version-check -e "$top[mutation]" >&2 || { echo "mutation.sh: cannot install mutmut" >&2; exit 1; }
fi
mkdir -p "$out"
work=""
cleanup() { [ -n "$work" ] && rm -rf "$work"; work=""; }
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

status=0
for g in "${selected[@]}"; do
  gout="$out/$g"
  mkdir -p "$gout"
  # A private copy of the tree (tracked and new files), importable as `xenpv` ahead of the editable install.
  work=$(mktemp -d /tmp/xenpv-mutation.XXXXXX)
  (cd "$top" && git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work") || exit 1
  mkdir -p "$work/.xenpv-ns/xenpv"
  for f in harness stack backends base xenabi guests; do ln -s "../../$f" "$work/.xenpv-ns/xenpv/$f"; done
  cp "$top/ci/mutmut_config.py" "$work/mutmut_config.py"
  if [ -f "$gout/mutmut-cache" ]; then
    # A later run keeps every killed mutant and tries each other one again (the to-do list may be done, the
    # equivalents list may have changed).
    cp "$gout/mutmut-cache" "$work/.mutmut-cache"
    "$py" -c 'import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute("UPDATE Mutant SET status = '"'untested'"' WHERE status NOT IN ('"'ok_killed', 'ok_suspicious'"')"); db.commit()' "$work/.mutmut-cache"
  fi
  export PYTHONPATH="$work/.xenpv-ns" XENPV_MUTATION_EQUIVALENT="$top/ci/mutation-equivalent.txt"
  # A mutant can break a test's own cleanup: its temporary files go into the private copy, removed with it,
  # not into /tmp (a xenstored run left a hundred ring-fuzz directories there).
  export TMPDIR="$work/tmp"
  mkdir -p "$TMPDIR"
  # Few, fixed Hypothesis examples per test (the root conftest.py caps tests' own @settings too) and a 1 s
  # socket fuzz: a mutant costs seconds instead of the 81-90 s of full fuzzing (xenstored, issue 18).
  export XENPV_HYPOTHESIS_PROFILE=mutation XS_FUZZ_SECONDS=1
  # ci/mutation_runner.py: pytest's outcome as mutmut 2 reads it (only status 1 kills). pytest-timeout ends
  # a mutant that loops for ever within 20 s (the slowest test of any group takes about 2 s here) instead of
  # holding the run; its thread method ends the whole pytest process, because SIGALRM's exception was caught
  # by Hypothesis, which went on shrinking a looping stateful test for minutes (xenstored).
  runner="$py $work/ci/mutation_runner.py -p no:cacheprovider -x -q --no-header -o timeout=20 -o timeout_method=thread $(echo ${tests[$g]})"
  # Test selection by coverage (ci/mutmut_config.py): one run of the group's tests records which test files
  # execute each line; a mutant runs those first, and the whole list only if it survives them.
  export XENPV_MUTATION_RUNNER="$py $work/ci/mutation_runner.py -p no:cacheprovider -x -q --no-header -o timeout=20 -o timeout_method=thread"
  export XENPV_MUTATION_SELECTION="$work/.mutation-select.json"
  (cd "$work" && nice -n 10 "$py" -m pytest -p no:cacheprovider -q --no-header -p pytest_cov --cov=. \
      --cov-context=test --cov-report= $(echo ${tests[$g]}) > "$gout/coverage.log" 2>&1 \
   && COVERAGE_FILE=.coverage "$py" mutmut_config.py select .coverage "$XENPV_MUTATION_SELECTION" \
      $(echo ${tests[$g]})) 2>&1 | sed 's/^/mutation: /' >&2
  [ -s "$XENPV_MUTATION_SELECTION" ] || echo "mutation: $g: no test selection (see $gout/coverage.log): every mutant runs the whole list" >&2
  # mutmut 2 parses with parso 0.8, which cannot read some valid Python (raw f-strings with "\{", as
  # installer.py's registry paths): such a file is left out of the run and named in not-mutated.txt.
  mutate=$(cd "$work" && "$py" -c '
import sys
import parso
readable = []
for path in sys.argv[1].split(","):
    try:
        parso.parse(open(path).read(), error_recovery=False)
        readable.append(path)
    except parso.ParserSyntaxError as exc:
        print(f"{path}: not mutated: mutmut'"'"'s parser (parso) cannot read it: {exc}", file=sys.stderr)
print(",".join(readable))
' "${paths[$g]}" 2> "$gout/not-mutated.txt")
  [ -s "$gout/not-mutated.txt" ] && sed 's/^/mutation: /' "$gout/not-mutated.txt" >&2
  echo "mutation: $g: ${paths[$g]} (at most $minutes min)" >&2
  start=$(date +%s)
  # SIGINT at the deadline: mutmut restores the file it mutated and stops; what it did not reach is untested.
  (cd "$work" && timeout --signal=INT --kill-after=60 "${minutes}m" nice -n 10 "$py" -m mutmut run \
      --paths-to-mutate "$mutate" --tests-dir tests --runner "$runner" --rerun-all --simple-output --no-progress --CI) \
      > "$gout/mutmut.log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  cp "$work/.mutmut-cache" "$gout/mutmut-cache" 2>/dev/null
  # A mutmut killed mid-mutant (its deadline's SIGKILL) leaves that mutant in the file and the original in
  # FILE.bak: put the original back before the report reads the sources.
  find "$work" -name '*.py.bak' -print0 | while IFS= read -r -d '' bak; do mv -f "$bak" "${bak%.bak}"; done
  (cd "$work" && "$py" - "$g" "$gout" "$seconds" "$rc" "$target" <<'EOF'
import json, sqlite3, sys
from pathlib import Path
from mutmut import Context, RelativeMutationID, mutate
import mutmut_config

group, gout, seconds, rc, target = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
db = sqlite3.connect(".mutmut-cache")
rows = db.execute("SELECT f.filename, l.line, l.line_number, m.\"index\", m.status FROM Mutant m "
                  "JOIN Line l ON m.line = l.id JOIN SourceFile f ON l.sourcefile = f.id "
                  "ORDER BY f.filename, l.line_number, m.\"index\"").fetchall() if Path(".mutmut-cache").exists() else []
counts = {"killed": 0, "timeout": 0, "survived": 0, "untested": 0}
skipped: dict[str, int] = {}
survivors = []
sources: dict[str, str] = {}
for filename, line, line_number, index, status in rows:
    if status in ("ok_killed", "ok_suspicious"):
        counts["killed"] += 1
    elif status == "bad_timeout":
        counts["timeout"] += 1
    elif status == "untested":
        counts["untested"] += 1
    else:
        source = sources.setdefault(filename, Path(filename).read_text())
        mutated, _ = mutate(Context(source=source, mutation_id=RelativeMutationID(line, index, line_number),
                                    filename=filename))
        new = mutated.split("\n")[line_number]
        if status == "skipped":
            why = mutmut_config.classify(filename, line_number, line, new) or "skipped"
            why = why.split(":")[0]
            skipped[why] = skipped.get(why, 0) + 1
        else:
            counts["survived"] += 1
            survivors.append(f"{filename}:{line_number + 1}\n  - {line.strip()}\n  + {new.strip()}\n"
                             f"  equivalent? {filename} || {line.strip()} || {new.strip() or mutmut_config.DELETED} || <reason>\n")
detected = counts["killed"] + counts["timeout"]
tested = detected + counts["survived"]
score = 100.0 * detected / tested if tested else 0.0
not_mutated = (gout / "not-mutated.txt").read_text().splitlines() if (gout / "not-mutated.txt").exists() else []
summary = {"group": group, "seconds": seconds, "mutmut_exit": rc, "score": round(score, 1), "target": target,
           **counts, "skipped": skipped, "total": len(rows), "not_mutated": not_mutated}
(gout / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
(gout / "survivors.txt").write_text("".join(survivors))
print(f"{group:13} score {score:5.1f}%  killed {detected} (timeouts {counts['timeout']})  survived "
      f"{counts['survived']}  untested {counts['untested']}  skipped {sum(skipped.values())} {skipped}  "
      f"{seconds // 60} min {seconds % 60} s")
sys.exit(1 if not tested else 2 if score < target or counts["untested"] else 0)
EOF
  ) | tee -a "$out/scores.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 1 ]; then
    echo "mutation: $g: nothing was tested; see $gout/mutmut.log" >&2; status=1
  elif [ "$rc" -eq 2 ] && [ "$status" -eq 0 ]; then
    status=2
  fi
  cleanup
done
echo "mutation results in $out (status $status)"
exit $status
}
main "$@"
