#!/usr/bin/env bash
# Benchmarks of cloudmap-xds with the load generator (loadgen/) — see BENCHMARKS.md.
#
#   scripts/bench.sh           the whole set, release builds: criterion micro-benchmarks; then, in
#                              one run with the same loadgen binary, for each server — the floor
#                              (`loadgen floor`, a bare tonic ADS server that sends every stream
#                              the same pre-encoded bytes), the old cloudmap-xds
#                              ($CLOUDMAP_XDS_OLD_BIN, if set) and this tree's cloudmap-xds (new):
#                              external SotW N = 1,000 and 10,000, K = 20 (propagation p50/p99/max,
#                              RSS per idle stream, CPU per push per client); a 990-instance
#                              service, N = 1,000 and 10,000, K = 5 (RSS per idle stream); 100,000 idle
#                              streams and one change (time to reach all, RSS); then in-process
#                              runs, Cloud Map API calls per minute and start to /ready.
#                              compare.md holds the floor / old / new table with ratios.
#   scripts/bench.sh --smoke   N = 200 in-process, against moto and against the floor, debug
#                              builds; fails if the load generator fails or a client misses an update.
#
# Results: one JSON file per run, summary.md and compare.md in $BENCH_OUT (default target/bench/<mode>).
# BENCH_REPEAT=R repeats each comparison run R times (ranges in compare.md); BENCH_PROFILE=debug|release
# overrides the build profile; BENCH_SECTIONS picks sections (default
# "criterion compare large idle in-process api startup"); BENCH_COMPARE_CLIENTS (default "1000 10000")
# BENCH_LARGE_CLIENTS (default "1000 10000") the large-service runs, and BENCH_IDLE_CLIENTS (default
# 100000) the idle run; BENCH_SERVERS (e.g.
# "floor old") limits the servers compared. BENCH_CLIENT_CPUS / BENCH_CP_CPUS (taskset -c lists, e.g. 2-3 and 0-1) pin the load
# generator and the server under test apart on a machine with more cores; unset, both share all cores.
# BENCH_PERF=1 records a CPU profile of cloudmap-xds during the first external N = 10,000 run
# (perf, software clock: $BENCH_OUT/*.perf.txt).
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
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/summary.md "$OUT"/compare.md

SECTIONS="${BENCH_SECTIONS:-criterion compare large idle in-process api startup}"
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
IDLE_CLIENTS="${BENCH_IDLE_CLIENTS:-100000}"
read -r -a COMPARE_CLIENTS <<<"${BENCH_COMPARE_CLIENTS:-1000 10000}"
read -r -a LARGE_CLIENTS <<<"${BENCH_LARGE_CLIENTS:-1000 10000}"
OLD_BIN="${CLOUDMAP_XDS_OLD_BIN:-}"
if [[ -n $OLD_BIN && ! -x $OLD_BIN ]]; then echo "bench: CLOUDMAP_XDS_OLD_BIN=$OLD_BIN is not executable" >&2; exit 2; fi

# 100 streams per connection: 100,000 idle streams are 1,000 connections on each side. Allow one
# connection per client at N = 10,000 too.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [[ $MODE == full ]] && want idle && (($(ulimit -n) < IDLE_CLIENTS / 100 + 200)); then
    echo "bench: open files limit $(ulimit -n) is too low for $IDLE_CLIENTS idle streams" >&2
    exit 2
