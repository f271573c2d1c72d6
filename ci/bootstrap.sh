#!/usr/bin/env bash
# Set-up and entry point for a fresh Debian 12 machine; idempotent and quick when everything is present.
#   ci/bootstrap.sh run    install what is missing, then boot the default guest (the main job)
#   ci/bootstrap.sh test   install what is missing, then run the whole test suite (4 xdist workers)
#   ci/bootstrap.sh wheels DIR
#                          on a pool host (harness.remote_guest sends this script and DIR over SFTP): the
#                          same packages, then this project into .venv beside ci/ from the wheels in DIR only
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

apt_packages=(
  qemu-system-xen qemu-system-x86 qemu-utils xenstore-utils libxen-dev
  gcc make pkg-config libvirt-dev python3-venv python3-dev iproute2 procps
  postgresql chromium  # the nightly store's PostgreSQL test; the morning report's page in headless Chromium
  openssh-server  # the host pool's tests run its sshd in a namespace of their own (own config and keys; the package's service is not used)
  libvirt-daemon libvirt-daemon-driver-qemu  # the libvirt launcher's tests start a private libvirtd (harness.libvirtd; no service used)
)

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv="$top/.venv"
stamp="$venv/.installed"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "${1:-}" = wheels ]; then
  # No index: what runs on the host is exactly what was built here, and the host needs no PyPI.
  [ -d "${2:-}" ] || { echo "usage: $0 wheels DIR (a directory of wheels)" >&2; exit 2; }
  "$venv/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$2" xenpv-harness >&2
  "$venv/bin/python" -m xenpv.xenabi.native >/dev/null || { echo "bootstrap: building the C helper failed" >&2; exit 1; }
  touch "$stamp"
  exit 0
fi
# Reinstall only when the project's dependency list or package layout changed since the last install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  # nightly: the history store and report; mutation: mutmut and coverage (ci/mutation.sh, and the tests of
  # its test selection by coverage).
  "$venv/bin/pip" install -q --disable-pip-version-check -e '.[nightly,mutation]' 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$venv/bin/python" -c 'import xenpv.harness, qemu.qmp, yaml, libvirt, sqlalchemy, alembic, psycopg, matplotlib, jinja2, mutmut, coverage' || { echo "bootstrap: python install failed" >&2; exit 1; }
  touch "$stamp"
fi
# The C helper of xenabi/atomic.py (xenabi/_atomic_ops.c): rebuilt only when its source changed.
"$venv/bin/python" -m xenpv.xenabi.native >/dev/null || { echo "bootstrap: building xenabi/_atomic_ops.so failed" >&2; exit 1; }
# Bytecode for every module, written even where PYTHONDONTWRITEBYTECODE is set (CI images often set it):
# each guest agent, back-end and xenhv is a new Python process, which would otherwise compile the whole
# stack from source at every start (a third of a guest's boot). Up-to-date files are skipped.
"$venv/bin/python" -m compileall -q -j0 harness stack backends base xenabi guests >/dev/null

case "${1:-}" in
  run)  shift; exec "$venv/bin/xenpv" run "${@:-guests/default.yaml}" ;;
  # The suite runs on 4 pytest-xdist workers (most of a test's time is waiting on QEMU, dom0 and the guest
  # agent, so 4 pay on 2 cores); each has its own dom0 services, artifacts, run directories and namespaces
  # (harness.plugin). worksteal: a long test does not leave the rest of its share waiting behind it.
  # PYTEST-ARGS come after, so `-n 0` runs it in this one process.
  test) shift; exec "$venv/bin/python" -m pytest -n 4 --dist worksteal "$@" ;;
  "")   ;;
  *)    echo "usage: $0 run [GUEST.yaml] | test [PYTEST-ARGS...] | wheels DIR" >&2; exit 2 ;;
esac
