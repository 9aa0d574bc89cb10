#!/usr/bin/env bash
# Benchmarks of cloudmap-xds with the load generator (loadgen/) — see BENCHMARKS.md.
#
#   scripts/bench.sh           the whole set, release builds (~8 min on 2 cores once built, +2.5 min per
#                              extra BENCH_REPEAT round; a cold release + criterion build takes 15–30 min):
#                              criterion micro-benchmarks; push propagation for N = 100, 1,000,
#                              10,000 clients in-process and against a cloudmap-xds process with
#                              moto (RSS per idle stream, CPU per push per client); Cloud Map
#                              API calls per minute for N = 10 and 1,000; start to /ready with
#                              100 services × 50 instances.
#   scripts/bench.sh --smoke   N = 200 in-process and against moto, debug builds, < 60 s once
#                              built; fails if the load generator fails or a client misses an update.
#
# Results: one JSON file per run and summary.md in $BENCH_OUT (default target/bench/<mode>).
# BENCH_REPEAT=R repeats each propagation run R times; BENCH_PROFILE=debug|release overrides
# the build profile; BENCH_PERF=1 records a CPU profile of the control plane during the external
# N = 10,000 run (perf, software clock: $BENCH_OUT/external-sotw-10000-r1.perf.txt).
# Needs the peers of scripts/install-peers.sh (moto), installed if missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=full
case "${1:-}" in
    --smoke) MODE=smoke ;;
    "") ;;
    *) echo "usage: scripts/bench.sh [--smoke]" >&2; exit 2 ;;
esac
if [[ $MODE == smoke ]]; then PROFILE="${BENCH_PROFILE:-debug}"; else PROFILE="${BENCH_PROFILE:-release}"; fi
REPEAT="${BENCH_REPEAT:-1}"
OUT="${BENCH_OUT:-$ROOT/target/bench/$MODE}"
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/summary.md

# 10,000 streams over 100 connections need few descriptors, but allow one connection per client too.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "==> building loadgen and cloudmap-xds ($PROFILE)"
if [[ $PROFILE == release ]]; then
    cargo build --release -p loadgen -p cloudmap-xds
else
    cargo build -p loadgen -p cloudmap-xds
fi
LOADGEN="$ROOT/target/$PROFILE/loadgen"
CP="$ROOT/target/$PROFILE/cloudmap-xds"
[[ -x "$ROOT/.peers/py/bin/moto_server" ]] || "$ROOT/scripts/install-peers.sh"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() { # URL SECONDS
    local deadline=$((SECONDS + $2))
    until curl -sf -o /dev/null "$1"; do
        ((SECONDS < deadline)) || { echo "bench: $1 did not come up" >&2; return 1; }
        sleep 0.1
    done
}

# moto, and the counting proxy the control plane reads Cloud Map through.
MOTO_PORT="$(free_port)"
MOTO="http://127.0.0.1:$MOTO_PORT"
"$ROOT/.peers/py/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$OUT/moto.log" 2>&1 &
PIDS+=($!)
PROXY_PORT="$(free_port)"
PROXY="http://127.0.0.1:$PROXY_PORT"
"$LOADGEN" count-proxy --listen "127.0.0.1:$PROXY_PORT" --upstream "$MOTO" >"$OUT/proxy.log" 2>&1 &
PIDS+=($!)
wait_http "$MOTO/moto-api/" 30
wait_http "$PROXY/__loadgen/counts" 30
export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=loadgen AWS_SECRET_ACCESS_KEY=loadgen

moto_reset() { curl -sf -X POST "$MOTO/moto-api/reset" >/dev/null; }

# The loadgen's change marker is an instance attribute; it reaches clients as endpoint metadata.
CP_CONFIG="$OUT/cloudmap-xds.toml"
printf '[default]\nmetadata_attributes = ["LOADGEN_CHANGE"]\n' >"$CP_CONFIG"

CP_PID=""
start_cp() { # LABEL NAMESPACE [cloudmap-xds flags...]; sets CP_PID, XDS, ADMIN
    local label="$1" namespace="$2"
    shift 2
    XDS="127.0.0.1:$(free_port)"
    ADMIN="127.0.0.1:$(free_port)"
    AWS_ENDPOINT_URL="$PROXY" "$CP" --namespace "$namespace" --xds-listen "$XDS" --admin-listen "$ADMIN" --config "$CP_CONFIG" "$@" \
        >"$OUT/$label.cp.log" 2>&1 &
    CP_PID=$!
    PIDS+=("$CP_PID")
}

stop_cp() {
    kill "$CP_PID" 2>/dev/null || true
    wait "$CP_PID" 2>/dev/null || true
}

load() { cut -d' ' -f1 /proc/loadavg; }

# One line per run: what it measured, and the machine's load when it started.
note() { # LABEL
    python3 - "$OUT/$1.json" "$1" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); label, load = sys.argv[2], sys.argv[3]
p = r["propagation"]
line = (f"{label}: {r['mode']} {r['protocol']} N={r['clients']} K={r['changes']} "
        f"p50={p['p50_ms']:.1f}ms p99={p['p99_ms']:.1f}ms max={p['max_ms']:.1f}ms "
        f"receipts={p['count']}/{p['expected']} connect={r['connect_seconds']:.1f}s load={load}")