fi
PIN_CLIENTS=()
PIN_CP=()
if [[ -n ${BENCH_CLIENT_CPUS:-} ]]; then PIN_CLIENTS=(taskset -c "$BENCH_CLIENT_CPUS"); fi
if [[ -n ${BENCH_CP_CPUS:-} ]]; then PIN_CP=(taskset -c "$BENCH_CP_CPUS"); fi

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
start_cp() { # LABEL NAMESPACE [cloudmap-xds flags...]; sets CP_PID, XDS, ADMIN (CP_BIN overrides the binary)
    local label="$1" namespace="$2"
    shift 2
    XDS="127.0.0.1:$(free_port)"
    ADMIN="127.0.0.1:$(free_port)"
    # taskset execs the control plane, so $! is its pid either way.
    AWS_ENDPOINT_URL="$PROXY" "${PIN_CP[@]}" "${CP_BIN:-$CP}" --namespace "$namespace" --xds-listen "$XDS" \
        --admin-listen "$ADMIN" --config "$CP_CONFIG" "$@" >"$OUT/$label.cp.log" 2>&1 &
    CP_PID=$!
    PIDS+=("$CP_PID")
}

start_floor() { # LABEL INSTANCES; sets CP_PID, XDS, ADMIN
    XDS="127.0.0.1:$(free_port)"
    ADMIN="127.0.0.1:$(free_port)"
    "${PIN_CP[@]}" "$LOADGEN" floor --listen "$XDS" --admin "$ADMIN" --namespace loadgen --service bench \
        --endpoints "$2" >"$OUT/$1.cp.log" 2>&1 &
    CP_PID=$!
    PIDS+=("$CP_PID")
    wait_http "http://$ADMIN/ready" 30
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
             f" cpu/push/client={cp['cpu_per_push_per_client_us']:.1f}us"
             f" rss-idle={cp['idle']['rss_bytes']/2**20:.0f}MiB")
line += (f" loadgen-cpu/push/client={r['own_cpu_per_push_per_client_us']:.1f}us"
         f" loadgen-rss={r.get('own_rss_idle_bytes', 0)/2**20:.0f}MiB")
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
    "${PIN_CLIENTS[@]}" "$LOADGEN" run --in-process --clients "$clients" --changes "$changes" --json "$@" >"$OUT/$label.json"
    note "$label" "$l" | tee -a "$OUT/summary.md"
}

external() { # LABEL CLIENTS CHANGES [loadgen flags...] [-- cloudmap-xds flags...]
    local label="$1" clients="$2" changes="$3" l
    shift 3
    local lg=() cp=()
    while (($#)); do [[ $1 == -- ]] && { shift; cp=("$@"); break; }; lg+=("$1"); shift; done
    moto_reset
    "$LOADGEN" seed --cloudmap "$MOTO" --namespace loadgen --service bench --instances "${INSTANCES:-30}" \
        2>>"$OUT/$label.log"
    start_cp "$label" loadgen "${cp[@]}"
    l="$(load)"
    local perf=""
    if [[ ${BENCH_PERF:-0} == 1 && $label == *-sotw-10000-r1 ]]; then
        perf record -F 499 -e cpu-clock --call-graph dwarf,32768 -p "$CP_PID" -o "$OUT/$label.perf.data" \
            >/dev/null 2>&1 &
        perf=$!
    fi
    "${PIN_CLIENTS[@]}" "$LOADGEN" run --control-plane "$XDS" --admin "$ADMIN" --cloudmap "$MOTO" --control-plane-pid "$CP_PID" \
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

floor() { # LABEL INSTANCES CLIENTS CHANGES [loadgen flags...]: the same measurement against `loadgen floor`
    local label="$1" instances="$2" clients="$3" changes="$4" l
    shift 4
    start_floor "$label" "$instances"
    l="$(load)"
    "${PIN_CLIENTS[@]}" "$LOADGEN" run --control-plane "$XDS" --admin "$ADMIN" --floor --control-plane-pid "$CP_PID" \
        --clients "$clients" --changes "$changes" --json "$@" >"$OUT/$label.json" 2>>"$OUT/$label.log" \
        || { stop_cp; echo "bench: $label failed; see $OUT/$label.log" >&2; cat "$OUT/$label.log" >&2; return 1; }
    stop_cp
    note "$label" "$l" | tee -a "$OUT/summary.md"
}

# The servers compared: the floor, the old cloudmap-xds (if given), this tree's cloudmap-xds.
SERVERS=(floor)
if [[ -n $OLD_BIN ]]; then SERVERS+=(old); fi
SERVERS+=(new)
# BENCH_SERVERS="floor old" (say) measures only those.
if [[ -n ${BENCH_SERVERS:-} ]]; then
    read -r -a SERVERS <<<"$BENCH_SERVERS"
    for server in "${SERVERS[@]}"; do
        case "$server" in
            floor | new) ;;
            old) [[ -n $OLD_BIN ]] || { echo "bench: BENCH_SERVERS names old without CLOUDMAP_XDS_OLD_BIN" >&2; exit 2; } ;;
            *) echo "bench: unknown server $server in BENCH_SERVERS (floor, old, new)" >&2; exit 2 ;;
        esac
    done
