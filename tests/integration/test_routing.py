"""Routing and resilience (issue 13) with real clients: subsets, a weighted canary split, a header
route, a route timeout, retries and outlier detection, from the TOML file; grpcio first, then the
same split and header route through Envoy (SotW and Delta).

Topology of the split tests: demo-servers v1 2/2/2 (i-a1, i-a2, i-b1, ...) and v2 1/1/1 (i-a3,
i-b3, i-c3) in zones a/b/c, told apart by the instance attribute `version`; one client per zone.
The failing and slow instances are slow_peers.py servers (a grpc.aio Describer) registered with
the same ECS attributes as demo-server.
"""

from __future__ import annotations

import time

import pytest

from envoy_harness import API_TYPES, EgressCaller, Envoy, envoy_binary
from harness import ZONES, SlowPeer, config_args, free_port, wait_until

ECHO = "echo.demo"
CANARY = {"i-a3", "i-b3", "i-c3"}

SPLIT_TOML = """
[services."echo.demo".subsets]
stable = { version = "v1" }
canary = { version = "v2" }

[[services."echo.demo".routes]]
match = { method = "demo.v1.Describer/Describe", headers = { "x-canary" = "always" } }
split = { canary = 100 }

[[services."echo.demo".routes]]
split = { stable = 90, canary = 10 }
"""


# The split of SPLIT_TOML with every other setting on the catch-all route and the clusters: a route
# timeout, retries with a per-try timeout, an idle timeout, outlier detection with consecutive-5xx.
# grpcio gets what it honours and must ACK it; Envoy gets all of it and must accept it.
FULL_TOML = SPLIT_TOML + """timeout = "10s"
idle_timeout = "5m"
retry = { on = ["unavailable", "internal"], max_attempts = 3, backoff = "25ms", per_try_timeout = "2s" }

[services."echo.demo".outlier_detection]
failure_percentage = { threshold = 50, minimum_hosts = 2, request_volume = 20 }
consecutive_5xx = 5
interval = "2s"
base_ejection_time = "30s"
max_ejection_percent = 50
"""


def versioned_servers(deploy) -> None:
    """v1 2/2/2 and v2 1/1/1, each registered with its `version` attribute."""
    deploy.cloudmap.setup()
    for z in ZONES:
        for n, version in ((1, "v1"), (2, "v1"), (3, "v2")):
            iid = f"i-{z[-1]}{n}"
            s = deploy.server(z, iid, register=False)
            attrs = deploy.cloudmap.ecs_attributes(s.host, s.port, z)
            attrs["version"] = version
            deploy.cloudmap.register_attrs(iid, attrs)


def wait_subsets_balanced(cp, subsets=("stable", "canary"), timeout: float = 15) -> float:
    """Wait until the applied census (/config_dump) of every subset counts the same number of
    clients in each zone (a census that grows evenly moves no share, so it is not re-applied:
    the counts themselves may lag); returns the time seen."""

    def census():
        svc = next((s for s in cp.config_dump()["services"] if s["name"] == ECHO), None)
        return svc and {name: sub["census"] for name, sub in svc["subsets"].items()}

    def balanced():
        c = census()
        return c and all(
            set(c.get(s, {})) == set(ZONES) and len(set(c[s].values())) == 1 for s in subsets
        )

    wait_until(balanced, timeout, f"balanced subset census (last {census()})")
    return time.time()


def canary_share(summaries) -> tuple[float, int]:
    ok = sum(s.ok for s in summaries)
    canary = sum(n for s in summaries for i, n in s.per_instance.items() if i in CANARY)
    return (canary / ok if ok else 0.0), ok


# ---------------------------------------------------------------------------------------------
# grpcio
# ---------------------------------------------------------------------------------------------


