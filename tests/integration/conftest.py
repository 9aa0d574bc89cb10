"""Fixtures for the cloudmap-xds integration tests against real peers.

Peers: moto (Cloud Map emulator, one per session, reset before every test), a TCP proxy in
front of it (per test, so Cloud Map outages can be simulated), demo-server processes,
the cloudmap-xds control plane and grpcio xDS client processes (per test).

Binaries: CLOUDMAP_XDS_BIN and DEMO_SERVER_BIN (default target/debug/...). A missing binary
or peer fails the tests; nothing here skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3  # noqa: F401 — a missing peer must fail collection, not skip
import grpc  # noqa: F401
import pytest

from harness import (
    REPO_ROOT,
    ZONES,
    CloudMap,
    ControlPlane,
    DemoServer,
    MotoServer,
    ProcRegistry,
    XdsClient,
    binary,
)
from tcp_proxy import TcpProxy

PROCS_KEY = pytest.StashKey[ProcRegistry]()


# ---------------------------------------------------------------------------------------------
# reporting: tails of every process log of a failed test
# ---------------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        reg = item.stash.get(PROCS_KEY, None)
        if reg is not None:
            for title, text in reg.report_sections():
                rep.sections.append((title, text))


# ---------------------------------------------------------------------------------------------
# session-wide peers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def peers_py() -> Path:
    p = Path(os.environ.get("PEERS_PY") or (REPO_ROOT / ".peers" / "py"))
    if not (p / "bin" / "moto_server").exists():
        raise AssertionError(f"peers venv {p} has no moto_server: run scripts/install-peers.sh")
    return p


@pytest.fixture(scope="session")
def moto(peers_py, tmp_path_factory):
    server = MotoServer(peers_py, tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_stubs(tmp_path_factory) -> Path:
    """Python stubs for proto/proto/demo.proto, generated once per session."""
    out = tmp_path_factory.mktemp("stubs")
    proto_dir = REPO_ROOT / "proto" / "proto"
    r = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
            f"--python_out={out}", f"--grpc_python_out={out}", str(proto_dir / "demo.proto"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"protoc failed: {r.stderr}"
    assert (out / "demo_pb2.py").exists() and (out / "demo_pb2_grpc.py").exists()
    return out


# ---------------------------------------------------------------------------------------------
# per-test pieces
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def procs(request):
    reg = ProcRegistry()
    request.node.stash[PROCS_KEY] = reg
    yield reg
    reg.stop_all()


@pytest.fixture
def demo_server_bin() -> Path:
    return binary("DEMO_SERVER_BIN", "target/debug/demo-server")


@pytest.fixture
def cloudmap_xds_bin() -> Path:
    return binary("CLOUDMAP_XDS_BIN", "target/debug/cloudmap-xds")


@pytest.fixture
def fresh_moto(moto):
    moto.reset()
    return moto


@pytest.fixture
def proxy(fresh_moto):
    p = TcpProxy("127.0.0.1", fresh_moto.port)
    p.start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def cloudmap(fresh_moto) -> CloudMap:
    """boto3 talking to moto directly (not through the proxy)."""
    return CloudMap(fresh_moto.url)


class Deployment:
    """What one test runs: Cloud Map contents, demo servers, the control plane, clients."""

    def __init__(self, tmp: Path, procs: ProcRegistry, proxy: TcpProxy, cloudmap: CloudMap, stubs: Path, request):
        self.tmp = tmp
        self.procs = procs
        self.proxy = proxy
        self.cloudmap = cloudmap
        self.stubs = stubs
        self._request = request
        self.servers: dict[str, DemoServer] = {}
        self.clients: dict[str, XdsClient] = {}
        self.cp: ControlPlane | None = None

    def server(self, zone: str, instance_id: str, register: bool = True) -> DemoServer:
        exe = self._request.getfixturevalue("demo_server_bin")
        s = DemoServer(exe, zone, instance_id, self.tmp, self.procs)
        self.servers[instance_id] = s
        if register:
            self.cloudmap.register(instance_id, s.host, s.port, zone)
        return s

    def control_plane(self, namespace: str = "demo", wait_ready: bool = True, **kw) -> ControlPlane:
        exe = self._request.getfixturevalue("cloudmap_xds_bin")
        self.cp = ControlPlane(exe, namespace, self.proxy.url, self.tmp, self.procs, **kw)
        self.cp.wait_healthz()
        if wait_ready:
            self.cp.wait_ready()
        return self.cp

    def client(self, zone: str, target: str = "xds:///echo.demo", node_id: str | None = None, **kw) -> XdsClient:
        assert self.cp is not None, "start the control plane first"
        node_id = node_id or f"client-{zone}-{len(self.clients) + 1}"
        c = XdsClient(self.stubs, self.cp.xds_port, zone, node_id, self.tmp, self.procs, target=target, **kw)
        self.clients[node_id] = c
        return c

    def clients_in_zones(self, target: str = "xds:///echo.demo") -> dict[str, XdsClient]:
        """One client per zone, started together; returns {zone: client} after each's first success."""
        cs = {z: self.client(z, target=target, node_id=f"client-{z[-1]}") for z in ZONES}
        for c in cs.values():
            self.wait_first_success(c)
        return cs

    def wait_first_success(self, c: XdsClient, timeout: float = 30) -> float:
        try:
            return c.wait_first_success(timeout=timeout)
        except AssertionError as e:
            extra = ""
            if self.cp is not None and self.cp.proc.alive():
                try:
                    extra = f"\ncontrol plane nacks: {self.cp.metric_values('cloudmap_xds_nacks_total')}"
                except Exception as me:  # noqa: BLE001
                    extra = f"\n(/metrics unavailable: {me!r})"
            raise AssertionError(f"{e}{extra}") from None

    def standard(self, namespace: str = "demo", target: str = "xds:///echo.demo") -> dict[str, XdsClient]:
        """The standard topology: two servers per zone (i-a1, i-a2, i-b1, ...), control plane
        ready, one client per zone that has made its first successful call."""
        if self.cloudmap.service_id is None:
            self.cloudmap.setup(namespace=namespace)
        for z in ZONES:
            for n in (1, 2):
                self.server(z, f"i-{z[-1]}{n}")
        self.control_plane(namespace=namespace)
        return self.clients_in_zones(target=target)


@pytest.fixture
def deploy(request, tmp_path, procs, proxy, cloudmap, demo_stubs) -> Deployment:
    return Deployment(tmp_path, procs, proxy, cloudmap, demo_stubs, request)
