"""Zone policies end to end (issue: zone-aware; algorithm in the README "How it works" and in
the zone-aware design note): servers 2/2/2 in us-east-1a/b/c, grpcio xDS clients, the control
plane computing per-zone shares from the census of connected clients.

The balanced case with the default policy (1/1/1 clients, every client >= 95 % in its own zone)
is test_core.py::test_each_client_is_served_in_its_own_zone and is not repeated here.

Every measurement starts after convergence: the census (or, for policies that do not use it, the
list of connected clients) in /config_dump shows the expected counts and every stream has ACKed
its newest EDS; then each client makes a short streak of calls before its calls are counted.
The xds_client.py processes all call at the same rate (every 20 ms), so calls counted over one
common time window compare server loads.
"""

from __future__ import annotations

import collections
import time

from harness import ZONES, XdsClient, config_args, share, wait_until, window_calls

A, B, C = ZONES
SERVICE = "echo.demo"
REFRESH = 2.0  # --refresh-interval of the harness's control plane
STREAK = 10  # calls each client makes after convergence before its calls are counted


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def start(deploy, census: dict[str, int], config: str | None = None) -> dict[str, list[XdsClient]]:
    """Servers 2/2/2 (i-a1, i-a2, i-b1, ...), the control plane (with a TOML config if given),
    census[zone] clients per zone (client-a1, client-a2, ..., client-b1, ...), each past its
    first successful call. Returns {zone: [clients]}."""
    deploy.cloudmap.setup()
    for z in ZONES:
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")
    deploy.control_plane(extra_args=config_args(deploy.tmp, config) if config else ())
    clients = {z: [deploy.client(z, node_id=f"client-{z[-1]}{i + 1}") for i in range(n)] for z, n in census.items()}
    for cs in clients.values():
        for c in cs:
            deploy.wait_first_success(c)
    return clients


def service_dump(cp, service: str = SERVICE) -> dict:
    return next(s for s in cp.config_dump()["services"] if s["name"] == service)


def converge(deploy, clients: dict[str, list[XdsClient]], census: dict[str, int], uses_census: bool = True, timeout: float = 15) -> float:
    """Wait until the control plane's plans use `census` (zone-aware: the applied census in
    /config_dump; other policies do not use it, so the streams listed there) and every stream
    ACKed its newest EDS; then until every client made STREAK more calls (clients expected to
    stay in their zone: STREAK consecutive calls there). Returns the start of the measurement."""
    cp = deploy.cp
    if uses_census:
        cp.wait_census(census, timeout=timeout)
    wait_until(lambda: cp.streams_synced(census), timeout, f"every client of {census} ACKed its newest EDS")
    synced = time.time()
    starts = [c.wait_calls(STREAK, since=synced)[-1]["t"] for cs in clients.values() for c in cs]
    return max(starts) + 1e-6


def all_clients(clients: dict[str, list[XdsClient]]) -> list[XdsClient]:
    return [c for cs in clients.values() for c in cs]


# ---------------------------------------------------------------------------------------------
# skewed census, zone-aware
# ---------------------------------------------------------------------------------------------


