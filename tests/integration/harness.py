"""Helpers for the integration tests: processes, Cloud Map (moto), the control plane,
demo servers and xDS clients. The fixtures in conftest.py wire them together.

Every process is started here with subprocess.Popen and stopped by its PID (terminate,
then kill) from a fixture finalizer, even when the test fails.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ---------------------------------------------------------------------------------------------
# generic helpers
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float, desc: str, interval: float = 0.05) -> Any:
    """Poll pred() until it returns something truthy; fail with desc after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 — keep polling, report the last error
            last_exc = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {desc}{extra}")
        time.sleep(interval)


def sleep_until(t_wall: float) -> None:
    """Let a time window pass (not a way to wait for a condition)."""
    d = t_wall - time.time()
    if d > 0:
        time.sleep(d)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def http_post(url: str, timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status


def drain_lines(stream, path: Path, on_line: Callable[[str], None]) -> None:
    """Copy a child's output to `path` line by line (ANSI colours stripped), handing each line to `on_line`."""
    with open(path, "w") as f:
        for raw in iter(stream.readline, b""):
            line = ANSI.sub("", raw.decode("utf-8", "replace"))
            f.write(line)
            f.flush()
            on_line(line)


def tail(path: Path, n: int = 60) -> str:
    try:
        lines = ANSI.sub("", path.read_text(errors="replace")).splitlines()
    except FileNotFoundError:
        return "(no file)"
    return "\n".join(lines[-n:])


def binary(env_name: str, default_rel: str) -> Path:
    p = Path(os.environ.get(env_name) or (REPO_ROOT / default_rel))
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not (p.is_file() and os.access(p, os.X_OK)):
        # A missing binary is a failure, never a skip.
        raise AssertionError(f"{env_name}: {p} is not an executable file (build it: cargo build --workspace --bins)")
    return p


def config_args(log_dir: Path, toml_text: str, name: str = "cloudmap-xds.toml") -> list[str]:
    """Write a control-plane TOML config (README "Configuration") into log_dir and return the
    flags that load it, for ControlPlane(extra_args=...) / Deployment.control_plane(extra_args=...)."""
    path = log_dir / name
    path.write_text(toml_text)
    return ["--config", str(path)]


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the test process dies (e.g. is killed itself), so no
    server outlives a crashed run. Normal cleanup still stops every process by PID."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 — best effort (Linux only)
        pass


def spawn(args, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, preexec_fn=_die_with_parent, **kw)


class Proc:
    """A started process with its log files; stop() ends it by PID (TERM, then KILL)."""

    def __init__(self, name: str, popen: subprocess.Popen, logs: dict[str, Path]):
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.logs = logs

    stopped_by_us = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def exit_note(self) -> str | None:
        """None while running or when we stopped it; else how it ended on its own."""
        rc = self.popen.poll()
        if rc is None or self.stopped_by_us:
            return None
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        return f"{self.name} (pid {self.pid}) ended on its own with {how}"

    def stop(self, grace: float = 5.0) -> int | None:
        p = self.popen
        if p.poll() is None:
            self.stopped_by_us = True
        if p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        for s in (p.stdin, p.stdout, p.stderr):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        return p.returncode


class ProcRegistry:
    """Per-test list of processes: stopped in reverse order at teardown; log tails on failure."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p

    def died(self) -> list[str]:
        return [n for n in (p.exit_note() for p in self.procs) if n]

    def stop_all(self) -> None:
        """Stop everything; then fail if a process had ended on its own during the test."""
        died = self.died()
        errors = []
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{p.name} (pid {p.pid}): {e!r}")
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))
        if died:
            raise AssertionError("processes ended during the test without being stopped: " + "; ".join(died))

    def report_sections(self) -> list[tuple[str, str]]:
        out = []
        died = self.died()
        if died:
            out.append(("processes that ended on their own", "\n".join(died)))
        for p in self.procs:
            for label, path in p.logs.items():
                if p.name.startswith("demo-server") and label == "stdout":
                    continue  # only its ready line
                n = 80 if p.name.startswith("cloudmap-xds") else (5 if label == "calls" else 15)
                text = tail(path, n)
                if text.strip():
                    out.append((f"{p.name} (pid {p.pid}) {label} tail: {path}", text))
        return out


# ---------------------------------------------------------------------------------------------
# moto (Cloud Map)
# ---------------------------------------------------------------------------------------------


class MotoServer:
    def __init__(self, peers_py: Path, log_dir: Path):
        exe = peers_py / "bin" / "moto_server"
        if not exe.exists():
            raise AssertionError(f"moto_server not found at {exe}: run scripts/install-peers.sh")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = log_dir / "moto.log"
        self.log = log
        f = open(log, "wb")
        popen = spawn(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        f.close()
        self.proc = Proc("moto", popen, {"log": log})
        try:
            wait_until(self._answers, 30, f"moto at {self.url}/moto-api/")
        except BaseException:
            self.proc.stop()
            raise

    def _answers(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"moto_server exited ({self.proc.popen.returncode}):\n{tail(self.log)}")
        status, _ = http_get(self.url + "/moto-api/", timeout=1)
        return status == 200

    def reset(self) -> None:
        assert http_post(self.url + "/moto-api/reset") == 200

    def stop(self) -> None:
        self.proc.stop()


class CloudMap:
    """boto3 servicediscovery against moto, with the helpers the tests need."""

    def __init__(self, endpoint_url: str):
        import boto3
        from botocore.config import Config

        self.sd = boto3.client(
            "servicediscovery",
            region_name=REGION,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            endpoint_url=endpoint_url,
            config=Config(inject_host_prefix=False, retries={"max_attempts": 2}, connect_timeout=5, read_timeout=10),
        )
        self.namespace: str | None = None
        self.namespace_id: str | None = None
        self.service: str | None = None
        self.service_id: str | None = None

    def wait_operation(self, op_id: str, timeout: float = 10) -> dict:
        def done():
            op = self.sd.get_operation(OperationId=op_id)["Operation"]
            if op["Status"] == "FAIL":
                raise AssertionError(f"operation {op_id} failed: {op}")
            return op if op["Status"] == "SUCCESS" else None

        return wait_until(done, timeout, f"Cloud Map operation {op_id}")

    def setup(self, namespace: str = "demo", service: str = "echo") -> "CloudMap":
        op = self.sd.create_http_namespace(Name=namespace)["OperationId"]
        op = self.wait_operation(op)
        ns_id = op.get("Targets", {}).get("NAMESPACE")
        if not ns_id:
            ns_id = next(n["Id"] for n in self.sd.list_namespaces()["Namespaces"] if n["Name"] == namespace)
        svc = self.sd.create_service(Name=service, NamespaceId=ns_id, HealthCheckCustomConfig={})["Service"]
        self.namespace, self.namespace_id = namespace, ns_id
        self.service, self.service_id = service, svc["Id"]
        return self

    @staticmethod
    def ecs_attributes(ip: str, port: int | str, zone: str, service: str = "echo") -> dict[str, str]:
        return {
            "AWS_INSTANCE_IPV4": ip,
            "AWS_INSTANCE_PORT": str(port),
            "AVAILABILITY_ZONE": zone,
            "REGION": REGION,
            "ECS_SERVICE_NAME": service,
            "ECS_CLUSTER_NAME": "demo-cluster",
        }

    def register_attrs(self, instance_id: str, attributes: dict[str, str]) -> None:
        assert self.service_id, "call setup() first"
        op = self.sd.register_instance(ServiceId=self.service_id, InstanceId=instance_id, Attributes=attributes)
        self.wait_operation(op["OperationId"])

    def register(self, instance_id: str, ip: str, port: int | str, zone: str) -> None:
        self.register_attrs(instance_id, self.ecs_attributes(ip, port, zone, self.service or "echo"))

    def deregister(self, instance_id: str) -> None:
        op = self.sd.deregister_instance(ServiceId=self.service_id, InstanceId=instance_id)
        self.wait_operation(op["OperationId"])

    def set_health(self, instance_id: str, status: str) -> None:
        assert status in ("HEALTHY", "UNHEALTHY")
        self.sd.update_instance_custom_health_status(ServiceId=self.service_id, InstanceId=instance_id, Status=status)

    def discover(self) -> list[dict]:
        return self.sd.discover_instances(NamespaceName=self.namespace, ServiceName=self.service, HealthStatus="ALL")["Instances"]


# ---------------------------------------------------------------------------------------------
# demo-server
# ---------------------------------------------------------------------------------------------

READY_LINE = re.compile(r"demo-server listening on (?P<host>[0-9.]+):(?P<port>\d+) zone=(?P<zone>\S+) instance=(?P<instance>\S+)")


class DemoServer:
    def __init__(self, exe: Path, zone: str, instance_id: str, log_dir: Path, registry: ProcRegistry):
        self.zone = zone
        self.instance_id = instance_id
        self.host = "127.0.0.1"
        self.port: int | None = None
        out = log_dir / f"demo-{instance_id}.stdout"
        err = log_dir / f"demo-{instance_id}.stderr"
        ferr = open(err, "wb")
        popen = spawn(
            [str(exe), "--listen", "127.0.0.1:0", "--zone", zone, "--instance-id", instance_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=ferr,
            env={**os.environ, "RUST_LOG": os.environ.get("DEMO_RUST_LOG", "warn"), "NO_COLOR": "1"},
        )
        ferr.close()
        self.proc = registry.add(Proc(f"demo-server {instance_id}", popen, {"stdout": out, "stderr": err}))
        self._ready = threading.Event()
        self._ready_line: str | None = None
        threading.Thread(target=self._drain, args=(popen.stdout, out), daemon=True).start()
        wait_until(self._check_ready, 15, f"demo-server {instance_id} ready line")
        m = READY_LINE.search(self._ready_line or "")
        assert m, f"unexpected ready line: {self._ready_line!r}"
        assert m["zone"] == zone and m["instance"] == instance_id, f"ready line names another server: {self._ready_line!r}"
        self.port = int(m["port"])
        self.host = m["host"]

    def _drain(self, stream, path: Path) -> None:
        drain_lines(stream, path, self._on_line)

    def _on_line(self, line: str) -> None:
        if not self._ready.is_set() and READY_LINE.search(line):
            self._ready_line = line.strip()
            self._ready.set()

    def _check_ready(self) -> bool:
        if self._ready.is_set():
            return True
        if not self.proc.alive():
            raise AssertionError(
                f"demo-server {self.instance_id} exited ({self.proc.popen.returncode}) before its ready line:\n"
                + tail(self.proc.logs["stderr"])
            )
        return False

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.proc.stop()


# ---------------------------------------------------------------------------------------------
# cloudmap-xds (the control plane under test)
# ---------------------------------------------------------------------------------------------

METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

GRPC_TYPE_URLS = (
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
)


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        labels = dict(LABEL.findall(m["labels"] or ""))
        out.append((m["name"], labels, value))
    return out


class ControlPlane:
    def __init__(
        self,
        exe: Path,
        namespace: str,
        aws_endpoint_url: str,
        log_dir: Path,
        registry: ProcRegistry,
        revision_interval: str = "500ms",
        refresh_interval: str = "2s",
        extra_args: Iterable[str] = (),
        name: str = "cloudmap-xds",
        xds_port: int | None = None,
        admin_port: int | None = None,
        env: dict[str, str | None] | None = None,
    ):
        # Given ports restart a control plane in place (clients reconnect to the same address).
        self.xds_port = xds_port or free_port()
        self.admin_port = admin_port or free_port()
        while self.admin_port == self.xds_port:
            self.admin_port = free_port()
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.stdout_path = log_dir / f"{name}.stdout"
        args = [
            str(exe),
            "--namespace", namespace,
            "--xds-listen", f"127.0.0.1:{self.xds_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--revision-interval", revision_interval,
            "--refresh-interval", refresh_interval,
            *extra_args,
            *shlex.split(os.environ.get("CLOUDMAP_XDS_EXTRA_ARGS", "")),
        ]  # fmt: skip
        # Nothing from the caller's AWS or CLOUDMAP_XDS_* settings leaks in (clap reads CLOUDMAP_XDS_*).
        env_vars = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDMAP_XDS_"))}
        env_vars.update(
            AWS_REGION=REGION,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_ENDPOINT_URL=aws_endpoint_url,
            AWS_EC2_METADATA_DISABLED="true",
            RUST_LOG=os.environ.get("CLOUDMAP_XDS_RUST_LOG", "info"),
            NO_COLOR="1",
        )
        # The caller's changes last: a value of None removes the variable (e.g. the fake credentials).
        for k, v in (env or {}).items():
            if v is None:
                env_vars.pop(k, None)
            else:
                env_vars[k] = v
        self.args = args
        fo, fe = open(self.stdout_path, "wb"), open(self.stderr_path, "wb")
        popen = spawn(args, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env_vars)
        fo.close()
        fe.close()
        self.proc = registry.add(Proc(name, popen, {"stderr": self.stderr_path, "stdout": self.stdout_path}))

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end on its own (an expected exit, e.g. a failed start); its code."""
        try:
            rc = self.proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"cloudmap-xds still running after {timeout} s; stderr tail:\n{tail(self.stderr_path)}") from None
        self.proc.stopped_by_us = True  # expected: not a process that died during the test
        return rc

    def stderr_lines(self) -> list[str]:
        return self.stderr_path.read_text(errors="replace").splitlines()

    def _alive_or_fail(self) -> None:
        if not self.proc.alive():
            raise AssertionError(
                f"cloudmap-xds exited with {self.proc.popen.returncode}; args {self.args}\nstderr tail:\n{tail(self.stderr_path)}"
            )

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        return http_get(self.admin + path, timeout=timeout)

    def wait_healthz(self, timeout: float = 20) -> None:
        def ok():
            self._alive_or_fail()
            return self.get("/healthz", timeout=1)[0] == 200

        wait_until(ok, timeout, f"{self.admin}/healthz == 200")

    def wait_ready(self, timeout: float = 30) -> float:
        """Wait for /ready == 200 (first Cloud Map sync); returns the time it took."""
        t0 = time.monotonic()

        def ready():
            self._alive_or_fail()
            status, _ = self.get("/ready", timeout=1)
            assert status in (200, 503), f"/ready answered {status}, want 503 (not synced) or 200"
            return status == 200

        wait_until(ready, timeout, f"{self.admin}/ready == 200")
        return time.monotonic() - t0

    def config_dump(self) -> dict:
        status, body = self.get("/config_dump")
        assert status == 200, f"/config_dump answered {status}: {body[:200]}"
        return json.loads(body)

    def census(self, service: str = "echo.demo") -> dict[str, int]:
        """The census the control plane's plans for `service` currently use (applied, not live)."""
        for svc in self.config_dump()["services"]:
            if svc["name"] == service:
                return svc["census"]
        return {}

    def wait_census(self, expected: dict[str, int], service: str = "echo.demo", timeout: float = 10) -> float:
        """Wait until the applied census of `service` equals `expected`; returns the time seen."""
        wait_until(lambda: self.census(service) == expected, timeout, f"census of {service} == {expected}")
        return time.time()

    def streams_synced(self, census: dict[str, int], service: str = "echo.demo") -> bool:
        """/config_dump lists exactly census[zone] clients per zone subscribed to `service` (EDS),
        and each has ACKed the last EDS version sent to it. Unlike census(), this also holds for
        policies whose plans do not use the census (their applied census stays empty)."""
        eds_url = GRPC_TYPE_URLS[3]
        seen: collections.Counter = collections.Counter()
        for cl in self.config_dump()["clients"]:
            eds = next((t for t in cl["types"] if t["type_url"] == eds_url), None)
            if eds is None or service not in eds["subscribed"]:
                continue
            if not eds["last_sent"] or eds["last_acked"] != eds["last_sent"]:
                return False
            seen[cl["zone"]] += 1
        return dict(seen) == {z: n for z, n in census.items() if n}

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        status, body = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:300]}"
        return parse_metrics(body)

    def metric_values(self, name: str) -> dict[str, float]:
        """{type_url (or label string): value} for one metric name."""
        out: dict[str, float] = {}
        for n, labels, v in self.metrics():
            if n == name:
                key = labels.get("type_url", json.dumps(labels, sort_keys=True))
                out[key] = out.get(key, 0.0) + v
        return out

    def assert_acked_no_nacks(self, type_urls: Iterable[str] = GRPC_TYPE_URLS) -> None:
        """f: the clients ACKed every type they use, and nobody NACKed anything."""
        self._alive_or_fail()
        acks = self.metric_values("cloudmap_xds_acks_total")
        nacks = self.metric_values("cloudmap_xds_nacks_total")
        assert acks, "no cloudmap_xds_acks_total series in /metrics"
        assert sum(acks.values()) > 0, f"cloudmap_xds_acks_total is 0: {acks}"
        missing = [t for t in type_urls if acks.get(t, 0) <= 0]
        assert not missing, f"no ACK counted for {missing}; acks={acks}"
        assert sum(nacks.values()) == 0, f"clients NACKed: cloudmap_xds_nacks_total={nacks}\n" + self.grep("nack", 20)

    def log_text(self) -> str:
        try:
            return ANSI.sub("", self.stderr_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def grep(self, needle: str, limit: int = 50) -> str:
        lines = [l for l in self.log_text().splitlines() if needle.lower() in l.lower()]
        return "\n".join(lines[:limit])

    def stop(self) -> None:
        self.proc.stop()


# ---------------------------------------------------------------------------------------------
# the grpcio xDS client (xds_client.py in a subprocess)
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    total: int
    ok: int
    failed: int
    own_zone: int
    per_instance: collections.Counter = field(default_factory=collections.Counter)
    per_zone: collections.Counter = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def own_zone_share(self) -> float:
        return self.own_zone / self.ok if self.ok else 0.0

    def __str__(self) -> str:
        return (
            f"total={self.total} ok={self.ok} failed={self.failed} own_zone_share={self.own_zone_share:.3f} "
            f"per_zone={dict(self.per_zone)} per_instance={dict(sorted(self.per_instance.items()))}"
            + (f" errors(first 5)={self.errors[:5]}" if self.errors else "")
        )


def write_bootstrap(path: Path, xds_port: int, node_id: str, zone: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{xds_port}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": node_id, "cluster": "demo", "locality": {"region": REGION, "zone": zone}},
            },
            indent=2,
        )
    )
    return path


