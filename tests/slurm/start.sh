#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine: munged (as user munge), slurmctld,
# and `slurmd -N localhost`, configured by tests/slurm/slurm.conf.in (no accounting,
# MinJobAge=600, see docs/method.md §2). Installs the Debian packages first when missing.
#
# Idempotent: returns at once when the daemons run with the current configuration and
# the node takes jobs; restarts its own daemons when slurm.conf.in changed.
# Exit 0 = the cluster is usable; otherwise one line on stderr says why, and exit 1.
# Used by tests/test_slurm.py; by hand: `sudo bash tests/slurm/start.sh`.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CONF=/etc/slurm/slurm.conf
MARKER='ClusterName=tvt-test'
PACKAGES=(munge slurmctld slurmd slurm-client)
WAIT_S=30

fail() { echo "SLURM cannot start: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && [ -d "/proc/$(cat "$1")" ]; }  # also for daemons of another user
node_state() { timeout 5 sinfo -h -N -n localhost -o %T 2>/dev/null | head -n1; }
usable() { alive /run/slurmctld.pid && alive /run/slurmd.pid \
           && [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing) ]]; }

render_conf() {
  local mem
  mem=$(slurmd -C 2>/dev/null | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
  [ -n "$mem" ] && sed "s/@REAL_MEMORY@/$mem/" "$HERE/slurm.conf.in"
}

if command -v slurmd >/dev/null 2>&1 && usable && [ "$(render_conf)" = "$(cat "$CONF" 2>/dev/null)" ]; then
  echo "SLURM already running (node localhost: $(node_state))"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || fail "not running and this needs root (to install packages and start the daemons)"

# --- packages ---------------------------------------------------------------------------
missing=()
for cmd in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || missing+=("${cmd##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and no apt-get to install them"
  echo "installing Debian packages: ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
    >/tmp/tvt-slurm-apt.log 2>&1 || fail "apt-get install failed (see /tmp/tvt-slurm-apt.log)"
fi

# --- configuration (ours only: a site's slurm.conf is never touched) -------------------
if [ -e "$CONF" ] && ! grep -qx "$MARKER" "$CONF"; then
  fail "$CONF exists and is not this test cluster's (no '$MARKER'); not touching it"
fi
new_conf=$(render_conf) || fail "'slurmd -C' reports no node memory"
if [ ! -e "$CONF" ] || [ "$new_conf" != "$(cat "$CONF")" ]; then
  mkdir -p /etc/slurm
  printf '%s\n' "$new_conf" > "$CONF"
  # daemons started under an older file must re-read it: stop ours (by their pid files)
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    alive "$pidfile" || continue
    kill "$(cat "$pidfile")"
    for _ in $(seq 60); do alive "$pidfile" || break; sleep 0.5; done
    alive "$pidfile" && fail "$(basename "$pidfile" .pid) (pid $(cat "$pidfile")) does not stop"
  done
fi
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm

# --- daemons ----------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create \
    || fail "cannot create /etc/munge/munge.key"
  runuser -u munge -- munged || fail "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || fail "munge credentials do not round-trip"
fi
alive /run/slurmctld.pid || slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
alive /run/slurmd.pid || slurmd -N localhost || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"

deadline=$((SECONDS + WAIT_S))
while [ $SECONDS -lt $deadline ]; do
  state=$(node_state)
  case "$state" in
    idle*|mixed*|allocated*|completing*) echo "SLURM running (node localhost: $state)"; exit 0 ;;
    down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 ;;
  esac
  sleep 1
done
fail "node localhost not ready after ${WAIT_S} s (state '${state:-none}': $(timeout 5 sinfo -h -R 2>/dev/null | head -n1);" \
     "$(tail -n 2 /var/log/slurm/slurmctld.log 2>/dev/null | tr '\n' ' '))"
