"""The demo (scripts/demo.sh) end to end, and `demo-client serve` against the control plane.

* test_demo_script_end_to_end runs `scripts/demo.sh --json` exactly as a newcomer would (its own
  moto, servers, control plane and clients) and checks its JSON summary: every zone ≥ 95 % same
  zone under the balanced census, the zone failure costs < 1 % of the calls and moves them to
  the other zones, the whole run takes < 120 s, and no process it started is left running.
* the demo-client serve tests use the suite's fixtures (moto behind the proxy, demo-servers,
  the control plane): GET /describe under a balanced census, and its JSON errors.

DEMO_CLIENT_BIN (default target/debug/demo-client) is the demo client under test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from harness import REPO_ROOT, ZONES, Proc, ProcRegistry, binary, free_port, http_get, spawn, tail, wait_until

DEMO_SH = REPO_ROOT / "scripts" / "demo.sh"
DEMO_BUDGET = 120.0  # seconds, after the build
SERVE_LINE = re.compile(r"demo-client listening on http://(?P<addr>[0-9.]+:\d+)")
DESCRIBE_KEYS = ("requestId", "zone", "instanceId", "clientZone", "latencyMs")


@pytest.fixture
def demo_client_bin() -> Path:
    return binary("DEMO_CLIENT_BIN", "target/debug/demo-client")


def running(pid: int, exe: str) -> bool:
    """pid still runs exe (a reused pid running something else does not count)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return exe in argv[:2]


# ---------------------------------------------------------------------------------------------
# scripts/demo.sh
# ---------------------------------------------------------------------------------------------


def test_demo_script_end_to_end(tmp_path, peers_py, cloudmap_xds_bin, demo_server_bin, demo_client_bin):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDMAP_XDS_", "GRPC_XDS_"))}
    env.update(
        PEERS_PY=str(peers_py),  # the suite's venv: the script does not run install-peers.sh
        CLOUDMAP_XDS_BIN=str(cloudmap_xds_bin),
        DEMO_SERVER_BIN=str(demo_server_bin),
        DEMO_CLIENT_BIN=str(demo_client_bin),
        TMPDIR=str(tmp_path),  # its log dir lands in this test's tmp dir
    )
    out_path, err_path = tmp_path / "demo.stdout", tmp_path / "demo.stderr"
    t0 = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen(
            [str(DEMO_SH), "--json"], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc = p.wait(timeout=DEMO_BUDGET + 30)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGTERM)  # the script stops everything it started
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            raise AssertionError(f"scripts/demo.sh ran over {DEMO_BUDGET + 30:.0f}s:\n{tail(err_path, 80)}") from None
    wall = time.monotonic() - t0
    report = tail(err_path, 200)
    print(report)  # shown by pytest on failure (and with -s)

    lines = out_path.read_text().strip().splitlines()
    assert len(lines) == 1, f"--json must print exactly one line on stdout, got {len(lines)}:\n{report}"
    s = json.loads(lines[0])
    assert rc == 0 and s["ok"], f"demo failed (exit {rc}): {s['failures']}\n{report}"
    assert wall < DEMO_BUDGET, f"the demo took {wall:.1f}s (budget {DEMO_BUDGET:.0f}s)"
    assert s["wall_seconds"] < DEMO_BUDGET
    assert Path(s["log_dir"]).is_dir() and s["log_dir"] in report, "the log dir is printed"
    steps = s["steps"]

    # step 1: every serve client answers /describe from its own zone
    for z in ZONES:
        d = steps["setup"]["describe"][z]
        assert d["status"] == 200 and d["body"]["zone"] == d["body"]["clientZone"] == z, d

    # step 2 (and 5, after the zone came back): balanced census → ≥ 95 % same zone, nothing failed
    for name in ("balanced", "recovered"):
        reports = steps[name]["reports"]
        assert set(reports) == set(ZONES), reports.keys()
        for z, r in reports.items():
            assert r["clientZone"] == z and r["total"] == 600 and r["failed"] == 0, (name, z, r)
            assert r["sameZoneShare"] >= 0.95, f"{name}: client in {z} kept only {r['sameZoneShare']:.1%} in its zone: {r['zones']}"

    # step 3: the zone fails under load → < 1 % failed, the calls moved to the other zones
    f = steps["failover"]
    dead, r = f["zone"], f["report"]
    others = [z for z in ZONES if z != dead]
    assert len(f["killed"]) == 2 and all(k not in json.dumps(steps["recovered"]) for k in f["killed"])
    assert r["failed"] / r["total"] < 0.01, f"{r['failed']} of {r['total']} calls failed: {r['errors']}"
    moved = sum(r["zones"].get(z, {}).get("count", 0) for z in others)
    # calls made before the kill stay in the zone (how many depends on machine speed); step 4
    # below checks that nothing reaches the dead zone once the failover is done
    assert moved / r["ok"] >= 0.2 and all(r["zones"].get(z, {}).get("count", 0) > 0 for z in others), r["zones"]
    assert f["noticed_after_s"] is not None and f["noticed_after_s"] < 10, f  # refresh interval 2s

    # step 4: zone still down → nothing goes there, nothing fails
    a = steps["after"]["report"]
    assert a["failed"] == 0 and dead not in a["zones"] and a["ok"] == a["total"], a

    # cleanup: every process the script started is gone
    pids = s["pids"]
    names = [x["name"] for x in pids]
    assert "moto" in names and "cloudmap-xds" in names and len(pids) >= 1 + 6 + 1 + 3 + 3, names
    assert not s["kept"] and s["left_running"] == []
    left = [x for x in pids if running(x["pid"], x["exe"])]
    assert not left, f"processes left running after scripts/demo.sh: {left}"