class XdsClient:
    def __init__(
        self,
        stubs_dir: Path,
        xds_port: int,
        zone: str,
        node_id: str,
        log_dir: Path,
        registry: ProcRegistry,
        target: str = "xds:///echo.demo",
        interval: float = 0.02,
        deadline: float = 2.0,
        metadata: dict[str, str] | None = None,
        bootstrap: Path | None = None,
    ):
        self.zone = zone
        self.node_id = node_id
        self.target = target
        # A bootstrap written elsewhere (e.g. by `cloudmap-xds bootstrap`), else a plaintext one.
        self.bootstrap = bootstrap or write_bootstrap(log_dir / f"bootstrap-{node_id}.json", xds_port, node_id, zone)
        self.stdout_path = log_dir / f"client-{node_id}.jsonl"
        self.stderr_path = log_dir / f"client-{node_id}.stderr"
        self._lock = threading.Lock()
        self._calls: list[dict] = []
        self.first_ok_t: float | None = None
        env = dict(os.environ)
        env.update(
            GRPC_XDS_BOOTSTRAP=str(self.bootstrap),
            PYTHONPATH=str(stubs_dir),
            PYTHONUNBUFFERED="1",
            GRPC_VERBOSITY=os.environ.get("XDS_CLIENT_GRPC_VERBOSITY", "error"),
        )
        if os.environ.get("XDS_CLIENT_GRPC_TRACE"):
            env["GRPC_TRACE"] = os.environ["XDS_CLIENT_GRPC_TRACE"]
        args = [
            sys.executable, str(Path(__file__).with_name("xds_client.py")),
            "--target", target, "--interval", str(interval), "--deadline", str(deadline),
            "--caller", node_id, "--max-seconds", "900",
            *(a for k, v in (metadata or {}).items() for a in ("--metadata", f"{k}={v}")),
        ]  # fmt: skip
        fe = open(self.stderr_path, "wb")
        popen = spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fe, env=env)
        fe.close()
        self.proc = registry.add(
            Proc(f"xds-client {node_id}", popen, {"stderr": self.stderr_path, "calls": self.stdout_path})
        )
        threading.Thread(target=self._read, args=(popen.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        with open(self.stdout_path, "w") as f:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace")
                f.write(line)
                f.flush()
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                with self._lock:
                    self._calls.append(rec)
                    if rec.get("ok") and self.first_ok_t is None:
                        self.first_ok_t = rec["t"]

    # -- queries ------------------------------------------------------------------------------

    def calls(self, since: float | None = None, until: float | None = None, measured: bool = True) -> list[dict]:
        """Calls started in [since, until); measured=True keeps only those from the first success on."""
        with self._lock:
            calls = list(self._calls)
            first = self.first_ok_t
        lo = since if since is not None else float("-inf")
        if measured:
            lo = max(lo, first if first is not None else float("inf"))
        hi = until if until is not None else float("inf")
        return [c for c in calls if lo <= c["t"] < hi]

    def calls_since(self, t: float) -> list[dict]:
        return self.calls(since=t)

    def summary(self, calls: list[dict] | None = None) -> Summary:
        if calls is None:
            calls = self.calls()
        s = Summary(total=len(calls), ok=0, failed=0, own_zone=0)
        for c in calls:
            if c.get("ok"):
                s.ok += 1
                s.per_instance[c.get("instance")] += 1
                s.per_zone[c.get("zone")] += 1
                if c.get("zone") == self.zone:
                    s.own_zone += 1
            else:
                s.failed += 1
                s.errors.append(f"t={c['t']:.3f} {c.get('code')}: {c.get('error')}")
        return s

    def _alive_or_fail(self) -> None:
        if not self.proc.alive():
            raise AssertionError(
                f"xds client {self.node_id} exited ({self.proc.popen.returncode}):\n{tail(self.stderr_path, 30)}"
            )

    def wait_first_success(self, timeout: float = 30) -> float:
        def ok():
            self._alive_or_fail()
            return self.first_ok_t

        try:
            return wait_until(ok, timeout, f"first successful call of client {self.node_id} ({self.target})")
        except AssertionError as e:
            calls = self.calls(measured=False)
            errors = list(dict.fromkeys(f"{c.get('code')}: {c.get('error')}" for c in calls if not c.get("ok")))
            raise AssertionError(f"{e}; {len(calls)} calls so far, distinct errors (last 3): {errors[-3:]}") from None

    def wait_for(self, pred: Callable[["XdsClient"], Any], timeout: float, desc: str) -> Any:
        def check():
            self._alive_or_fail()
            return pred(self)

        return wait_until(check, timeout, f"{desc} (client {self.node_id})")

    def wait_settled(self, zones: set[str], streak: int = 10, since: float | None = None, timeout: float = 10) -> float:
        """Wait until `streak` consecutive successful calls since `since` all went to `zones`
        (the client applied its newest EDS); returns the time of the last of them."""

        def settled(c):
            run = 0
            for x in c.calls(since=since):
                run = run + 1 if x.get("ok") and x.get("zone") in zones else 0
                if run >= streak:
                    return x["t"]
            return None

        return self.wait_for(settled, timeout, f"{streak} consecutive calls to {sorted(zones)}")

    def wait_calls(self, n: int, since: float | None = None, timeout: float = 30) -> list[dict]:
        """Wait until n measured calls were made since `since`; return exactly the first n."""
        got = self.wait_for(lambda c: len(c.calls(since=since)) >= n and c.calls(since=since)[:n], timeout, f"{n} calls")
        return got

    def stop(self) -> None:
        self.proc.stop()


SLOW_PEERS = Path(__file__).with_name("slow_peers.py")
SLOW_PEER_READY = re.compile(r"slow-server listening on (?P<host>[0-9.]+):(?P<port>\d+)")


class SlowPeer:
    """slow_peers.py serve (sleeps --delay, or answers --fail-code), registered in Cloud Map."""

    def __init__(self, deploy, zone: str, instance_id: str, *extra: str, attributes: dict[str, str] | None = None):
        out, err = deploy.tmp / f"peer-{instance_id}.stdout", deploy.tmp / f"peer-{instance_id}.stderr"
        fe = open(err, "wb")
        popen = spawn(
            [sys.executable, str(SLOW_PEERS), "serve", "--stubs", str(deploy.stubs), "--zone", zone,
             "--instance-id", instance_id, *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fe, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        fe.close()
        self.proc = deploy.procs.add(Proc(f"peer-server {instance_id}", popen, {"stdout": out, "stderr": err}))
        self.addr: tuple[str, int] | None = None
        threading.Thread(target=self._drain, args=(popen.stdout, out), daemon=True).start()

        def ready():
            if not self.proc.alive():
                raise AssertionError(f"peer server exited ({popen.returncode}):\n{tail(err)}")
            return self.addr

        host, port = wait_until(ready, 15, f"peer server {instance_id} ready line")
        attrs = deploy.cloudmap.ecs_attributes(host, port, zone)
        attrs.update(attributes or {})
        deploy.cloudmap.register_attrs(instance_id, attrs)

    def _drain(self, stream, path: Path) -> None:
        drain_lines(stream, path, self._on_line)

    def _on_line(self, line: str) -> None:
        m = SLOW_PEER_READY.search(line)
        if m and self.addr is None:
            self.addr = (m["host"], int(m["port"]))


def window_calls(clients: list["XdsClient"], t0: float, t1: float) -> dict[str, list[dict]]:
    """Every client's calls started in [t0, t1), once each has logged a call started at t1 or later."""
    sleep_until(t1)  # let the measuring window pass
    for c in clients:
        c.wait_for(lambda x: any(r["t"] >= t1 for r in x.calls(since=t1)), 10, f"a call after {t1:.3f}")
    return {c.node_id: c.calls(since=t0, until=t1) for c in clients}


def share(calls: list[dict], zones: set[str]) -> float:
    ok = [c for c in calls if c.get("ok")]
    return sum(1 for c in ok if c.get("zone") in zones) / len(ok) if ok else 0.0


def large_anonymous_mappings(pid: int, min_mib: int = 512) -> list[tuple[int, str]]:
    """(size in MiB, permissions) of each anonymous mapping of `min_mib` MiB or more of `pid`."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if len(fields) < 6 and end - start >= min_mib << 20:
                out.append(((end - start) >> 20, fields[1]))
    return out


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")
