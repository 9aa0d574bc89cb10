"""Replicas that agree (issue 14): two cloudmap-xds replicas share their census (--peers, or
--peer-service in Cloud Map), so zone shares come from every client whichever replica it reached;
a dead peer drops out after the peer timeout; --max-connection-age spreads clients over the
replicas that exist now.

Beds: servers 2/2/2 in us-east-1a/b/c (moto), two control planes on their own ports, grpcio
xDS clients bootstrapped to one replica each (or to a TCP proxy in front of both). Short
intervals by flag: census debounce 200 ms, peer timeout 3 s (heartbeats every 750 ms).
"""

from __future__ import annotations

import collections
import random
import time

from harness import ZONES, ControlPlane, XdsClient, free_port, share, wait_until, window_calls
from tcp_proxy import TcpProxy

A, B, C = ZONES
SERVICE = "echo.demo"
PEER_TIMEOUT = 3.0
STREAK = 10
FAST = ["--census-debounce", "200ms", "--peer-timeout", f"{PEER_TIMEOUT}s", "--peer-discovery-interval", "500ms"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def servers(deploy) -> None:
    deploy.cloudmap.setup()
    for z in ZONES:
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")


def replica(deploy, name: str, xds_port: int, extra: list[str]) -> ControlPlane:
    exe = deploy._request.getfixturevalue("cloudmap_xds_bin")
    cp = ControlPlane(exe, "demo", deploy.proxy.url, deploy.tmp, deploy.procs, name=name, xds_port=xds_port, extra_args=[*FAST, *extra])
    cp.wait_healthz()
    cp.wait_ready()
    return cp


def client(deploy, port: int, zone: str, node_id: str) -> XdsClient:
    c = XdsClient(deploy.stubs, port, zone, node_id, deploy.tmp, deploy.procs)
    deploy.clients[node_id] = c
    return c


def peering(cp: ControlPlane) -> dict:
    return cp.config_dump()["peering"]


def local_clients(cp: ControlPlane) -> collections.Counter:
    """Zones of the clients subscribed to SERVICE's endpoints on this replica."""
    eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    zones = collections.Counter()
    for cl in cp.config_dump()["clients"]:
        if any(t["type_url"] == eds and SERVICE in t["subscribed"] for t in cl["types"]):
            zones[cl["zone"]] += 1
    return zones


def failed_calls(clients, since: float) -> dict[str, int]:
    return {c.node_id: sum(1 for x in c.calls(since=since) if not x.get("ok")) for c in clients}


def converge(replicas_and_local: list[tuple[ControlPlane, dict[str, int]]], summed: dict[str, int], clients, timeout: float = 15) -> float:
    """Every replica's plans use the summed census and every stream ACKed its newest EDS; then
    every client made STREAK more calls. Returns the start of the measurement."""
    for cp, local in replicas_and_local:
        cp.wait_census(summed, timeout=timeout)
        wait_until(lambda cp=cp, local=local: cp.streams_synced(local), timeout, f"{cp.proc.name}: streams {local} ACKed")
    synced = time.time()
    starts = [c.wait_calls(STREAK, since=synced)[-1]["t"] for c in clients]
    return max(starts) + 1e-6


def kill_and_time_fallback(deploy, survivor: ControlPlane, dead: ControlPlane, own: dict[str, int]) -> float:
    """SIGKILL `dead` (no goodbye to its peers); wait until `survivor`'s plans use only its own
    census. Returns the seconds from the kill to the fallback."""
    t_kill = time.time()
    dead.proc.popen.kill()
    dead.proc.popen.wait(timeout=5)
    dead.proc.stopped_by_us = True
    survivor.wait_census(own, timeout=PEER_TIMEOUT + 3.0)
    return time.time() - t_kill


# ---------------------------------------------------------------------------------------------
# (a) + (b): --peers
# ---------------------------------------------------------------------------------------------


def test_two_replicas_plan_from_the_summed_census_and_fall_back_when_a_peer_dies(deploy):
    """(a) zone a's four clients on replica 1, b's and c's on replica 2: both replicas plan from
    4/1/1, so zone-a clients keep 50 % ± 7 local and every server is within ± 20 % of the mean
    (the single-replica skew test's figures). (b) replica 2 killed: replica 1 falls back to its
    own census within the peer timeout; no client sees a failed call."""
    servers(deploy)
    p1, p2 = free_port(), free_port()
    r1 = replica(deploy, "replica-1", p1, ["--peers", f"127.0.0.1:{p2}"])
    r2 = replica(deploy, "replica-2", p2, ["--peers", f"127.0.0.1:{p1}"])
    a = [client(deploy, p1, A, f"client-a{i}") for i in range(1, 5)]
    b, c = client(deploy, p2, B, "client-b1"), client(deploy, p2, C, "client-c1")
    everyone = [*a, b, c]
    for x in everyone:
        deploy.wait_first_success(x)

    summed = {A: 4, B: 1, C: 1}
    t0 = converge([(r1, {A: 4}), (r2, {B: 1, C: 1})], summed, everyone)
    dump = peering(r1)
    peer = next(p for p in dump["peers"] if p["address"] == f"127.0.0.1:{p2}")
    assert peer["in_census"] and peer["census"].get(SERVICE) == {B: 1, C: 1}, dump
    assert peer["replica"] == peering(r2)["replica"] and not peer["self"], dump

    W = 5.0
    calls = window_calls(everyone, t0, t0 + W)
    failed = {n: sum(1 for x in cs if not x.get("ok")) for n, cs in calls.items()}
    assert sum(failed.values()) == 0, f"failed calls in the window: {failed}"
    a_calls = [x for cl in a for x in calls[cl.node_id]]
    a_local = share(a_calls, {A})
    per_server = collections.Counter(x["instance"] for cs in calls.values() for x in cs if x.get("ok"))
    mean = sum(per_server.values()) / len(deploy.servers)
    ratio = {i: round(per_server[i] / mean, 3) for i in sorted(deploy.servers)}
    print(f"\ntwo replicas, 4/1/1 split 4 | 1+1: zone-a local {a_local:.3f} of {len(a_calls)}; server load / mean {ratio}")
    problems = []
    if abs(a_local - 0.5) > 0.07:
        problems.append(f"zone-a clients kept {a_local:.1%} local, want 50 % ± 7 points")
    for cl, z in ((b, B), (c, C)):
        s = share(calls[cl.node_id], {z})
        if s < 0.95:
            problems.append(f"{cl.node_id} kept only {s:.1%} in {z}, want >= 95 %")
    off = {i: r for i, r in ratio.items() if abs(r - 1) > 0.20}
    if off:
        problems.append(f"server loads outside mean ± 20 %: {off} (calls {dict(per_server)})")
    assert not problems, "\n".join(problems)

    # (b) replica 2 dies without a word: its clients keep their last configuration and go on
    # calling the servers; replica 1 drops its census after the peer timeout.
    t_kill = time.time()
    took = kill_and_time_fallback(deploy, r1, r2, {A: 4})
    print(f"  replica 2 killed: replica 1 planned from its own census after {took:.2f} s (peer timeout {PEER_TIMEOUT} s)")
    assert took <= PEER_TIMEOUT + 2.5, f"fallback took {took:.2f} s"
    # Alone with zone a's four clients, replica 1 spills two thirds of them (the plan the issue
    # calls wrong while replica 2 lives, and right once its clients are gone from the sum).
    t1 = converge([(r1, {A: 4})], {A: 4}, a)
    after = window_calls(a, t1, t1 + 3.0)
    a_alone = share([x for cs in after.values() for x in cs], {A})
    print(f"  zone-a local on replica 1's own census: {a_alone:.3f}")
    assert abs(a_alone - 1 / 3) <= 0.08, f"zone-a local {a_alone:.1%} on the own census, want 33 % ± 8 points"
    assert sum(failed_calls(everyone, t_kill).values()) == 0, failed_calls(everyone, t_kill)
    dump = peering(r1)
    peer = next(p for p in dump["peers"] if p["address"] == f"127.0.0.1:{p2}")
    assert not peer["in_census"] and peer["errors"] >= 1, dump
    assert sum(r1.metric_values("cloudmap_xds_peers").values()) == 0, r1.metric_values("cloudmap_xds_peers")
    assert sum(r1.metric_values("cloudmap_xds_peer_errors_total").values()) >= 1
    r1.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# (c): --peer-service
# ---------------------------------------------------------------------------------------------


def test_replicas_find_each_other_in_cloud_map_and_skip_themselves(deploy):
    """Both replicas are instances of the control plane's own Cloud Map service (registered as
    ECS would); each dials both, recognises itself, sums the other's census; the killed one
    drops out within the peer timeout and no call fails."""
    servers(deploy)
    sd = deploy.cloudmap.sd
    own = sd.create_service(Name="cloudmap-xds", NamespaceId=deploy.cloudmap.namespace_id, HealthCheckCustomConfig={})["Service"]
    p1, p2 = free_port(), free_port()
    for i, port in ((1, p1), (2, p2)):
        op = sd.register_instance(
            ServiceId=own["Id"],
            InstanceId=f"cp-{i}",
            Attributes=deploy.cloudmap.ecs_attributes("127.0.0.1", port, A, service="cloudmap-xds"),
        )
        deploy.cloudmap.wait_operation(op["OperationId"])
    flags = ["--peer-service", "cloudmap-xds.demo"]
    r1 = replica(deploy, "replica-1", p1, flags)
    r2 = replica(deploy, "replica-2", p2, flags)
    a = [client(deploy, p1, A, f"client-a{i}") for i in (1, 2)]
    b = client(deploy, p2, B, "client-b1")
    everyone = [*a, b]
    for x in everyone:
        deploy.wait_first_success(x)

    summed = {A: 2, B: 1}
    converge([(r1, {A: 2}), (r2, {B: 1})], summed, everyone)
    for cp, me, other in ((r1, p1, p2), (r2, p2, p1)):
        dump = peering(cp)
        by_address = {p["address"]: p for p in dump["peers"]}
        assert by_address[f"127.0.0.1:{me}"]["self"] and not by_address[f"127.0.0.1:{me}"]["in_census"], dump
        assert by_address[f"127.0.0.1:{other}"]["in_census"] and not by_address[f"127.0.0.1:{other}"]["self"], dump

    t_kill = time.time()
    took = kill_and_time_fallback(deploy, r1, r2, {A: 2})
    print(f"\n--peer-service: replica 2 killed, replica 1 on its own census after {took:.2f} s")
    assert took <= PEER_TIMEOUT + 2.5, f"fallback took {took:.2f} s"
    time.sleep(0.5)  # calls keep coming every 20 ms; count up to now
    assert sum(failed_calls(everyone, t_kill).values()) == 0, failed_calls(everyone, t_kill)


# ---------------------------------------------------------------------------------------------
# (d): --max-connection-age
# ---------------------------------------------------------------------------------------------


def test_max_connection_age_spreads_clients_over_a_new_replica(deploy):
    """Six clients reach the replicas through a TCP proxy that sends each new connection to a
    random live replica (Cloud Map DNS with several records). Replica 1 alone at first: all six
    on it. Replica 2 started: with --max-connection-age 5s (grace 1 s) both replicas hold clients
    within 10 s, and no call failed. The proxy's choices come from a seeded generator, so a run
    is repeatable (an unseeded one would pick replica 1 for all six about once in 64)."""
    servers(deploy)
    p1, p2 = free_port(), free_port()
    rng = random.Random(14)
    live = [("127.0.0.1", p1), ("127.0.0.1", p2)]
    front = TcpProxy("127.0.0.1", p1, pick=lambda: rng.sample(live, len(live)))
    front.start()
    try:
        age = ["--max-connection-age", "5s", "--max-connection-age-grace", "1s"]
        r1 = replica(deploy, "replica-1", p1, ["--peers", f"127.0.0.1:{p2}", *age])
        clients = [client(deploy, front.port, ZONES[i % 3], f"client-{i}") for i in range(6)]
        t_start = time.time()
        for x in clients:
            deploy.wait_first_success(x)
        wait_until(lambda: sum(local_clients(r1).values()) == 6, 10, "all six clients on replica 1")
        r2 = replica(deploy, "replica-2", p2, ["--peers", f"127.0.0.1:{p1}", *age])
        t2 = time.time()

        def spread():
            n1, n2 = sum(local_clients(r1).values()), sum(local_clients(r2).values())
            return (n1, n2) if n1 >= 1 and n2 >= 1 else None

        n1, n2 = wait_until(spread, 10, "both replicas hold clients")
        took = time.time() - t2
        print(f"\nmax connection age 5 s: replica 2 holds {n2} clients, replica 1 {n1}, {took:.2f} s after it started")
        # Every client keeps calling through its reconnects; each is back on some replica.
        wait_until(lambda: sum(local_clients(r1).values()) + sum(local_clients(r2).values()) == 6, 10, "six clients subscribed")
        time.sleep(0.5)
        assert sum(failed_calls(clients, t_start).values()) == 0, failed_calls(clients, t_start)
        r1.assert_acked_no_nacks()
        r2.assert_acked_no_nacks()
    finally:
        front.close()
