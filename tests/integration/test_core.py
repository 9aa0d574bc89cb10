"""End-to-end tests of cloudmap-xds with real peers: moto as Cloud Map, demo-server processes
as the service's instances, and grpcio (C-core xDS) clients, one per availability zone.

Timing parameters of the control plane in these tests: --revision-interval 500ms,
--refresh-interval 2s (see harness.ControlPlane).
"""

from __future__ import annotations

import re
import time

from harness import ZONES, sleep_until

REFRESH = 2.0  # --refresh-interval
MAX_BACKOFF = 10.0  # assumed maximum retry backoff of the control plane's Cloud Map poller


def assert_no_failures(clients, since: float | None = None, until: float | None = None) -> None:
    bad = {}
    for name, c in clients.items():
        s = c.summary(c.calls(since=since, until=until))
        if s.failed:
            bad[name] = str(s)
    assert not bad, f"failed calls: {bad}"


def calls_to(client, instances, since=None, until=None) -> int:
    return sum(1 for x in client.calls(since=since, until=until) if x.get("ok") and x.get("instance") in instances)


def first_call_to(client, instance, since):
    for x in client.calls(since=since):
        if x.get("ok") and x.get("instance") == instance:
            return x["t"]
    return None


# ---------------------------------------------------------------------------------------------
# a. same-zone preference
# ---------------------------------------------------------------------------------------------


def test_each_client_is_served_in_its_own_zone(deploy):
    clients = deploy.standard()
    # Zone-aware routing starts from the census: once every client is counted (1/1/1), each
    # zone has capacity for its clients and keeps all their traffic. Measure from then on.
    applied = deploy.cp.wait_census({z: 1 for z in clients})
    problems = []
    for zone, c in clients.items():
        start = c.wait_settled({zone}, since=applied)
        calls = c.wait_calls(200, since=start, timeout=30)
        s = c.summary(calls)
        if s.failed:
            problems.append(f"{zone}: {s.failed} of 200 calls failed: {s}")
        if s.own_zone_share < 0.95:
            off = [x["t"] - calls[0]["t"] for x in calls if x.get("ok") and x.get("zone") != zone]
            problems.append(
                f"{zone}: only {s.own_zone_share:.1%} of the first 200 calls after the first success were in "
                f"its own zone (off-zone calls from {min(off):.2f}s to {max(off):.2f}s after it): {s}"
            )
        own = {f"i-{zone[-1]}1", f"i-{zone[-1]}2"}
        if not own <= set(s.per_instance):
            problems.append(f"{zone}: not every own-zone instance was used: {s}")
    assert not problems, "\n".join(problems)
    assert_no_failures(deploy.clients)
    deploy.cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# b. register / deregister
# ---------------------------------------------------------------------------------------------


def test_registered_instance_gets_traffic_and_deregistered_stops(deploy):
    clients = deploy.standard()
    ca = clients["us-east-1a"]
    new = deploy.server("us-east-1a", "i-a3", register=False)

    t0 = time.time()
    deploy.cloudmap.register("i-a3", new.host, new.port, "us-east-1a")
    ca.wait_for(
        lambda c: first_call_to(c, "i-a3", t0),
        t0 + 3.0 - time.time(),
        "traffic to newly registered i-a3 within 3 s of registering",
    )

    t1 = time.time()
    deploy.cloudmap.deregister("i-a3")
    # i-a3 keeps running: after the 3 s deadline it must get no calls at all.
    sleep_until(t1 + 3.0 + 2.0)
    window = ca.calls(since=t1 + 3.0, until=t1 + 5.0)
    assert len(window) >= 40, f"client made too few calls in the measuring window: {ca.summary(window)}"
    late = calls_to(ca, {"i-a3"}, since=t1 + 3.0)
    last = max((x["t"] for x in ca.calls(since=t1) if x.get("instance") == "i-a3"), default=None)
    assert late == 0, (
        f"deregistered i-a3 still got {late} calls more than 3 s after deregistering "
        f"(last one {last - t1:.2f}s after)"
    )
    assert new.proc.alive(), "i-a3 was meant to stay up"
    assert_no_failures(deploy.clients)
    deploy.cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# c. custom health status
# ---------------------------------------------------------------------------------------------


def test_unhealthy_instances_stop_getting_traffic(deploy):
    clients = deploy.standard()
    ca = clients["us-east-1a"]
    zone_a = {"i-a1", "i-a2"}

    t0 = time.time()
    for i in sorted(zone_a):
        deploy.cloudmap.set_health(i, "UNHEALTHY")
    deadline = t0 + REFRESH + 2.0
    sleep_until(deadline + 2.0)
    window = ca.calls(since=deadline, until=deadline + 2.0)
    s = ca.summary(window)
    last = max((x["t"] for x in ca.calls(since=t0) if x.get("instance") in zone_a), default=None)
    assert len(window) >= 40, f"client made too few calls in the measuring window: {s}"
    assert calls_to(ca, zone_a, since=deadline) == 0, (
        f"UNHEALTHY zone-a instances still served calls after {REFRESH + 2.0:.0f}s "
        f"(last one {last - t0:.2f}s after set_health): {s}"
    )
    assert s.failed == 0 and set(s.per_zone) <= {"us-east-1b", "us-east-1c"}, f"zone-a client not on b/c: {s}"
    assert all(deploy.servers[i].proc.alive() for i in zone_a)
    assert_no_failures(deploy.clients)
    deploy.cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# d. Cloud Map outage