def test_skewed_census_spills_zone_a_and_evens_server_load(deploy):
    census = {A: 4, B: 1, C: 1}
    clients = start(deploy, census)
    assert service_dump(deploy.cp)["policy"] == {"policy": "zone-aware"}
    t0 = converge(deploy, clients, census)
    W = 5.0
    calls = window_calls(all_clients(clients), t0, t0 + W)

    failed = {n: sum(1 for c in cs if not c.get("ok")) for n, cs in calls.items()}
    assert sum(failed.values()) == 0, f"failed calls in the window: {failed}"

    a_calls = [x for c in clients[A] for x in calls[c.node_id]]
    per_zone_a = collections.Counter(x["zone"] for x in a_calls)
    a_local, a_to_b, a_to_c = (per_zone_a[z] / len(a_calls) for z in (A, B, C))
    per_a_client = {c.node_id: round(share(calls[c.node_id], {A}), 3) for c in clients[A]}
    print(f"\nskewed 4/1/1: zone-a calls {len(a_calls)}: local {a_local:.3f}, to b {a_to_b:.3f}, to c {a_to_c:.3f}; per client {per_a_client}")
    problems = []
    if abs(a_local - 0.5) > 0.07:
        problems.append(f"zone-a clients kept {a_local:.1%} local, want 50 % ± 7 points")
    for z, s in ((B, a_to_b), (C, a_to_c)):
        if abs(s - 0.25) > 0.07:
            problems.append(f"zone-a clients sent {s:.1%} to {z}, want 25 % ± 7 points")
    for z in (B, C):
        c = clients[z][0]
        s = share(calls[c.node_id], {z})
        print(f"  {c.node_id}: local {s:.3f} of {len(calls[c.node_id])}")
        if s < 0.95:
            problems.append(f"{c.node_id} kept only {s:.1%} in {z}, want >= 95 %: {c.summary(calls[c.node_id])}")

    per_server = collections.Counter(x["instance"] for cs in calls.values() for x in cs if x.get("ok"))
    servers = sorted(deploy.servers)
    mean = sum(per_server.values()) / len(servers)
    ratio = {i: round(per_server[i] / mean, 3) for i in servers}
    print(f"  server load / mean over {sum(per_server.values())} calls: {ratio}")
    off = {i: r for i, r in ratio.items() if abs(r - 1) > 0.20}
    if off:
        problems.append(f"server loads outside mean ± 20 %: {off} (calls {dict(per_server)})")
    assert not problems, "\n".join(problems)
    deploy.cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# fixed-share 0.5 from the TOML config
# ---------------------------------------------------------------------------------------------


FIXED_SHARE = """
[default]
policy = "fixed-share"
local_share = 0.5
"""


def test_fixed_share_keeps_half_local(deploy):
    census = {A: 1, B: 1, C: 1}
    clients = start(deploy, census, config=FIXED_SHARE)
    assert service_dump(deploy.cp)["policy"] == {"policy": "fixed-share", "local_share": 0.5}
    t0 = converge(deploy, clients, census, uses_census=False)
    # Each call picks a locality at random: over 500 calls one standard deviation of the local
    # share is 2.2 points, so ± 7 points is > 3 standard deviations.
    calls = window_calls(all_clients(clients), t0, t0 + 10.0)
    problems = []
    print()
    for z in ZONES:
        c = clients[z][0]
        s = c.summary(calls[c.node_id])
        print(f"fixed-share 0.5: {c.node_id}: local {s.own_zone_share:.3f} of {s.ok} ok, {s.failed} failed, per zone {dict(s.per_zone)}")
        if s.failed:
            problems.append(f"{c.node_id}: failed calls: {s}")
        if abs(s.own_zone_share - 0.5) > 0.07:
            problems.append(f"{c.node_id}: {s.own_zone_share:.1%} local, want 50 % ± 7 points: {s}")
    assert not problems, "\n".join(problems)
    deploy.cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# a zone dies
# ---------------------------------------------------------------------------------------------


def test_zone_outage_fails_over_without_failed_calls(deploy):
    census = {A: 1, B: 1, C: 1}
    clients = start(deploy, census)
    deploy.cp.wait_census(census)
    for z in ZONES:
        clients[z][0].wait_settled({z}, since=time.time())
    ca = clients[A][0]
    zone_a = ["i-a1", "i-a2"]

    t0 = time.time()  # just before the kill
    for i in zone_a:
        deploy.servers[i].stop()
    t_killed = time.time()
    for i in zone_a:
        deploy.cloudmap.set_health(i, "UNHEALTHY")
    t_health = time.time()
    # The control plane sees health changes on its next full read (--refresh-interval).
    wait_until(
        lambda: service_dump(deploy.cp)["capacity"].get(A, 0) == 0,
        REFRESH + 3.0,
        "zone a's capacity 0 in /config_dump after its instances were marked UNHEALTHY",
    )
    t_seen = time.time()
    settled = ca.wait_settled({B, C}, since=t_seen, timeout=5)
    t_end = max(settled, t_health + 5.0) + 2.0
    calls = window_calls(all_clients(clients), t0, t_end)

    total = sum(len(cs) for cs in calls.values())
    failed = {n: [f"{x['t'] - t0:.3f}s {x.get('code')}: {x.get('error')}" for x in cs if not x.get("ok")] for n, cs in calls.items()}
    n_failed = sum(len(f) for f in failed.values())
    a_calls = calls[ca.node_id]
    first_remote = next((x["t"] - t0 for x in a_calls if x.get("ok") and x.get("zone") != A), None)
    last_local = max((x["t"] - t0 for x in a_calls if x.get("ok") and x.get("zone") == A), default=None)
    tail = [x for x in a_calls if x["t"] >= settled]
    tail_zones = collections.Counter(x.get("zone") for x in tail if x.get("ok"))
    print(
        f"\nzone outage: window {t_end - t0:.1f}s, {total} calls, {n_failed} failed ({n_failed / total:.2%}); "
        f"zone-a client: {len(a_calls)} calls, {len(failed[ca.node_id])} failed, last zone-a call {last_local}s, "
        f"first b/c call {first_remote}s after the kill (kill took {t_killed - t0:.2f}s, health set at "
        f"{t_health - t0:.2f}s, seen at {t_seen - t0:.2f}s); after settling {dict(tail_zones)}; failures {failed}"
    )
    assert n_failed / total < 0.01, f"{n_failed} of {total} calls failed (>= 1 %): {failed}"
    assert len(tail) >= 50, f"too few zone-a client calls after it settled: {ca.summary(tail)}"
    assert set(tail_zones) == {B, C} and sum(tail_zones.values()) == len(tail), (
        f"zone-a client not served by both other zones after the outage: {ca.summary(tail)}"
    )
    for z in (B, C):
        c = clients[z][0]
        s = c.summary([x for x in calls[c.node_id] if x["t"] >= settled])
        assert s.own_zone_share >= 0.95, f"{c.node_id} left its zone during zone a's outage: {s}"
    deploy.cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# the census changes