def test_grpc_split_90_10_stays_in_zone_and_header_route_goes_to_canary(deploy):
    versioned_servers(deploy)
    cp = deploy.control_plane(extra_args=config_args(deploy.tmp, FULL_TOML))
    clients = deploy.clients_in_zones()
    # One x-canary client per zone too, so every zone keeps the same demand (each client
    # subscribes to both subsets: its route configuration names them both).
    canary_clients = [
        deploy.client(z, node_id=f"client-canary-{z[-1]}", metadata={"x-canary": "always"}, interval=0.05) for z in ZONES
    ]
    for c in canary_clients:
        deploy.wait_first_success(c)
    applied = wait_subsets_balanced(cp)
    # The subsets' zone-aware plans reached every client: each settles on its own zone.
    start = max(c.wait_settled({c.zone}, streak=20, since=applied, timeout=15) for c in [*clients.values(), *canary_clients])
    time.sleep(8)
    summaries = [c.summary(c.calls(since=start)) for c in clients.values()]
    share, ok = canary_share(summaries)
    print(f"canary share {share:.3f} of {ok} calls; " + "; ".join(f"{c.zone}: {s}" for c, s in zip(clients.values(), summaries)))
    assert ok >= 900, f"too few calls to measure a 10 % split: {ok}"
    assert abs(share - 0.10) <= 0.03, f"split 90/10: {share:.1%} of {ok} calls on v2"
    for c, s in zip(clients.values(), summaries):
        assert s.failed == 0, f"{c.node_id}: {s}"
        assert s.own_zone_share >= 0.95, f"{c.node_id}: only {s.own_zone_share:.1%} in its zone: {s}"
        assert CANARY & set(s.per_instance) and set(s.per_instance) - CANARY, f"{c.node_id} missed a subset: {s}"
    # The header route: every call of the clients that send x-canary: always lands on v2, in zone.
    for c in canary_clients:
        s = c.summary(c.calls(since=start))
        assert s.ok >= 80 and s.failed == 0, f"{c.node_id}: {s}"
        assert set(s.per_instance) <= CANARY, f"{c.node_id}: x-canary: always reached v1: {s}"
        assert s.own_zone_share >= 0.95, f"{c.node_id}: header-routed calls left the zone: {s}"
    cp.assert_acked_no_nacks()


def test_grpc_split_changed_live_by_service_attribute(deploy):
    """`aws servicediscovery update-service-attributes --service-id … --attributes
    'cloudmap-xds.routes=[{"split":{"stable":50,"canary":50}}]'` moves the split within
    --refresh-interval (2 s here) + 2 s; a value that names an unknown subset changes nothing."""
    import json

    versioned_servers(deploy)
    cp = deploy.control_plane(extra_args=config_args(deploy.tmp, SPLIT_TOML))
    clients = deploy.clients_in_zones()
    applied = wait_subsets_balanced(cp)
    for c in clients.values():
        c.wait_settled({c.zone}, streak=20, since=applied, timeout=15)
    sd, service_id = deploy.cloudmap.sd, deploy.cloudmap.service_id
    t0 = time.time()
    sd.update_service_attributes(
        ServiceId=service_id, Attributes={"cloudmap-xds.routes": json.dumps([{"split": {"stable": 50, "canary": 50}}])}
    )
    time.sleep(2.0 + 2.0)  # the refresh interval + 2 s
    t1 = time.time()
    time.sleep(4)
    share, ok = canary_share([c.summary(c.calls(since=t1)) for c in clients.values()])
    print(f"50/50 from the service attribute, from {t1 - t0:.1f}s after the update: {share:.3f} of {ok} calls on v2")
    assert ok >= 450 and abs(share - 0.5) <= 0.07, f"50/50: {share:.1%} of {ok} calls on v2"

    # An invalid value (an unknown subset): nothing changes, one warning, /config_dump and a metric say why.
    sd.update_service_attributes(
        ServiceId=service_id, Attributes={"cloudmap-xds.routes": json.dumps([{"split": {"blue": 100}}])}
    )

    def refused():
        svc = next(s for s in cp.config_dump()["services"] if s["name"] == ECHO)
        return svc.get("routing_error")

    error = wait_until(refused, 6, "routing_error in /config_dump")
    assert "cloudmap-xds.routes" in error and '"blue"' in error, error
    invalid = cp.metric_values("cloudmap_xds_service_attributes_invalid")
    assert list(invalid.values()) == [1.0], invalid
    t2 = time.time()
    time.sleep(5)  # two more refreshes of the same bad value
    share, ok = canary_share([c.summary(c.calls(since=t2)) for c in clients.values()])
    print(f"after the invalid value: {share:.3f} of {ok} calls on v2")
    assert ok >= 450 and abs(share - 0.5) <= 0.07, f"the invalid value changed the split: {share:.1%}"
    warnings = cp.grep("invalid routing in Cloud Map service attributes").splitlines()
    assert len(warnings) == 1, f"one warning per change, got {len(warnings)}:\n" + "\n".join(warnings)
    for c in clients.values():
        assert c.summary(c.calls(since=t0)).failed == 0, c.summary(c.calls(since=t0))
    cp.assert_acked_no_nacks()