# ---------------------------------------------------------------------------------------------


def test_cloud_map_outage_keeps_last_known_endpoints(deploy):
    clients = deploy.standard()
    cp = deploy.cp
    ca = clients["us-east-1a"]

    t0 = time.time()
    deploy.proxy.stop()
    ready_answers = []
    while time.time() < t0 + 20.0:
        ready_answers.append(cp.get("/ready")[0])
        assert cp.get("/healthz")[0] == 200, "/healthz not 200 during the Cloud Map outage"
        time.sleep(1.0)  # sampling /ready while the outage window passes
    t1 = time.time()
    assert set(ready_answers) == {200}, f"/ready during the outage: {ready_answers}"
    for zone, c in clients.items():
        s = c.summary(c.calls(since=t0, until=t1))
        assert s.total >= 200, f"{zone}: client made too few calls during the outage: {s}"
        assert s.failed == 0, f"{zone}: calls failed while Cloud Map was down: {s}"
        assert s.own_zone_share >= 0.95, f"{zone}: left its zone during the outage: {s}"
    assert "i-a1" in clients["us-east-1a"].summary(clients["us-east-1a"].calls(since=t0, until=t1)).per_instance

    deploy.proxy.start()
    t2 = time.time()
    new = deploy.server("us-east-1a", "i-a3", register=False)
    deploy.cloudmap.register("i-a3", new.host, new.port, "us-east-1a")
    budget = MAX_BACKOFF + 5.0
    ca.wait_for(
        lambda c: first_call_to(c, "i-a3", t2),
        t2 + budget - time.time(),
        f"traffic to i-a3 within {budget:.0f}s after Cloud Map came back",
    )
    assert cp.get("/ready")[0] == 200
    assert_no_failures(deploy.clients)
    cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# e. malformed registrations
# ---------------------------------------------------------------------------------------------


def warn_lines_naming(log: str, instance_id: str) -> list[str]:
    pat = re.compile(r"(?<![\w-])" + re.escape(instance_id) + r"(?![\w-])")
    return [l for l in log.splitlines() if pat.search(l) and re.search(r"\bWARN", l, re.IGNORECASE)]


def test_malformed_instances_are_skipped_and_warned_once(deploy):
    cm = deploy.cloudmap.setup()
    for z in ZONES:
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")
    base = dict(cm.ecs_attributes("127.0.0.1", 1, "us-east-1a"))
    no_port = {k: v for k, v in base.items() if k != "AWS_INSTANCE_PORT"}
    cm.register_attrs("bad-noport", no_port)
    cm.register_attrs("bad-port-abc", {**base, "AWS_INSTANCE_PORT": "abc"})
    cm.register_attrs("bad-ip", {**base, "AWS_INSTANCE_IPV4": "not-an-ip"})
    bad = ["bad-noport", "bad-port-abc", "bad-ip"]

    cp = deploy.control_plane()
    clients = deploy.clients_in_zones()
    # One more bad registration while the control plane runs.
    cm.register_attrs("bad-late-ip", {**base, "AWS_INSTANCE_IPV4": "300.1.2.3", "AVAILABILITY_ZONE": "us-east-1b"})
    bad.append("bad-late-ip")
    t_last = time.time()

    good = {f"i-{z[-1]}{n}" for z in ZONES for n in (1, 2)}

    def served():
        seen = set()
        for c in clients.values():
            seen |= set(c.summary().per_instance)
        return good <= seen

    deploy.clients["client-a"].wait_for(lambda _: served(), 15, f"traffic reaching every good instance {sorted(good)}")
    # Let at least two more refresh cycles pass, then look at the log.
    sleep_until(t_last + 2 * REFRESH + 1.5)
    log = cp.log_text()
    counts = {i: len(warn_lines_naming(log, i)) for i in bad}
    assert counts == {i: 1 for i in bad}, (
        f"want exactly one WARN line naming each bad instance, got {counts}\n"
        + "\n".join(l for i in bad for l in warn_lines_naming(log, i))
    )
    for c in clients.values():
        s = c.summary()
        assert set(s.per_instance) <= good, f"a client was sent to a bad instance: {s}"
    assert_no_failures(deploy.clients)
    cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# listener names
# ---------------------------------------------------------------------------------------------


def _small_deployment(deploy, namespace: str, target: str):
    deploy.cloudmap.setup(namespace=namespace)
    for z in ("us-east-1a", "us-east-1b"):
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")
    deploy.control_plane(namespace=namespace)
    c = deploy.client("us-east-1a", target=target, node_id="client-a")
    deploy.wait_first_success(c)
    s = c.summary(c.wait_calls(100, timeout=30))
    assert s.failed == 0, f"{target}: {s}"
    # One client in zone a and equal capacity in a and b: the control plane may spill some
    # traffic to b (census-based zone shares), so only "served by registered instances" is checked.
    assert s.ok == 100 and set(s.per_instance) <= set(deploy.servers), f"{target}: {s}"
    assert_no_failures(deploy.clients)
    deploy.cp.assert_acked_no_nacks()


def test_listener_name_with_port_is_served(deploy):
    _small_deployment(deploy, "demo", "xds:///echo.demo:50051")


def test_namespace_with_dots(deploy):
    _small_deployment(deploy, "grpc.demo", "xds:///echo.grpc.demo")
