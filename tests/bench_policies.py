"""Zone policies side by side: cross-zone traffic and server load for each policy and census.

For each policy (zone-aware, local-first, fixed-share 0.5 = the original sample's coin flip,
none) and each census (balanced 1/1/1 clients, skewed 4/1/1), runs real grpcio xDS clients
(tests/integration/xds_client.py) against 2/2/2 demo-servers in us-east-1a/b/c registered in
moto (Cloud Map), with a fresh cloudmap-xds per run configured by a TOML --config. After
convergence (the applied census, or for policies that do not use it the connected streams, in
/config_dump; every stream ACKed its newest EDS; then STREAK more calls per client) it counts
each client's next --calls calls and prints a Markdown table.

Run from the repo root with the peers' python (binaries built with cargo build --workspace --bins):

    .peers/py/bin/python tests/bench_policies.py [--calls 300]

It reuses the integration harness (tests/integration/harness.py) without pytest.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))

from harness import (  # noqa: E402
    REPO_ROOT,
    ZONES,
    CloudMap,
    ControlPlane,
    DemoServer,
    MotoServer,
    ProcRegistry,
    XdsClient,
    binary,
    config_args,
    wait_until,
)

POLICIES = [
    ("zone-aware", 'policy = "zone-aware"', True),
    ("local-first", 'policy = "local-first"', False),
    ("fixed-share 0.5", 'policy = "fixed-share"\nlocal_share = 0.5', False),
    ("none", 'policy = "none"', False),
]
CENSUSES = [
    ("balanced 1/1/1", dict(zip(ZONES, (1, 1, 1)))),
    ("skewed 4/1/1", dict(zip(ZONES, (4, 1, 1)))),
]
STREAK = 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stubs(out: Path) -> Path:
    proto_dir = REPO_ROOT / "proto" / "proto"
    r = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}",
         f"--grpc_python_out={out}", str(proto_dir / "demo.proto")],  # fmt: skip
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"protoc failed: {r.stderr}")
    return out


def run_one(cp_exe, moto_url, stubs_dir, run_dir: Path, policy_toml: str, uses_census: bool, census, n_calls: int) -> dict:
    reg = ProcRegistry()
    try:
        cp = ControlPlane(cp_exe, "demo", moto_url, run_dir, reg, extra_args=config_args(run_dir, f"[default]\n{policy_toml}\n"))
        cp.wait_healthz()
        cp.wait_ready()
        clients = [
            XdsClient(stubs_dir, cp.xds_port, z, f"client-{z[-1]}{i + 1}", run_dir, reg)
            for z, n in census.items()
            for i in range(n)
        ]
        for c in clients:
            c.wait_first_success(timeout=30)
        if uses_census:
            cp.wait_census(census, timeout=15)
        wait_until(lambda: cp.streams_synced(census), 15, f"every client of {census} ACKed its newest EDS")
        synced = time.time()
        t0 = max(c.wait_calls(STREAK, since=synced)[-1]["t"] for c in clients) + 1e-6
        calls = {c.node_id: (c.zone, c.wait_calls(n_calls, since=t0, timeout=n_calls * 0.1 + 30)) for c in clients}
        dumped = cp.census()
        span = max(cs[-1]["t"] for _, cs in calls.values()) - t0
    finally:
        reg.stop_all()

    per_server: collections.Counter = collections.Counter()
    total = failed = cross = 0
    for zone, cs in calls.values():
        for x in cs:
            total += 1
            if not x.get("ok"):
                failed += 1
                continue
            per_server[x["instance"]] += 1
            cross += x["zone"] != zone
    ok = total - failed
    return {"total": total, "failed": failed, "cross": cross / ok if ok else 0.0, "per_server": per_server,
            "census_dump": dumped, "span": span}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300, help="calls counted per client after convergence")
    args = ap.parse_args()

    peers = Path(os.environ.get("PEERS_PY") or (REPO_ROOT / ".peers" / "py"))
    cp_exe = binary("CLOUDMAP_XDS_BIN", "target/debug/cloudmap-xds")
    demo_exe = binary("DEMO_SERVER_BIN", "target/debug/demo-server")
    tmp = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    log(f"logs in {tmp}")
    started = time.monotonic()
    reg = ProcRegistry()
    moto = MotoServer(peers, tmp)
    rows = []
    try:
        stubs_dir = stubs(tmp)
        cm = CloudMap(moto.url).setup()
        servers = []
        for z in ZONES:
            for n in (1, 2):
                s = DemoServer(demo_exe, z, f"i-{z[-1]}{n}", tmp, reg)
                cm.register(s.instance_id, s.host, s.port, z)
                servers.append(s.instance_id)
        for pname, ptoml, uses_census in POLICIES:
            for cname, census in CENSUSES:
                run_dir = tmp / f"{pname.replace(' ', '-')}-{cname.split()[0]}"
                run_dir.mkdir()
                t = time.monotonic()
                r = run_one(cp_exe, moto.url, stubs_dir, run_dir, ptoml, uses_census, census, args.calls)
                loads = [r["per_server"][i] for i in servers]
                mean = sum(loads) / len(loads)
                r.update(policy=pname, census=cname, max_mean=max(loads) / mean, min_mean=min(loads) / mean)
                rows.append(r)
                log(
                    f"{pname:16} {cname:15} cross-zone {r['cross']:.3f} max/mean {r['max_mean']:.2f} "
                    f"failed {r['failed']}/{r['total']} per server {dict(zip(servers, loads))} "
                    f"(/config_dump census {r['census_dump']}, window {r['span']:.1f}s, run {time.monotonic() - t:.1f}s)"
                )
    finally:
        reg.stop_all()
        moto.stop()

    print(f"\n{args.calls} calls per client after convergence; servers 2/2/2 in {', '.join(ZONES)}.\n")
    print("| policy | census | calls | cross-zone share | max/mean server load | min/mean | failed calls |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['census']} | {r['total']} | {r['cross']:.1%} | {r['max_mean']:.2f} | "
            f"{r['min_mean']:.2f} | {r['failed']} |"
        )
    print(f"\ntotal runtime {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