cp = r.get("control_plane")
if cp:
    line += (f" rss/stream={cp['rss_per_stream_bytes']/1024:.1f}KiB"
             f" cpu/push/client={cp['cpu_per_push_per_client_us']:.1f}us")
api = r.get("api_calls")
if api:
    line += f" api/min={api['per_minute']:.1f}"
print(line)
EOF
}

in_process() { # LABEL CLIENTS CHANGES [loadgen flags...]
    local label="$1" clients="$2" changes="$3" l
    shift 3
    l="$(load)"
    "$LOADGEN" run --in-process --clients "$clients" --changes "$changes" --json "$@" >"$OUT/$label.json"
    note "$label" "$l" | tee -a "$OUT/summary.md"
}

external() { # LABEL CLIENTS CHANGES [loadgen flags...] [-- cloudmap-xds flags...]
    local label="$1" clients="$2" changes="$3" l
    shift 3
    local lg=() cp=()
    while (($#)); do [[ $1 == -- ]] && { shift; cp=("$@"); break; }; lg+=("$1"); shift; done
    moto_reset
    "$LOADGEN" seed --cloudmap "$MOTO" --namespace loadgen --service bench --instances 30 2>>"$OUT/$label.log"
    start_cp "$label" loadgen "${cp[@]}"
    l="$(load)"
    local perf=""
    if [[ ${BENCH_PERF:-0} == 1 && $label == external-sotw-10000-r1 ]]; then
        perf record -F 499 -e cpu-clock --call-graph dwarf,32768 -p "$CP_PID" -o "$OUT/$label.perf.data" \
            >/dev/null 2>&1 &
        perf=$!
    fi
    "$LOADGEN" run --control-plane "$XDS" --admin "$ADMIN" --cloudmap "$MOTO" --control-plane-pid "$CP_PID" \
        --clients "$clients" --changes "$changes" --json "${lg[@]}" >"$OUT/$label.json" 2>>"$OUT/$label.log" \
        || { stop_cp; echo "bench: $label failed; see $OUT/$label.log and $OUT/$label.cp.log" >&2; cat "$OUT/$label.log" >&2; return 1; }
    if [[ -n $perf ]]; then
        kill -INT "$perf" && wait "$perf" || true
        perf report -i "$OUT/$label.perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -40 >"$OUT/$label.perf.txt" || true
    fi
    stop_cp
    note "$label" "$l" | tee -a "$OUT/summary.md"
}

echo "==> machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)" \
    | tee "$OUT/summary.md"

if [[ $MODE == smoke ]]; then
    started=$SECONDS
    in_process smoke-in-process 200 5
    in_process smoke-in-process-delta 200 3 --delta
    external smoke-external 200 3 --settle 1s -- --revision-interval 200ms
    echo "==> smoke passed in $((SECONDS - started)) s; results in $OUT"
    exit 0
fi

echo "==> criterion micro-benchmarks (control-plane/benches/pipeline.rs)"
cargo bench -p cloudmap-xds --bench pipeline 2>&1 | tee "$OUT/criterion.log" | grep -E "^[a-z].*/|time:|encodes to"

for r in $(seq 1 "$REPEAT"); do
    echo "==> push propagation, in-process (library + Cloud Map test double), round $r"
    in_process "in-process-sotw-100-r$r" 100 50
    in_process "in-process-sotw-1000-r$r" 1000 50
    in_process "in-process-sotw-10000-r$r" 10000 20
    in_process "in-process-delta-10000-r$r" 10000 20 --delta
    echo "==> push propagation against a cloudmap-xds process with moto, round $r"
    external "external-sotw-100-r$r" 100 20
    external "external-sotw-1000-r$r" 1000 20
    external "external-sotw-10000-r$r" 10000 20
done

echo "==> Cloud Map API calls per minute (60 s, clients idle), N = 10 and N = 1,000"
external api-10 10 1 --api-counter "$PROXY/__loadgen/counts" --api-window 60s
external api-1000 1000 1 --api-counter "$PROXY/__loadgen/counts" --api-window 60s

echo "==> process start to /ready, 100 services × 50 instances in moto"
moto_reset
"$LOADGEN" seed --cloudmap "$MOTO" --namespace startup --service svc --services 100 --instances 50
for r in 1 2 3; do
    ADMIN="127.0.0.1:$(free_port)"
    l="$(load)"
    AWS_ENDPOINT_URL="$PROXY" "$LOADGEN" startup --admin "$ADMIN" --json -- \
        "$CP" --namespace startup --xds-listen "127.0.0.1:$(free_port)" --admin-listen "$ADMIN" \
        >"$OUT/startup-r$r.json" 2>"$OUT/startup-r$r.log"
    python3 - "$OUT/startup-r$r.json" "$r" "$l" <<'EOF' | tee -a "$OUT/summary.md"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"startup-r{sys.argv[2]}: process start to /ready {r['ready_seconds']:.3f}s load={sys.argv[3]}")
EOF
done
echo "==> done; results in $OUT"