def test_grpc_route_timeout_ends_a_slow_call_by_1s(deploy):
    """grpcio 1.85 applies a service-config (here: xDS route) timeout early on this machine: a
    method-config timeout of 1 s ends calls after 0-0.2 s, 3 s after ~1.5 s, 10 s on time — also
    without xDS (a plain channel with `grpc.service_config` {"timeout": "1s"}), while a per-call
    deadline of 1 s ends at 1.00 s. So this asserts what the control plane controls: the
    route's timeout reaches the client and bounds the call (DEADLINE_EXCEEDED, never later
    than ≈ 1 s, no 3 s call completes); the lower bound is the client's business."""
    deploy.cloudmap.setup()
    SlowPeer(deploy, "us-east-1a", "i-slow-a1", "--delay", "3")
    toml = '[[services."echo.demo".routes]]\ntimeout = "1s"\n'
    cp = deploy.control_plane(extra_args=config_args(deploy.tmp, toml))
    c = deploy.client("us-east-1a", node_id="client-a", deadline=5.0, interval=0.2)

    def timeouts(c):
        timed_out = [x for x in c.calls(measured=False) if x.get("code") == "DEADLINE_EXCEEDED"]
        return timed_out[-5:] if len(timed_out) >= 5 else None

    calls = c.wait_for(timeouts, 30, "five DEADLINE_EXCEEDED calls")
    durations = [x["dur"] for x in calls]
    print(f"3 s calls under timeout = 1s (deadline 5 s) ended after {durations} s")
    assert all(d <= 1.5 for d in durations), f"the 1 s route timeout did not bound the calls: {durations}"
    assert not [x for x in c.calls(measured=False) if x.get("ok")], "a 3 s call outlived the 1 s route timeout"
    cp.assert_acked_no_nacks()


def failing_zone_a(deploy) -> None:
    """2/2/2 with i-a2 replaced by a server that answers UNAVAILABLE to every call."""
    deploy.cloudmap.setup()
    for z in ZONES:
        deploy.server(z, f"i-{z[-1]}1")
        if z != "us-east-1a":
            deploy.server(z, f"i-{z[-1]}2")
    SlowPeer(deploy, "us-east-1a", "i-bad-a2", "--delay", "0", "--fail-code", "UNAVAILABLE")


def test_grpc_retries_hide_an_instance_that_answers_unavailable(deploy):
    failing_zone_a(deploy)
    toml = '[[services."echo.demo".routes]]\nretry = { on = ["unavailable"], max_attempts = 3 }\n'
    cp = deploy.control_plane(extra_args=config_args(deploy.tmp, toml))
    clients = deploy.clients_in_zones()
    applied = cp.wait_census({z: 1 for z in ZONES})
    a = clients["us-east-1a"]
    # From when the client's zone-local plan arrived (before, some calls spill to other zones).
    since = a.wait_settled({"us-east-1a"}, streak=20, since=applied, timeout=15)
    calls = a.wait_calls(400, since=since, timeout=30)
    s = a.summary(calls)
    print(f"zone-a client, 400 calls with retries, half of zone a failing: {s}")
    assert s.failed <= 4, f"more than 1 % failed despite retries: {s}"
    assert set(s.per_instance) == {"i-a1"}, f"zone a's good instance should carry zone a: {s}"
    cp.assert_acked_no_nacks()