# ---------------------------------------------------------------------------------------------


def test_shares_follow_census_changes(deploy):
    census = {A: 1, B: 1, C: 1}
    clients = start(deploy, census)
    t0 = converge(deploy, clients, census)
    ca = clients[A][0]
    before = window_calls([ca], t0, t0 + 2.0)[ca.node_id]
    s_before = share(before, {A})
    assert s_before >= 0.95, f"balanced census: zone-a client not local: {ca.summary(before)}"

    # Three more zone-a clients: 4/1/1, zone a keeps 50 %.
    extra = [deploy.client(A, node_id=f"client-a{i}") for i in (2, 3, 4)]
    for c in extra:
        deploy.wait_first_success(c)
    t_last = max(c.first_ok_t for c in extra)
    skewed = {A: 4, B: 1, C: 1}
    deploy.cp.wait_census(skewed, timeout=max(0.1, t_last + 2.0 - time.time()))
    t_applied = time.time()
    W = 6.0  # 300 calls: one standard deviation of the local share is 2.9 points
    during = window_calls([ca], t_last + 2.0, t_last + 2.0 + W)[ca.node_id]
    s_during = share(during, {A})
    # when the zone-a client's calls first left zone a
    first_off = next((x["t"] - t_last for x in ca.calls(since=t_last - 1.0) if x.get("ok") and x.get("zone") != A), None)

    # The three leave again: 1/1/1, zone a back to all local.
    for c in extra:
        c.stop()
    t_stop = time.time()
    deploy.cp.wait_census(census, timeout=max(0.1, t_stop + 2.0 - time.time()))
    t_back = time.time()
    after = window_calls([ca], t_stop + 2.0, t_stop + 2.0 + 3.0)[ca.node_id]
    s_after = share(after, {A})
    last_off = max((x["t"] - t_stop for x in ca.calls(since=t_stop) if x.get("ok") and x.get("zone") != A), default=None)
    print(
        f"\ncensus changes: before {s_before:.3f} local ({len(before)} calls); 4/1/1 applied "
        f"{t_applied - t_last:.2f}s after the last new client's first success (first off-zone call at "
        f"{first_off}s), then {s_during:.3f} local over {len(during)} calls; after the three left, census "
        f"1/1/1 seen {t_back - t_stop:.2f}s after, last off-zone call {last_off}s after, then {s_after:.3f} "
        f"local over {len(after)} calls"
    )
    assert abs(s_during - 0.5) <= 0.10, f"4/1/1: zone-a client {s_during:.1%} local, want 50 % ± 10: {ca.summary(during)}"
    assert s_after >= 0.95, f"back to 1/1/1: zone-a client only {s_after:.1%} local: {ca.summary(after)}"
    for cs in (before, during, after):
        assert all(x.get("ok") for x in cs), f"failed calls: {ca.summary(cs)}"
    deploy.cp.assert_acked_no_nacks()