fi

measure() { # SERVER LABEL INSTANCES CLIENTS CHANGES [loadgen flags...] [-- cloudmap-xds flags...]
    local server="$1" label="$2" instances="$3"
    shift 3
    local lg=()
    for arg in "$@"; do [[ $arg == -- ]] && break; lg+=("$arg"); done
    case "$server" in
        floor) floor "$label" "$instances" "${lg[@]}" ;;
        old) INSTANCES="$instances" CP_BIN="$OLD_BIN" external "$label" "$@" ;;
        new) INSTANCES="$instances" external "$label" "$@" ;;
    esac
}

# compare.md: per run, each server's figures (ranges over rounds) and the means' ratios to the floor.
compare_table() {
    python3 - "$OUT" "${SERVERS[@]}" <<'PY' | tee "$OUT/compare.md"
import glob, json, os, re, sys
out, servers = sys.argv[1], sys.argv[2:]
runs = {}
def order(path):  # sotw-N by N, then the large service, then the idle run
    name = os.path.basename(path)
    n = re.search(r"-(\d+)-r\d+\.json$", name)
    kind = next((i for i, k in enumerate(["-sotw-", "-large-", "-idle-"]) if k in name), 3)
    return (kind, int(n.group(1)) if n else 0, name)
for path in sorted(glob.glob(os.path.join(out, "*.json")), key=order):
    m = re.match(r"(floor|old|new)-(.+)-r(\d+)\.json$", os.path.basename(path))
    if m:
        runs.setdefault(m.group(2), {}).setdefault(m.group(1), []).append(json.load(open(path)))
def metrics(r):
    p, cp = r["propagation"], r.get("control_plane") or {}
    return {"p50": p["p50_ms"], "p99": p["p99_ms"], "max": p["max_ms"],
            "rss": cp.get("rss_per_stream_bytes", 0) / 1024, "cpu": cp.get("cpu_per_push_per_client_us", 0),
            "connect": r["connect_seconds"], "cp_rss": cp.get("idle", {}).get("rss_bytes", 0) / 2**20,
            "lg_cpu": r["own_cpu_per_push_per_client_us"], "lg_rss": r.get("own_rss_idle_bytes", 0) / 2**20}
def rng(values, fmt):
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else lo + "–" + hi
cols = [("p50", "p50 ms", "{:.1f}"), ("p99", "p99 ms", "{:.1f}"), ("max", "max ms", "{:.1f}"),
        ("rss", "RSS / idle stream KiB", "{:.1f}"), ("cpu", "CP CPU / push / client µs", "{:.1f}"),
        ("cp_rss", "CP RSS idle MiB", "{:.0f}"), ("connect", "all connected s", "{:.1f}"),
        ("lg_cpu", "loadgen CPU / push / client µs", "{:.1f}"), ("lg_rss", "loadgen RSS MiB", "{:.0f}")]
print("| run | server | rounds | " + " | ".join(c[1] for c in cols) + " |")
print("|---|---|---:|" + "---:|" * len(cols))
ratios = []
mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)
for name, by_server in runs.items():
    base = [metrics(r) for r in by_server.get("floor", [])]
    for server in servers:
        ms = [metrics(r) for r in by_server.get(server, [])]
        if not ms:
            continue
        print(f"| {name} | {server} | {len(ms)} | " + " | ".join(rng([m[k] for m in ms], f) for k, _, f in cols) + " |")
        if server != "floor" and base:
            ratio = lambda k: f"{mean(ms, k) / mean(base, k):.2f}×" if mean(base, k) > 0 else "–"
            ratios.append(f"| {name} | {server} / floor | {ratio('p99')} | {ratio('cpu')} | {ratio('rss')} |")