def test_grpc_outlier_detection_ejects_an_instance_that_answers_unavailable(deploy):
    failing_zone_a(deploy)
    toml = """
[services."echo.demo".outlier_detection]
failure_percentage = { threshold = 50, minimum_hosts = 2, request_volume = 10 }
interval = "1s"
base_ejection_time = "30s"
max_ejection_percent = 50
"""
    cp = deploy.control_plane(extra_args=config_args(deploy.tmp, toml))
    clients = deploy.clients_in_zones()
    applied = cp.wait_census({z: 1 for z in ZONES})
    a = clients["us-east-1a"]
    # From when the client is zone-local (half its calls meet the failing instance) until it is ejected.
    local = a.wait_for(
        lambda c: next((x["t"] for x in c.calls(since=applied, measured=False) if x.get("code") == "UNAVAILABLE"), None),
        15, "a call meeting the failing instance",
    )  # fmt: skip

    def ejected(c):
        calls = c.calls(since=local, measured=False)
        failures = [x["t"] for x in calls if not x.get("ok")]
        last = failures[-1] if failures else local
        clean = [x for x in calls if x["t"] > last]
        return last if len(clean) >= 150 else None

    last_failure = a.wait_for(ejected, 25, "150 clean calls after the last failure")
    s = a.summary(a.calls(since=last_failure + 0.001, measured=False))
    print(f"failing instance ejected {last_failure - local:.2f}s after the first failure; after: {s}")
    assert last_failure - local <= 10, f"ejected only after {last_failure - local:.1f}s"
    assert s.failed == 0 and set(s.per_instance) == {"i-a1"}, s
    cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# Envoy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api_type", [API_TYPES["sotw"], API_TYPES["delta"]], ids=["sotw", "delta"])
def test_envoy_split_and_header_route(deploy, api_type):
    envoy_binary()  # a missing Envoy fails here, before anything else starts
    versioned_servers(deploy)
    egress = free_port()
    cp = deploy.control_plane(extra_args=["--envoy-egress-port", str(egress), *config_args(deploy.tmp, FULL_TOML)])
    envoy = Envoy(cp.xds_port, "us-east-1a", api_type, deploy.tmp, deploy.procs)
    try:
        envoy.wait_egress_listener(egress)
        for cluster, hosts in ((ECHO, 9), (f"{ECHO}/stable", 6), (f"{ECHO}/canary", 3)):
            envoy.wait_cluster_hosts(cluster, hosts)
        # Envoy (zone a) and one grpcio client each in b and c: a balanced census in each subset.
        for z in ("us-east-1b", "us-east-1c"):
            deploy.wait_first_success(deploy.client(z, node_id=f"client-{z[-1]}"))
        applied = wait_subsets_balanced(cp)
        plain = EgressCaller(deploy.stubs, egress, ECHO, "us-east-1a", deploy.tmp, deploy.procs, name="envoy-plain", interval=0.01)
        header = EgressCaller(
            deploy.stubs, egress, ECHO, "us-east-1a", deploy.tmp, deploy.procs, name="envoy-canary",
            metadata={"x-canary": "always"},
        )  # fmt: skip
        start = max(c.wait_settled({"us-east-1a"}, streak=20, since=applied, timeout=15) for c in (plain, header))
        calls = plain.wait_calls(1000, since=start, timeout=40)
        s = plain.summary(calls)
        share, ok = canary_share([s])
        print(f"[{api_type}] Envoy egress: canary share {share:.3f} of {ok}; {s}")
        assert s.failed == 0, s
        assert abs(share - 0.10) <= 0.03, f"[{api_type}] split 90/10 through Envoy: {share:.1%} on v2"
        assert s.own_zone_share >= 0.95, s
        h = header.summary(header.calls(since=start))
        assert h.ok >= 100 and h.failed == 0 and set(h.per_instance) <= CANARY, f"[{api_type}] header route: {h}"
        rejected = envoy.rejected()
        assert rejected and not {k: v for k, v in rejected.items() if v}, f"Envoy rejected updates: {rejected}"
        # What Envoy holds: the catch-all route's retries and timeouts, the clusters' outlier detection.
        dump = envoy.config_dump(include_eds=False)
        routes = envoy.dynamic_routes(dump)["cloudmap-xds-egress"]["route_config"]["virtual_hosts"][0]["routes"]
        action = routes[1]["route"]
        assert action["timeout"] == "10s" and action["idle_timeout"] == "300s", action
        assert action["retry_policy"]["per_try_timeout"] == "2s" and action["retry_policy"]["num_retries"] == 2, action
        for name in (f"{ECHO}/stable", f"{ECHO}/canary"):
            od = envoy.dynamic_clusters(dump)[name]["cluster"]["outlier_detection"]
            assert od["consecutive_5xx"] == 5 and od["failure_percentage_threshold"] == 50, od
        assert sum(cp.metric_values("cloudmap_xds_nacks_total").values()) == 0
    finally:
        envoy.save_admin()
