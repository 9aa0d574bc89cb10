#!/usr/bin/env bash
# The cloudmap-xds demo in one command, on this machine, 127.0.0.1 only (~30 s after the build):
#
#   scripts/demo.sh            run it, print every step, stop everything it started
#   scripts/demo.sh --keep     run it and leave everything up (prints the /describe and /ui URLs)
#   scripts/demo.sh --stop     stop what a --keep run left running
#   scripts/demo.sh --json     report on stderr, one JSON summary line on stdout (for tests)
#
# Steps: Cloud Map emulator (moto) with namespace `demo` / service `echo`; six demo-servers in
# us-east-1a/b/c registered like ECS does; cloudmap-xds; one `demo-client serve` per zone →
# (2) every zone's client calls echo.demo: ~100 % same zone → (3) zone a's servers are killed and
# marked UNHEALTHY during a load from zone a: the calls fail over to b and c, < 1 % fail →
# (4) zone a still down: 100 % to b and c → (5) ECS replaces the tasks: ~100 % same zone again.
#
# Binaries: target/debug/{cloudmap-xds,demo-server,demo-client}, built (or brought up to date)
# by `cargo build -p cloudmap-xds -p demo-server -p demo-client` at every run; CLOUDMAP_XDS_BIN,
# DEMO_SERVER_BIN and DEMO_CLIENT_BIN use given binaries instead (no build). Peers (moto, boto3) come from
# scripts/install-peers.sh into .peers/py, or from the venv in PEERS_PY when set.
# Every process is stopped by PID on exit, Ctrl-C or SIGTERM; logs stay in a temp dir (printed).
# Extra arguments go to scripts/demo.py (-n CALLS, -c WORKERS; see scripts/demo.py --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KEEP=0
JSON=0
for a in "$@"; do
    case "$a" in
        --keep) KEEP=1 ;;
        --json) JSON=1 ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    esac
done

note() { if [[ $JSON == 1 ]]; then echo "$*" >&2; else echo "$*"; fi; }

PEERS_PY="${PEERS_PY:-}"
if [[ " $* " == *" --stop "* ]]; then
    exec "${PEERS_PY:-$ROOT/.peers/py}/bin/python" "$ROOT/scripts/demo.py" --stop
fi

# --- binaries (debug build) --------------------------------------------------------------------
[[ -n ${CLOUDMAP_XDS_BIN:-}${DEMO_SERVER_BIN:-}${DEMO_CLIENT_BIN:-} ]] && DEMO_BINS_GIVEN=1
export CLOUDMAP_XDS_BIN="${CLOUDMAP_XDS_BIN:-$ROOT/target/debug/cloudmap-xds}"
export DEMO_SERVER_BIN="${DEMO_SERVER_BIN:-$ROOT/target/debug/demo-server}"
export DEMO_CLIENT_BIN="${DEMO_CLIENT_BIN:-$ROOT/target/debug/demo-client}"
# Build what the demo runs (only those three packages), every time: cargo rebuilds what changed
# since the last build and is done in about a second when nothing did — never a stale binary.
# Binaries given through the variables are used as they are.
if [[ -z ${DEMO_BINS_GIVEN:-} ]]; then
    note "==> cargo build -p cloudmap-xds -p demo-server -p demo-client (debug; the first build takes minutes)"
    cargo build -p cloudmap-xds -p demo-server -p demo-client --bins >&2
fi
for b in "$CLOUDMAP_XDS_BIN" "$DEMO_SERVER_BIN" "$DEMO_CLIENT_BIN"; do
    [[ -x $b ]] || { echo "demo: $b is missing after the build" >&2; exit 1; }
done

# --- peers (moto as Cloud Map, boto3) ----------------------------------------------------------
if [[ -z $PEERS_PY ]]; then
    "$ROOT/scripts/install-peers.sh" >&2
    PEERS_PY="$ROOT/.peers/py"
fi
[[ -x $PEERS_PY/bin/moto_server ]] || { echo "demo: no moto_server in $PEERS_PY (run scripts/install-peers.sh)" >&2; exit 1; }
export PEERS_PY

LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/cloudmap-xds-demo.XXXXXX")"
note "==> cloudmap-xds demo; logs in $LOG_DIR"

# --- run, and stop everything on the way out ---------------------------------------------------
DEMO_PID=""
RC=1
leftovers() {
    # demo.py stops every process it started; this is the safety net for a demo.py that died
    # itself (it lists each child as "PID EXE NAME" in $LOG_DIR/pids before anything else).
    [[ -f $LOG_DIR/pids ]] || return 0
    local pid exe name cmd alive=()
    while read -r pid exe name; do
        [[ -r /proc/$pid/cmdline ]] || continue
        # the same executable, not a reused PID (a script such as moto_server runs as "python3 SCRIPT")
        cmd="$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | head -n2)" || continue
        grep -qxF -- "$exe" <<< "$cmd" || continue
        kill -TERM "$pid" 2>/dev/null && alive+=("$pid")
    done < "$LOG_DIR/pids"
    ((${#alive[@]})) || return 0
    echo "demo: stopped leftover processes ${alive[*]}" >&2
    sleep 2
    for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
on_exit() {
    if [[ -n $DEMO_PID ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        kill -TERM "$DEMO_PID" 2>/dev/null || true
        wait "$DEMO_PID" 2>/dev/null || true
    fi
    if ! [[ $KEEP == 1 && $RC == 0 ]]; then leftovers; fi
}
on_signal() { [[ -n $DEMO_PID ]] && kill -TERM "$DEMO_PID" 2>/dev/null || true; }
trap on_exit EXIT
trap on_signal INT TERM

# In the background so that the traps run at once; demo.py handles INT/TERM by stopping everything.
"$PEERS_PY/bin/python" "$ROOT/scripts/demo.py" --log-dir "$LOG_DIR" "$@" &
DEMO_PID=$!
while :; do
    set +e
    wait "$DEMO_PID"
    RC=$?
    set -e
    # wait returns early (status > 128) when a trapped signal arrives; the demo is then stopping.
    kill -0 "$DEMO_PID" 2>/dev/null || break
done
DEMO_PID=""
exit "$RC"