if ratios:
    print("\n| run | ratio | p99 | CP CPU / push / client | RSS / idle stream |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(ratios))
PY
}

echo "==> machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)" \
    | tee "$OUT/summary.md"

if [[ $MODE == smoke ]]; then
    started=$SECONDS
    in_process smoke-in-process 200 5
    in_process smoke-in-process-delta 200 3 --delta
    external smoke-external 200 3 --settle 1s -- --revision-interval 200ms
    floor smoke-floor 30 200 3 --settle 1s
    echo "==> smoke passed in $((SECONDS - started)) s; results in $OUT"
    exit 0
fi

echo "==> servers compared: ${SERVERS[*]}${OLD_BIN:+ (old = $OLD_BIN)}" | tee -a "$OUT/summary.md"

if want criterion; then
    echo "==> criterion micro-benchmarks (control-plane/benches/pipeline.rs)"
    cargo bench -p cloudmap-xds --bench pipeline 2>&1 | tee "$OUT/criterion.log" | grep -E "^[a-z].*/|time:|encodes to"
fi

if want compare; then
    for r in $(seq 1 "$REPEAT"); do
        echo "==> push propagation, external SotW, K = 20: ${SERVERS[*]}, round $r"
        for n in "${COMPARE_CLIENTS[@]}"; do
            for server in "${SERVERS[@]}"; do measure "$server" "$server-sotw-$n-r$r" 30 "$n" 20; done
        done
    done
fi

if want large; then
    for r in $(seq 1 "$REPEAT"); do
        for n in "${LARGE_CLIENTS[@]}"; do
            echo "==> a large service (990 instances), N = $n, K = 5: ${SERVERS[*]}, round $r"
            for server in "${SERVERS[@]}"; do measure "$server" "$server-large-990-$n-r$r" 990 "$n" 5; done
        done
    done
fi

if want idle; then
    echo "==> $IDLE_CLIENTS idle streams (1,000 connections), one change: ${SERVERS[*]}"
    for server in "${SERVERS[@]}"; do
        # cloudmap-xds refuses streams beyond --max-streams (20,000 by default).
        measure "$server" "$server-idle-$IDLE_CLIENTS-r1" 30 "$IDLE_CLIENTS" 1 --settle 5s --connect-timeout 900s \
            --change-timeout 300s -- --max-streams "$((IDLE_CLIENTS + 1000))"
    done
fi

if want compare || want large || want idle; then
    echo "==> floor / old / new ($OUT/compare.md)"
    compare_table
fi

if want in-process; then
    for r in $(seq 1 "$REPEAT"); do
        echo "==> push propagation, in-process (library + Cloud Map test double), round $r"
        in_process "in-process-sotw-100-r$r" 100 50
        in_process "in-process-sotw-1000-r$r" 1000 50
        in_process "in-process-sotw-10000-r$r" 10000 20
        in_process "in-process-delta-10000-r$r" 10000 20 --delta
    done
fi

if want api; then
    echo "==> Cloud Map API calls per minute (60 s, clients idle), N = 10 and N = 1,000"
    external api-10 10 1 --api-counter "$PROXY/__loadgen/counts" --api-window 60s
    external api-1000 1000 1 --api-counter "$PROXY/__loadgen/counts" --api-window 60s
fi

if ! want startup; then
    echo "==> done; results in $OUT"
    exit 0
fi
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