# ---------------------------------------------------------------------------------------------
# demo-client serve
# ---------------------------------------------------------------------------------------------


class DemoClientServe:
    """`demo-client serve` on a free port, its bootstrap written by `cloudmap-xds bootstrap`."""

    def __init__(self, exe: Path, cp_exe: Path, server_uri: str, zone: str, node_id: str, log_dir: Path,
                 registry: ProcRegistry, target: str = "xds:///echo.demo"):  # fmt: skip
        self.zone = zone
        self.bootstrap = log_dir / f"bootstrap-{node_id}.json"
        r = subprocess.run(
            [str(cp_exe), "bootstrap", "--server-uri", server_uri, "--zone", zone, "--node-id", node_id,
             "--output", str(self.bootstrap)],
            capture_output=True, text=True, timeout=30,
            env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDMAP_XDS_", "ECS_"))},
        )  # fmt: skip
        assert r.returncode == 0, f"cloudmap-xds bootstrap failed: {r.stderr}"
        boot = json.loads(self.bootstrap.read_text())
        assert boot["node"]["locality"]["zone"] == zone and boot["xds_servers"][0]["server_uri"] == server_uri, boot
        self.stderr_path = log_dir / f"serve-{node_id}.stderr"
        with open(self.stderr_path, "wb") as fe:
            popen = spawn(
                [str(exe), "serve", "--listen", "127.0.0.1:0", "--target", target],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fe,
                env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(self.bootstrap), "RUST_LOG": "info", "NO_COLOR": "1"},
            )  # fmt: skip
        self.proc = registry.add(Proc(f"demo-client serve {node_id}", popen, {"stderr": self.stderr_path}))

        def listening():
            if not self.proc.alive():
                raise AssertionError(f"demo-client serve exited ({popen.returncode}):\n{tail(self.stderr_path)}")
            return SERVE_LINE.search(self.stderr_path.read_text(errors="replace"))

        self.url = "http://" + wait_until(listening, 15, f"listening line of demo-client serve {node_id}")["addr"]

    def get(self, path: str) -> tuple[int, dict | str]:
        status, body = http_get(self.url + path, timeout=5)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body


