"""The xDS port under attack (issue 15): hostile clients written here, in raw ADS, against one
control plane, while three honest grpcio clients (one per zone, servers 2/2/2) keep calling.

Each test is one attack; it shows the attack refused or bounded (stream ended with the right
code, stream slot freed, census within one vote, RSS growth stated in MB) and that the honest
clients had 0 failed calls and >= 95 % same-zone calls while it ran — except under the
zone-claiming attack, where the zone-b client keeps ~2/3 of its calls local: the hostile
connection counts as one client of zone b, as an extra honest one would.

One bed (module-scoped) serves every attack, to keep CI time low. Its control plane runs with
--max-resource-names 500 (so over-limit requests fit in a stalled client's 64 KiB HTTP/2
window) and --stream-send-timeout 3s; every other limit is at its default. Each attack cleans
up after itself and the next one starts only when the honest clients are alone again.

The last test starts a second control plane with mTLS and [authz], and grpcio clients whose
bootstrap `cloudmap-xds bootstrap` wrote (gRFC A65 `tls` channel credentials with a client
certificate each); beside them, a client without a certificate is refused and an authenticated
identity no [authz] rule names is answered as if nothing existed.

Measured numbers print as `SECURITY <test>: ...` lines (see them with -rA or -s).
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

import conftest
from ads_raw import CDS, EDS, LDS, RDS, AdsStream, StalledH2Connection, fetch_client_status, node, request
from harness import (
    ZONES,
    CloudMap,
    ControlPlane,
    DemoServer,
    ProcRegistry,
    XdsClient,
    binary,
    config_args,
    vm_rss_kib,
    wait_until,
)
from tcp_proxy import TcpProxy

A, B, C = ZONES
SERVICE = "echo.demo"
MAX_RESOURCE_NAMES = 500
MAX_NAMES_PER_STREAM = 20_000  # the default
SEND_TIMEOUT = 3.0
DELTA_ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


def report(test: str, **numbers) -> None:
    print(f"SECURITY {test}: " + " ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)


def zone_problems(
    clients: dict[str, XdsClient], since: float, until: float | None = None, local: dict | None = None
) -> tuple[dict[str, float], list[str]]:
    """Each client's own-zone share of its calls in [since, until), and what is wrong with them:
    any failed call, fewer than 20 ok, or an own-zone share outside `local[zone]` (default >= 95 %)."""
    local = local or {}
    shares, problems = {}, []
    for zone, c in clients.items():
        s = c.summary(c.calls(since=since, until=until))
        lo, hi = local.get(zone, (0.95, 1.0))
        shares[zone[-1]] = round(s.own_zone_share, 3)
        if s.failed or s.ok < 20 or not lo <= s.own_zone_share <= hi:
            problems.append(f"{c.node_id}: want 0 failed, >= 20 ok, own-zone share in [{lo}, {hi}]: {s}")
    return shares, problems


class Bed:
    def __init__(self, procs: ProcRegistry, cp: ControlPlane, clients: dict[str, XdsClient], aws_url: str):
        self.procs = procs
        self.aws_url = aws_url
        self.cp = cp
        self.clients = clients

    def honest_alone(self) -> None:
        """Wait until only the three honest clients have streams (the previous attack is gone)."""

        def alone():
            ids = sorted(cl["node_id"] or "" for cl in self.cp.config_dump()["clients"])
            return ids == ["client-a", "client-b", "client-c"]

        wait_until(alone, 15, "only the three honest clients connected")
        self.cp.wait_census({A: 1, B: 1, C: 1}, timeout=15)

    def assert_honest(self, since: float, until: float, local: dict[str, tuple[float, float]] | None = None) -> dict:
        """0 failed calls in [since, until); own-zone share within `local[zone]` (default >= 95 %)."""
        local = local or {}
        # At least 2 s of calls (~100 per client) to judge by, however quick the attack was.
        until = max(until, since + 2.0)
        if time.time() < until:
            time.sleep(until - time.time())
        shares, problems = zone_problems(self.clients, since, until, local)
        assert not problems, "honest clients during the attack:\n" + "\n".join(problems)
        return shares


@pytest.fixture(scope="module")
def bed(moto, demo_stubs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    procs = ProcRegistry()
    moto.reset()
    proxy = TcpProxy("127.0.0.1", moto.port)
    proxy.start()
    try:
        cloudmap = CloudMap(moto.url)
        cloudmap.setup()
        demo = binary("DEMO_SERVER_BIN", "target/debug/demo-server")
        for z in ZONES:
            for n in (1, 2):
                s = DemoServer(demo, z, f"i-{z[-1]}{n}", tmp, procs)
                cloudmap.register(f"i-{z[-1]}{n}", s.host, s.port, z)
        cp = ControlPlane(
            binary("CLOUDMAP_XDS_BIN", "target/debug/cloudmap-xds"),
            "demo",
            proxy.url,
            tmp,
            procs,
            extra_args=[
                "--max-resource-names", str(MAX_RESOURCE_NAMES),
                "--stream-send-timeout", f"{SEND_TIMEOUT:g}s",
                "--census-debounce", "300ms",
            ],
        )  # fmt: skip
        cp.wait_healthz()
        cp.wait_ready()
        clients = {z: XdsClient(demo_stubs, cp.xds_port, z, f"client-{z[-1]}", tmp, procs) for z in ZONES}
        for c in clients.values():
            c.wait_first_success(timeout=30)
        b = Bed(procs, cp, clients, proxy.url)
        b.honest_alone()
        yield b
    finally:
        procs.stop_all()
        proxy.close()


@pytest.fixture(autouse=True)
def _logs_on_failure(request, bed):
    """Process logs in the report of a failed test (conftest's hook reads this stash)."""
    request.node.stash[conftest.PROCS_KEY] = bed.procs
    yield
    assert bed.cp.proc.alive(), f"the control plane died: {bed.cp.proc.exit_note()}"


class DeltaStream:
    """One hand-driven Delta ADS stream: send() queues a request; how the stream ended is kept."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._q: queue.Queue = queue.Queue()
        self.received: list[discovery_pb2.DeltaDiscoveryResponse] = []
        self.ended: tuple[grpc.StatusCode, str] | None = None
        method = self.channel.stream_stream(
            DELTA_ADS_METHOD,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        self.call = method(iter(self._q.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for r in self.call:
                self.received.append(r)
            self.ended = (grpc.StatusCode.OK, "")
        except grpc.RpcError as e:
            self.ended = (e.code(), e.details() or "")

    def send(self, r: discovery_pb2.DeltaDiscoveryRequest) -> None:
        self._q.put(r)

    def close(self) -> None:
        self._q.put(None)
        self.call.cancel()
        self._reader.join(timeout=5)
        self.channel.close()


# ---------------------------------------------------------------------------------------------
# 1. CSDS from an unauthenticated peer
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_csds_is_not_served_on_the_xds_port_but_on_the_admin_address(bed):
    t0 = time.time()
    with pytest.raises(grpc.RpcError) as refused:
        fetch_client_status(bed.cp.xds_port)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, f"CSDS on the xDS port: {refused.value}"
    # The operator's CSDS: the admin address, over the same HTTP port as /metrics.
    resp = fetch_client_status(bed.cp.admin_port)
    listed = sorted(c.node.id for c in resp.config)
    assert listed == ["client-a", "client-b", "client-c"], listed
    assert all(c.generic_xds_configs for c in resp.config), "the admin CSDS shows what each client holds"
    time.sleep(1.0)  # a window of honest calls to judge
    shares = bed.assert_honest(t0, time.time())
    report("csds", xds_port=refused.value.code().name, admin_clients=len(listed), own_zone=shares)


# ---------------------------------------------------------------------------------------------
# 2. 100,000 names over Delta requests
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_names_accumulated_over_delta_requests_are_bounded_per_stream(bed):
    bed.honest_alone()
    pid = bed.cp.proc.popen.pid
    rss_before = vm_rss_kib(pid)
    t0 = time.time()
    s = DeltaStream(bed.cp.xds_port)
    sent = 0
    try:
        first = True
        for batch in range(100_000 // MAX_RESOURCE_NAMES):
            names = [f"svc-{batch}-{i}.demo" for i in range(MAX_RESOURCE_NAMES)]
            r = discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=names)
            if first:
                r.node.CopyFrom(node("hostile-delta", A))
                first = False
            s.send(r)
            sent += len(names)
            if s.ended is not None:
                break
        wait_until(lambda: s.ended is not None, 20, "the Delta stream holding too many names ended")
        rss_peak = vm_rss_kib(pid)
    finally:
        s.close()
    code, details = s.ended
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-names-per-stream" in details, (code, details)
    bed.honest_alone()  # its stream slot and census entries are gone
    t1 = time.time()
    shares = bed.assert_honest(t0, t1)
    growth_mb = (rss_peak - rss_before) / 1024
    assert growth_mb < 64, f"RSS grew {growth_mb:.1f} MB for one stream's names"
    report(
        "delta_names",
        names_queued_by_client=sent,
        limit=MAX_NAMES_PER_STREAM,
        ended=code.name,
        rss_growth_mb=f"{growth_mb:.1f}",
        own_zone=shares,
    )


# ---------------------------------------------------------------------------------------------
# 3. 100 zone-claiming streams
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_streams_claiming_a_zone_count_as_one_vote(bed):
    bed.honest_alone()
    channel = grpc.insecure_channel(f"127.0.0.1:{bed.cp.xds_port}")
    streams = []
    try:
        for i in range(100):
            s = AdsStream(bed.cp.xds_port, channel=channel)
            s.subscribe(EDS, [SERVICE], first_node=node(f"hostile-zone-{i}", B))
            streams.append(s)
        for s in streams:
            s.wait_response(EDS, timeout=20)
        # One connection, 100 streams and node ids: one more client of zone b.
        live = lambda: next(x for x in bed.cp.config_dump()["services"] if x["name"] == SERVICE)["live_census"]
        wait_until(lambda: live() == {A: 1, B: 2, C: 1}, 10, f"live census a=1 b=2 c=1 (now {live()})")
        bed.cp.wait_census({A: 1, B: 2, C: 1}, timeout=10)
        time.sleep(1.0)  # the clients apply the new shares
        t0 = time.time()
        time.sleep(8.0)  # ~400 calls per client to judge the shares by
        t1 = time.time()
        # Zone b's demand is 2 of 4 against a third of the capacity: it keeps (1/3)/(1/2) = 2/3 local.
        shares = bed.assert_honest(t0, t1, local={B: (0.55, 0.78)})
        assert all(s.ended is None for s in streams), "the hostile streams are served, not refused"
    finally:
        for s in streams:
            s.close()
        channel.close()
    bed.honest_alone()
    report("zone_claim", hostile_streams=len(streams), census={"a": 1, "b": 2, "c": 1}, own_zone=shares)


# ---------------------------------------------------------------------------------------------
# 4. 10,000 NAME:PORT variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_name_port_variants_do_not_grow_or_flush_the_shared_encode_cache(bed):
    bed.honest_alone()
    encodes = lambda: sum(bed.cp.metric_values("cloudmap_xds_shared_encodes_total").values())
    assert bed.cp.metric_values("cloudmap_xds_shared_encodes_total"), "no cloudmap_xds_shared_encodes_total metric"
    before = encodes()
    t0 = time.time()
    s = AdsStream(bed.cp.xds_port)
    variants = 0
    try:
        port = 1
        for batch in range(10_000 // MAX_RESOURCE_NAMES):
            names = [f"{SERVICE}:{port + i}" for i in range(MAX_RESOURCE_NAMES)]
            port += MAX_RESOURCE_NAMES
            nonce = s.responses(LDS)[-1].response.nonce if batch else ""
            s.send(request(LDS, names, nonce=nonce, with_node=node("hostile-ports", A) if batch == 0 else None))
            got = s.wait_response(LDS, n=batch + 1, timeout=20)
            assert len(got.response.resources) == MAX_RESOURCE_NAMES, "each variant is a listener it is sent"
            variants += len(names)
        rss_peak = vm_rss_kib(bed.cp.proc.popen.pid)
    finally:
        s.close()
    t1 = time.time()
    grew = encodes() - before
    assert grew < 50, f"{variants} NAME:PORT variants made {grew:.0f} encodes into the shared memo"
    shares = bed.assert_honest(t0, t1)
    report("name_port", variants=variants, shared_encodes=int(grew), rss_kib=rss_peak, own_zone=shares)


# ---------------------------------------------------------------------------------------------
# 5. A client that stops reading, then sends an over-limit request
# ---------------------------------------------------------------------------------------------


def _timed_out(bed) -> float:
    return sum(bed.cp.metric_values("cloudmap_xds_streams_timed_out_total").values())


@pytest.mark.timeout(90)
def test_a_client_that_stops_reading_loses_its_stream_after_the_send_timeout(bed):
    bed.honest_alone()
    t0 = time.time()
    # 500 NAME:PORT variants of every type: ~0.5 MB of responses, more than the HTTP/2 window
    # and hyper's per-stream send buffer (400 KiB) hold, so a push waits for a client that
    # never reads, and the stream is released --stream-send-timeout later.
    names = [f"{SERVICE}:{20_000 + i}" for i in range(MAX_RESOURCE_NAMES)]
    timed_out_before = _timed_out(bed)
    conn = StalledH2Connection(
        bed.cp.xds_port,
        [[request(LDS, names, with_node=node("stalled-reader", A))] + [request(t, names) for t in (RDS, CDS, EDS)]],
    )
    try:
        listed = lambda: any(cl["node_id"] == "stalled-reader" for cl in bed.cp.config_dump()["clients"])
        wait_until(listed, 10, "the stalled stream is listed")
        t_listed = time.time()
        wait_until(lambda: not listed(), SEND_TIMEOUT + 10, "the stalled stream's slot is freed")
        freed_after = time.time() - t_listed
    finally:
        conn.close()
    # Listed at most ~0.1 s after its push was handed over, freed once it waited SEND_TIMEOUT.
    assert freed_after >= SEND_TIMEOUT - 1.0, f"freed {freed_after:.1f}s after it was listed: before the send timeout"
    assert _timed_out(bed) - timed_out_before == 1, "cloudmap_xds_streams_timed_out_total counts the stream once"
    bed.honest_alone()
    shares = bed.assert_honest(t0, time.time())
    report("stalled_reader", freed_after_s=f"{freed_after:.1f}", send_timeout_s=SEND_TIMEOUT, own_zone=shares)


@pytest.mark.timeout(90)
def test_a_non_reading_client_sending_an_over_limit_request_loses_its_stream(bed):
    bed.honest_alone()
    t0 = time.time()
    # As above, and the third request names too many resources: its refusal cannot go out
    # behind the stalled pushes, but the request is read and refused, and the slot freed.
    first = [f"{SERVICE}:{20_000 + i}" for i in range(MAX_RESOURCE_NAMES)]
    second = [f"{SERVICE}:{30_000 + i}" for i in range(MAX_RESOURCE_NAMES)]
    over = [f"x{i}" for i in range(MAX_RESOURCE_NAMES + 1)]
    rejected = lambda: sum(bed.cp.metric_values("cloudmap_xds_requests_rejected_total").values())
    rejected_before = rejected()
    conn = StalledH2Connection(
        bed.cp.xds_port,
        [[
            request(LDS, first, with_node=node("stalled-over-limit", A)),
            request(LDS, second, nonce="1"),
            request(LDS, over, nonce="1"),
        ]],
    )  # fmt: skip
    try:
        listed = lambda: any(cl["node_id"] == "stalled-over-limit" for cl in bed.cp.config_dump()["clients"])
        wait_until(lambda: rejected() > rejected_before, 10, "the over-limit request is refused")
        t_refused = time.time()
        wait_until(lambda: not listed(), SEND_TIMEOUT + 10, "the stalled stream's slot is freed")
        freed_after = time.time() - t_refused
    finally:
        conn.close()
    assert "stalled-over-limit" in bed.cp.log_text(), "the stream never identified itself"
    bed.honest_alone()
    shares = bed.assert_honest(t0, time.time())
    report("stalled_over_limit", freed_after_refusal_s=f"{freed_after:.1f}", own_zone=shares)


# ---------------------------------------------------------------------------------------------
# 6. Nodes that would be labels, and streams per connection
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_invalid_zones_are_refused_and_unknown_ones_are_not_labels(bed):
    bed.honest_alone()
    t0 = time.time()
    bad = AdsStream(bed.cp.xds_port)
    odd = AdsStream(bed.cp.xds_port)
    try:
        bad.subscribe(EDS, [SERVICE], first_node=node("hostile-label", 'x"} evil{a="'))
        end = bad.wait_ended(10)
        assert end.code == grpc.StatusCode.INVALID_ARGUMENT and "zone" in (end.details or ""), end
        odd.subscribe(EDS, [SERVICE], first_node=node("no-such-zone", "mars-1a"))
        odd.wait_response(EDS)
        zones = {
            labels.get("zone")
            for name, labels, v in bed.cp.metrics()
            if name == "cloudmap_xds_streams" and v > 0
        }
        assert "mars-1a" not in zones and "other" in zones, f"stream gauge zone labels: {zones}"
    finally:
        bad.close()
        odd.close()
    bed.honest_alone()
    shares = bed.assert_honest(t0, time.time())
    report("node_checks", refused=end.code.name, labels=sorted(z for z in zones if z is not None), own_zone=shares)


# ---------------------------------------------------------------------------------------------
# 7. mTLS end to end: grpcio clients with a bootstrap written by `cloudmap-xds bootstrap`
# ---------------------------------------------------------------------------------------------


def write_pki(d) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (SPIFFE URI), as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, sans=None, ca=False):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "security test CA")])
    ca = cert("security test CA", ca_key, ca_name, ca_key, ca=True)
    out = {}

    def save(stem, c, key):
        out[f"{stem}.pem"] = str(d / f"{stem}.pem")
        out[f"{stem}.key"] = str(d / f"{stem}.key")
        (d / f"{stem}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["ca.pem"] = str(d / "ca.pem")
    server_key = ec.generate_private_key(ec.SECP256R1())
    save("server", cert("server", server_key, ca_name, ca_key,
                        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), server_key)  # fmt: skip
    for z in ZONES:  # one certificate per client: the census counts one vote per certificate
        key = ec.generate_private_key(ec.SECP256R1())
        uri = x509.UniformResourceIdentifier(f"spiffe://test/client-{z[-1]}")
        save(f"client-{z[-1]}", cert(f"client-{z[-1]}", key, ca_name, ca_key, [uri]), key)
    for who in ("intruder", "ops"):
        key = ec.generate_private_key(ec.SECP256R1())
        uri = x509.UniformResourceIdentifier(f"spiffe://test/{who}")
        save(who, cert(who, key, ca_name, ca_key, [uri]), key)
    return out


AUTHZ = """
[[authz.allow]]
identity = "spiffe://test/client-*"
services = ["echo.demo"]

[[authz.allow]]
identity = "spiffe://test/ops"
csds = true
"""


def mtls_csds(port: int, pki: dict[str, str], who: str):
    """FetchClientStatus over mTLS as `who` (a certificate of write_pki)."""
    from envoy.service.status.v3 import csds_pb2

    with open(pki["ca.pem"], "rb") as ca, open(pki[f"{who}.key"], "rb") as k, open(pki[f"{who}.pem"], "rb") as c:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.read(), private_key=k.read(), certificate_chain=c.read())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        fetch = ch.unary_unary(
            "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus",
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        return fetch(csds_pb2.ClientStatusRequest(exclude_resource_contents=True), timeout=10)


@pytest.mark.timeout(120)
def test_mtls_clients_with_its_bootstrap_and_authz_refusing_a_forbidden_identity(bed, demo_stubs, tmp_path):
    """grpcio clients reach the control plane over mTLS with bootstraps `cloudmap-xds bootstrap`
    wrote; [authz] lets their identities (spiffe://test/client-*) read echo.demo, and an
    authenticated identity no rule names (spiffe://test/intruder) is answered as if nothing existed."""
    import json
    import subprocess

    pki = write_pki(tmp_path)
    exe = binary("CLOUDMAP_XDS_BIN", "target/debug/cloudmap-xds")
    cp = ControlPlane(
        exe, "demo", bed.aws_url, tmp_path, bed.procs,
        name="cloudmap-xds-mtls",
        extra_args=["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--tls-client-ca", pki["ca.pem"],
                    "--csds-on-xds-port", *config_args(tmp_path, AUTHZ)],
    )  # fmt: skip
    clients: dict[str, XdsClient] = {}
    try:
        cp.wait_healthz()
        cp.wait_ready()
        for z in ZONES:
            path = tmp_path / f"bootstrap-mtls-{z[-1]}.json"
            run = subprocess.run(
                [str(exe), "bootstrap", "--server-uri", f"127.0.0.1:{cp.xds_port}", "--node-id", f"mtls-{z[-1]}",
                 "--zone", z, "--ca-file", pki["ca.pem"], "--cert-file", pki[f"client-{z[-1]}.pem"],
                 "--key-file", pki[f"client-{z[-1]}.key"], "--output", str(path)],
                capture_output=True, text=True, timeout=30, env={"AWS_EC2_METADATA_DISABLED": "true", "PATH": "/usr/bin:/bin"},
            )  # fmt: skip
            assert run.returncode == 0, run.stderr
            creds = json.loads(path.read_text())["xds_servers"][0]["channel_creds"]
            assert creds[0]["type"] == "tls" and "certificate_file" in creds[0]["config"], creds
            clients[z] = XdsClient(demo_stubs, cp.xds_port, z, f"mtls-{z[-1]}", tmp_path, bed.procs, bootstrap=path)
        for c in clients.values():
            c.wait_first_success(timeout=30)
        cp.wait_census({A: 1, B: 1, C: 1}, timeout=15)
        time.sleep(1.0)  # the clients apply the shares of the settled census
        t0 = time.time()
        time.sleep(2.0)
        problems = zone_problems(clients, t0)[1]
        assert not problems, "mTLS clients:\n" + "\n".join(problems)
        # Without a client certificate the control plane refuses the connection.
        with open(pki["ca.pem"], "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(f"127.0.0.1:{cp.xds_port}", creds) as ch:
            s = AdsStream(cp.xds_port, channel=ch)
            s.subscribe(EDS, [SERVICE], first_node=node("no-cert", A))
            end = s.wait_ended(15)
            s.close()
        assert end.code == grpc.StatusCode.UNAVAILABLE, f"a client without a certificate: {end}"

        # An authenticated identity that [authz] does not name: everything is absent to it.
        t_attack = time.time()
        with open(pki["ca.pem"], "rb") as ca, open(pki["intruder.key"], "rb") as k, open(pki["intruder.pem"], "rb") as c:
            creds = grpc.ssl_channel_credentials(root_certificates=ca.read(), private_key=k.read(), certificate_chain=c.read())
        with grpc.secure_channel(f"127.0.0.1:{cp.xds_port}", creds) as ch:
            s = AdsStream(cp.xds_port, channel=ch)
            try:
                s.subscribe(LDS, [SERVICE], first_node=node("intruder", A))
                lds = s.wait_response(LDS, timeout=10).response
                s.subscribe(CDS, [])
                cds = s.wait_response(CDS, timeout=10).response
                s.subscribe(EDS, [SERVICE])
                s.subscribe(LDS, [SERVICE])  # asked again: counted again, logged once
                time.sleep(1.0)
                eds = s.responses(EDS)
                assert s.ended is None, f"the intruder's stream is answered, not ended: {s.ended}"
            finally:
                s.close()
        assert len(lds.resources) == 0, f"the intruder was sent listeners: {lds}"
        assert len(cds.resources) == 0, f"the intruder's wildcard CDS holds clusters: {cds}"
        assert not eds, f"the intruder was sent endpoints: {eds}"
        denied = sum(cp.metric_values("cloudmap_xds_authz_denied_total").values())
        assert denied >= 2, f"cloudmap_xds_authz_denied_total = {denied}"
        lines = [l for l in cp.log_text().splitlines() if "not authorized" in l and "spiffe://test/intruder" in l]
        names = sorted(l.split("name=")[1].split()[0] for l in lines)
        assert names == [SERVICE], f"one log line per denied identity and name, got: {lines}"
        problems = zone_problems(clients, t_attack)[1]
        assert not problems, "mTLS clients during the forbidden identity's attempt:\n" + "\n".join(problems)
        # CSDS on the xDS port (--csds-on-xds-port) answers only identities with csds = true.
        for who in ("intruder", "client-a"):
            with pytest.raises(grpc.RpcError) as refused:
                mtls_csds(cp.xds_port, pki, who)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, f"CSDS as {who}: {refused.value}"
        listed = sorted(c.node.id for c in mtls_csds(cp.xds_port, pki, "ops").config)
        assert listed == ["mtls-a", "mtls-b", "mtls-c"], f"CSDS as ops lists {listed}"
        report(
            "mtls_bootstrap_authz",
            clients=sorted(c.node_id for c in clients.values()),
            no_cert=end.code.name,
            intruder_lds=len(lds.resources),
            intruder_cds=len(cds.resources),
            denied=int(denied),
        )
    finally:
        for c in clients.values():
            c.proc.stop()
        cp.stop()