def serve_client(request, deploy, zone: str, node_id: str, server_uri: str | None = None, **kw) -> DemoClientServe:
    return DemoClientServe(
        request.getfixturevalue("demo_client_bin"), request.getfixturevalue("cloudmap_xds_bin"),
        server_uri or f"127.0.0.1:{deploy.cp.xds_port}", zone, node_id, deploy.tmp, deploy.procs, **kw,
    )  # fmt: skip


def describe_ok(body) -> bool:
    return isinstance(body, dict) and all(k in body for k in DESCRIBE_KEYS)


def test_serve_describe_stays_in_zone_under_balanced_census(request, deploy):
    deploy.cloudmap.setup("demo")
    servers = {z: {f"i-{z[-1]}{n}" for n in (1, 2)} for z in ZONES}
    for z, ids in servers.items():
        for i in sorted(ids):
            deploy.server(z, i)
    deploy.control_plane()
    clients = {z: serve_client(request, deploy, z, f"serve-{z[-1]}") for z in ZONES}
    census = {z: 1 for z in ZONES}
    deploy.cp.wait_census(census, timeout=15)
    wait_until(lambda: deploy.cp.streams_synced(census), 15, "every serve client ACKed its newest EDS")

    request_ids = set()
    for z, c in clients.items():
        for _ in range(30):
            status, body = c.get("/describe")
            assert status == 200 and describe_ok(body), f"{z}: /describe answered {status}: {body}"
            assert body["clientZone"] == z, body
            assert body["zone"] == body["clientZone"], f"client in {z} was served from {body['zone']}: {body}"
            assert body["instanceId"] in servers[z], body
            assert isinstance(body["latencyMs"], (int, float)) and 0 < body["latencyMs"] < 2000, body
            uuid.UUID(body["requestId"])
            request_ids.add(body["requestId"])
        assert c.get("/healthz") == (200, "ok")
    assert len(request_ids) == 90, "every /describe has its own requestId"
    deploy.cp.assert_acked_no_nacks()


def assert_json_error(c: DemoClientServe, zone: str) -> dict:
    status, body = c.get("/describe")
    assert 500 <= status < 600, f"/describe without endpoints answered {status}: {body}"
    assert isinstance(body, dict) and body.get("error") and body.get("clientZone") == zone, body
    uuid.UUID(body["requestId"])
    assert c.proc.alive() and c.get("/healthz") == (200, "ok"), tail(c.stderr_path)
    return body


def test_serve_describe_without_endpoints_answers_json_errors(request, deploy):
    deploy.cloudmap.setup("demo")
    deploy.server("us-east-1a", "i-a1")
    deploy.control_plane()
    # a service the control plane does not know
    missing = serve_client(request, deploy, "us-east-1a", "serve-missing", target="xds:///nope.demo")
    # a control plane that is not there (nothing listens on the port)
    dead_port = deploy.cp.xds_port
    while dead_port in (deploy.cp.xds_port, deploy.cp.admin_port):
        dead_port = free_port()
    nowhere = serve_client(request, deploy, "us-east-1b", "serve-nowhere", server_uri=f"127.0.0.1:{dead_port}")
    # the control side: a client for a real service works meanwhile
    good = serve_client(request, deploy, "us-east-1a", "serve-good")
    wait_until(lambda: good.get("/describe")[0] == 200, 15, "a /describe through the good client")

    t_end = time.monotonic() + 3  # ask repeatedly while the clients keep trying
    bodies = []
    while time.monotonic() < t_end:
        bodies.append(assert_json_error(missing, "us-east-1a"))
        bodies.append(assert_json_error(nowhere, "us-east-1b"))
        time.sleep(0.3)
    assert len({b["requestId"] for b in bodies}) == len(bodies)
    for c in (missing, nowhere):
        log = tail(c.stderr_path, 200)
        assert "panicked" not in log, log
    status, body = good.get("/describe")
    assert status == 200 and body["zone"] == "us-east-1a", body
