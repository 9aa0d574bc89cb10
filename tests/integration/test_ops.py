"""Operations tests (ops issue, section 5, and the /metrics parse check): Cloud Map outages and
throttling, control-plane restarts, misbehaving clients (NACK everything, never read), the
admin surfaces (/metrics with a Prometheus parser, CSDS) and the stream limits.

Peers as in test_core.py: moto behind the stoppable TCP proxy (or, for throttling, behind
fault_proxy.FaultProxy), demo-server processes, grpcio xDS clients; raw ADS/CSDS clients from
ads_raw.py (envoy protos from xds-protos).

Control-plane timing in these tests (harness.ControlPlane): --revision-interval 500ms,
--refresh-interval 2s, --max-backoff 10s (the default).

Every test prints its measured numbers as `OPS <test>: ...` lines (see them with -rA or -s).
"""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ads_raw import (
    CDS,
    EDS,
    LDS,
    RDS,
    SHORT,
    TYPE_URLS,
    AdsStream,
    StalledH2Connection,
    fetch_client_status,
    node,
    request,
)
from fault_proxy import FaultProxy
from harness import ZONES, ControlPlane, config_args, large_anonymous_mappings, sleep_until, vm_rss_kib, wait_until

A, B, C = ZONES
SERVICE = "echo.demo"
REVISION = 0.5  # --revision-interval
REFRESH = 2.0  # --refresh-interval
MAX_BACKOFF = 10.0  # --max-backoff (default)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def report(test: str, **numbers) -> None:
    print(f"OPS {test}: " + " ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)


def assert_no_failures(clients, since: float | None = None, until: float | None = None) -> None:
    bad = {}
    for name, c in clients.items():
        s = c.summary(c.calls(since=since, until=until))
        if s.failed:
            bad[name] = str(s)
    assert not bad, f"failed calls: {bad}"


def first_call_to(client, instance: str, since: float):
    for x in client.calls(since=since):
        if x.get("ok") and x.get("instance") == instance:
            return x["t"]
    return None


def endpoint_set(cp, service: str = SERVICE) -> frozenset:
    for svc in cp.config_dump()["services"]:
        if svc["name"] == service:
            return frozenset((e["instance_id"], e["address"], e["health"]) for e in svc["endpoints"])
    return frozenset()


def eds_versions(cp) -> dict[str, str | None]:
    """{node_id: last EDS version sent} of the connected clients."""
    out = {}
    for cl in cp.config_dump()["clients"]:
        eds = next((t for t in cl["types"] if t["type_url"] == EDS), None)
        out[cl["node_id"]] = eds["last_sent"] if eds else None
    return out


def metric_sum(cp, name: str, **labels) -> float:
    return sum(v for n, l, v in cp.metrics() if n == name and all(l.get(k) == x for k, x in labels.items()))


def standard_settled(deploy):
    """The standard topology, and the census 1/1/1 applied with every client's EDS ACKed."""
    clients = deploy.standard()
    deploy.cp.wait_census({z: 1 for z in ZONES})
    wait_until(lambda: deploy.cp.streams_synced({z: 1 for z in ZONES}), 10, "every client ACKed its newest EDS")
    return clients


# ---------------------------------------------------------------------------------------------
# 1. Cloud Map endpoint down for 60 s
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_ops_cloud_map_down_60s_keeps_endpoints_and_recovers(deploy):
    clients = standard_settled(deploy)
    cp = deploy.cp
    ca = clients[A]
    before = endpoint_set(cp)
    versions_before = eds_versions(cp)
    assert len(before) == 6, f"want the 6 standard instances in /config_dump, got {sorted(before)}"
    errors_before = metric_sum(cp, "cloudmap_xds_cloudmap_errors_total")

    t0 = time.time()
    deploy.proxy.stop()
    changed, healthz_bad, samples = [], [], 0
    while time.time() < t0 + 60.0:
        if cp.get("/healthz")[0] != 200:
            healthz_bad.append(round(time.time() - t0, 1))
        now = endpoint_set(cp)
        samples += 1
        if now != before:
            changed.append((round(time.time() - t0, 1), sorted(before - now), sorted(now - before)))
        time.sleep(2.0)  # sampling /config_dump while the 60 s outage passes
    t1 = time.time()
    versions_after = eds_versions(cp)
    errors_during = metric_sum(cp, "cloudmap_xds_cloudmap_errors_total") - errors_before

    assert not healthz_bad, f"/healthz not 200 during the outage at t={healthz_bad}"
    assert not changed, f"/config_dump endpoints changed during the outage (t, removed, added): {changed}"
    assert versions_after == versions_before, (
        f"EDS versions sent to the clients changed during the outage: {versions_before} -> {versions_after}"
    )
    assert errors_during > 0, "no Cloud Map error was counted: was the outage real?"
    summaries = {}
    for zone, c in clients.items():
        s = c.summary(c.calls(since=t0, until=t1))
        summaries[zone] = s
        assert s.total >= 600, f"{zone}: client made too few calls during the outage: {s}"
        assert s.failed == 0, f"{zone}: calls failed while Cloud Map was down: {s}"
    # The zone-a client's own-zone instances keep receiving calls in every 10 s of the outage.
    for k in range(6):
        w = ca.summary(ca.calls(since=t0 + 10 * k, until=t0 + 10 * (k + 1)))
        assert {"i-a1", "i-a2"} <= set(w.per_instance), f"zone-a instances not both used in outage second {10 * k}-{10 * (k + 1)}: {w}"

    # Recovery: a newly registered instance gets traffic within one refresh interval + max backoff.
    deploy.proxy.start()
    t2 = time.time()
    new = deploy.server(A, "i-a3", register=False)
    deploy.cloudmap.register("i-a3", new.host, new.port, A)
    t_reg = time.time()
    budget = REFRESH + MAX_BACKOFF
    t_first = ca.wait_for(
        lambda c: first_call_to(c, "i-a3", t2),
        t2 + budget - time.time(),
        f"traffic to i-a3 within {budget:.0f}s after Cloud Map came back",
    )
    assert_no_failures(deploy.clients)
    cp.assert_acked_no_nacks()
    report(
        "outage",
        outage_s=round(t1 - t0, 1),
        config_dump_samples=samples,
        cloudmap_errors_during=int(errors_during),
        calls={z: (s.total, s.failed) for z, s in summaries.items()},
        own_zone_share={z: round(s.own_zone_share, 3) for z, s in summaries.items()},
        recovery_first_call_after_proxy_start_s=round(t_first - t2, 2),
        after_register_s=round(t_first - t_reg, 2),
    )


@pytest.mark.timeout(180)
def test_ops_ready_reports_stale_without_cloud_map_sync(deploy):
    """`--ready-staleness 20s`: /ready answers 503 once no Cloud Map sync of any service
    succeeded for 20 s, and 200 again after recovery. xDS keeps serving the last good state
    meanwhile (0 failed calls). (Written before the flag existed; it failed at start-up then.)"""
    staleness = 20.0
    deploy.cloudmap.setup()
    for z in (A, B):
        deploy.server(z, f"i-{z[-1]}1")
    cp = deploy.control_plane(extra_args=["--ready-staleness", "20s"])
    c = deploy.client(A, node_id="client-a")
    deploy.wait_first_success(c)
    assert cp.get("/ready")[0] == 200

    t0 = time.time()
    deploy.proxy.stop()
    samples = []  # (seconds since the outage began, /ready status)
    while time.time() < t0 + staleness + 10.0:
        samples.append((round(time.time() - t0, 1), cp.get("/ready")[0]))
        time.sleep(0.5)  # sampling /ready while the outage passes
    # The last successful sync was at most one refresh interval before the outage began.
    early = [(t, s) for t, s in samples if t < staleness - REFRESH - 0.5]
    late = [(t, s) for t, s in samples if t >= staleness + 2.0]
    first_503 = next((t for t, s in samples if s == 503), None)
    assert all(s == 200 for _, s in early), f"/ready not 200 before the staleness bound: {samples}"
    assert late and all(s == 503 for _, s in late), f"/ready not 503 {staleness + 2:.0f}s into the outage: {samples}"
    assert all(s == 503 for t, s in samples if first_503 is not None and t >= first_503), f"/ready flapped: {samples}"

    deploy.proxy.start()
    t2 = time.time()
    budget = REFRESH + MAX_BACKOFF + 1.0
    wait_until(lambda: cp.get("/ready")[0] == 200, budget, f"/ready == 200 within {budget:.0f}s of Cloud Map returning")
    t3 = time.time()
    assert cp.get("/healthz")[0] == 200
    assert_no_failures(deploy.clients)
    report("ready_staleness", first_503_s=first_503, ready_again_after_s=round(t3 - t2, 2))


# ---------------------------------------------------------------------------------------------
# 2. Throttling
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_ops_throttled_cloud_map_converges_with_bounded_call_rate(deploy, fresh_moto, cloudmap_xds_bin):
    """Half of the Cloud Map calls (every other, deterministic) answered RequestLimitExceeded.

    The bound: over the same 30 s, the throttled run makes at most 2x the calls of the
    unthrottled run (+4). Why: with every other request throttled, each successful request costs
    exactly one throttled request besides itself (requests = 2 x successes, +-1); the SDK's retry
    waits (and the poller's backoff, when all SDK attempts fail) only make a poll cycle longer,
    and a poll cycle is never shorter than --revision-interval, so the successes per second
    cannot exceed the unthrottled request rate. Retrying without waiting, or a poller
    that re-polls at once after an error, would exceed it."""
    window = 30.0
    fp = FaultProxy("127.0.0.1", fresh_moto.port)
    try:
        deploy.cloudmap.setup()
        for z in ZONES:
            for n in (1, 2):
                deploy.server(z, f"i-{z[-1]}{n}")
        cp = ControlPlane(cloudmap_xds_bin, "demo", fp.url, deploy.tmp, deploy.procs)
        deploy.cp = cp
        cp.wait_healthz()
        cp.wait_ready()
        clients = deploy.clients_in_zones()
        ca = clients[A]
        before = endpoint_set(cp)
        assert len(before) == 6

        time.sleep(REFRESH)  # let start-up calls (ListNamespaces, GetService) pass
        ta = time.time()
        sleep_until(ta + window)
        plain = fp.counts(ta, ta + window)

        fp.set_throttle(2)
        tb = time.time()
        new = deploy.server(A, "i-a3", register=False)
        deploy.cloudmap.register("i-a3", new.host, new.port, A)
        t_reg = time.time()
        budget = REFRESH + MAX_BACKOFF
        t_first = ca.wait_for(
            lambda c: first_call_to(c, "i-a3", t_reg),
            t_reg + budget - time.time(),
            f"traffic to i-a3 within {budget:.0f}s of registering it while Cloud Map throttles",
        )
        after_reg = endpoint_set(cp)
        sleep_until(tb + window)
        throttled = fp.counts(tb, tb + window)
        fp.set_throttle(0)
        errors = {
            (l.get("operation"), l.get("code")): v
            for n, l, v in cp.metrics()
            if n == "cloudmap_xds_cloudmap_errors_total"
        }
    finally:
        fp.close()

    total_a = sum(c["total"] for c in plain.values())
    total_b = sum(c["total"] for c in throttled.values())
    thr_b = sum(c["throttled"] for c in throttled.values())
    report(
        "throttling",
        window_s=window,
        unthrottled={k: v["total"] for k, v in sorted(plain.items())},
        throttled={k: (v["total"], v["throttled"]) for k, v in sorted(throttled.items())},
        total_unthrottled=total_a,
        total_throttled=total_b,
        ratio=round(total_b / total_a, 2) if total_a else None,
        new_instance_traffic_after_register_s=round(t_first - t_reg, 2),
        errors_total=errors,
    )
    assert total_a >= window / REVISION * 0.5, f"too few unthrottled calls to compare with: {plain}"
    assert abs(thr_b - total_b / 2) <= 1, f"the proxy did not throttle every other call: {throttled}"
    assert total_b <= 2 * total_a + 4, (
        f"{total_b} Cloud Map requests in {window:.0f}s while throttled vs {total_a} unthrottled: more than 2x + 4 "
        f"(throttled {throttled}, unthrottled {plain})"
    )
    for op, c in throttled.items():
        base = plain.get(op, {"total": 0})["total"]
        assert c["total"] <= 2 * base + 4, f"{op}: {c['total']} requests while throttled vs {base} unthrottled"
    assert before < after_reg and {e[0] for e in after_reg - before} == {"i-a3"}, f"{sorted(before)} -> {sorted(after_reg)}"
    assert_no_failures(deploy.clients)
    cp.assert_acked_no_nacks()


# ---------------------------------------------------------------------------------------------
# 3. Control plane restarted with clients connected
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_ops_restart_clients_reconverge_without_failures(deploy, cloudmap_xds_bin):
    clients = standard_settled(deploy)
    old = deploy.cp
    ca = clients[A]
    new = deploy.server(A, "i-a3", register=False)  # started now, registered while the control plane is down

    t_term = time.time()
    os.kill(old.proc.pid, signal.SIGTERM)
    old.proc.stopped_by_us = True
    rc = old.proc.popen.wait(timeout=30)
    t_exit = time.time()
    deploy.cloudmap.register("i-a3", new.host, new.port, A)

    cp = ControlPlane(
        cloudmap_xds_bin, "demo", deploy.proxy.url, deploy.tmp, deploy.procs,
        xds_port=old.xds_port, admin_port=old.admin_port, name="cloudmap-xds-restarted",
    )  # fmt: skip
    t_start = time.time()
    deploy.cp = cp
    t_first = ca.wait_for(
        lambda c: first_call_to(c, "i-a3", t_start),
        t_start + 5.0 - time.time(),
        "traffic to i-a3 (registered while the control plane was down) within 5 s of the restart",
    )
    wait_until(
        lambda: cp.streams_synced({z: 1 for z in ZONES}),
        max(0.1, t_start + 5.0 - time.time()),
        "every client reconnected and ACKed its newest EDS within 5 s of the restart",
    )
    t_synced = time.time()
    t_ready = cp.wait_ready()  # already ready: the clients got data
    sleep_until(t_synced + 3.0)  # keep calling a little after the re-convergence
    t_end = time.time()

    assert rc == 0, f"the control plane exited with {rc} on SIGTERM"
    counts = {}
    for zone, c in clients.items():
        s = c.summary(c.calls(since=t_term, until=t_end))
        counts[zone] = (s.total, s.failed)
        assert s.failed == 0, f"{zone}: calls failed across the restart: {s}"
        # No gap: the client kept calling every 20 ms (a call blocked on an empty endpoint list
        # would fail at the 2 s deadline or with UNAVAILABLE).
        ts = [x["t"] for x in c.calls(since=t_term, until=t_end)]
        gap = max(b - a for a, b in zip(ts, ts[1:]))
        assert gap < 1.0, f"{zone}: {gap:.2f}s without a call across the restart"
    assert_no_failures(deploy.clients)
    cp.assert_acked_no_nacks()
    report(
        "restart",
        shutdown_s=round(t_exit - t_term, 2),
        exit_code=rc,
        down_s=round(t_start - t_exit, 2),
        new_instance_used_after_start_s=round(t_first - t_start, 2),
        all_synced_after_start_s=round(t_synced - t_start, 2),
        ready_wait_s=round(t_ready, 2),
        calls=counts,
    )


# ---------------------------------------------------------------------------------------------
# 4. A client that NACKs everything
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ops_nacking_client_gets_no_resend_loop(deploy):
    deploy.cloudmap.setup()
    for z in (A, B):
        deploy.server(z, f"i-{z[-1]}1")
    cp = deploy.control_plane()
    nacks_before = metric_sum(cp, "cloudmap_xds_nacks_total")
    names = {t: [SERVICE] for t in TYPE_URLS}
    sent_msgs: dict[str, str] = {}

    def nack_it(stream, rec):
        r = rec.response
        msg = f"ops-test rejects {SHORT[r.type_url]} version {r.version_info} nonce {r.nonce}"
        sent_msgs[r.type_url] = msg
        stream.send(request(r.type_url, names[r.type_url], version="", nonce=r.nonce, error=msg))

    s = AdsStream(cp.xds_port, on_response=nack_it)
    try:
        t0 = time.time()
        s.subscribe(LDS, names[LDS], first_node=node("nacker-1", A))
        for t in (RDS, CDS, EDS):
            s.subscribe(t, names[t])
        # One actual change inside the window: a new instance (one new EDS version).
        sleep_until(t0 + 4.0)
        deploy.server(B, "i-b2")
        t_change = time.time()
        sleep_until(t0 + 10.0)
        got = s.responses()
        per_type = collections.Counter(SHORT[r.type_url] for r in got)
        versions = collections.defaultdict(list)
        for r in got:
            versions[SHORT[r.type_url]].append(r.response.version_info)

        def nacks_recorded():
            dump = next((cl for cl in cp.config_dump()["clients"] if cl["node_id"] == "nacker-1"), None)
            if dump is None:
                return None
            seen = {t["type_url"]: (t["last_nack"] or {}).get("message") for t in dump["types"]}
            return seen if all(seen.get(t) == sent_msgs.get(t) for t in TYPE_URLS) else None

        last_nacks = wait_until(nacks_recorded, 5, "every type's last NACK message in /config_dump")
        nacks_delta = wait_until(
            lambda: (d := metric_sum(cp, "cloudmap_xds_nacks_total") - nacks_before) >= len(got) and d,
            5,
            f"cloudmap_xds_nacks_total to grow by the {len(got)} NACKs sent",
        )
        eds_after_change = [r for r in s.responses(EDS) if r.t >= t_change]
    finally:
        s.close()

    report(
        "nack_everything",
        responses_in_10s=len(got),
        per_type=dict(per_type),
        eds_versions=versions["EDS"],
        eds_after_change=len(eds_after_change),
        nacks_counted=int(nacks_delta),
    )
    assert set(per_type) == {"LDS", "RDS", "CDS", "EDS"}, f"not every type answered: {dict(per_type)}"
    for t, vs in versions.items():
        assert len(vs) == len(set(vs)), f"{t}: a NACKed version was sent again: {vs}"
    assert per_type["LDS"] == per_type["RDS"] == per_type["CDS"] == 1, f"resends of unchanged LDS/RDS/CDS: {dict(per_type)}"
    # 4 first responses + the new instance's EDS version + at most one more EDS version when
    # this client joins the census of us-east-1a.
    assert len(got) <= 4 + 2, f"{len(got)} responses in 10 s to a client that NACKs everything: {dict(per_type)} {dict(versions)}"
    assert len(eds_after_change) >= 1, "the new instance's EDS version was not sent"
    assert nacks_delta == len(got), f"cloudmap_xds_nacks_total grew by {nacks_delta}, {len(got)} NACKs were sent"
    assert {SHORT[t]: m for t, m in last_nacks.items()} == {SHORT[t]: sent_msgs[t] for t in TYPE_URLS}


# ---------------------------------------------------------------------------------------------
# 5. Clients that never read their streams
# ---------------------------------------------------------------------------------------------

BULK = "bulk.demo"
BULK_INSTANCES = 50
BULK_ATTRS = {f"ops_pad_{i}": chr(ord("a") + i) * 200 for i in range(10)}  # ~2 KB of metadata per endpoint
BULK_UPDATED = f"endpoints updated service={BULK} "  # the watcher's log line for a changed service
STALLED_CONNECTIONS = 8
STREAMS_PER_CONNECTION = 5


def _bulk_attrs(ip: str, zone: str) -> dict[str, str]:
    # 127.1.x.y:9 — loopback addresses nothing listens on; nobody dials bulk.demo anyway.
    return {"AWS_INSTANCE_IPV4": ip, "AWS_INSTANCE_PORT": "9", "AVAILABILITY_ZONE": zone, "REGION": "us-east-1", **BULK_ATTRS}


@pytest.mark.timeout(240)
def test_ops_stalled_readers_keep_memory_bounded(deploy):
    """40 ADS streams (8 hand-written HTTP/2 connections x 5 streams) subscribe to a service
    whose EDS response is ~100 KB and never read a byte, while that service's instances are
    registered and deregistered every 0.5 s for 20 s.

    The bound, 50 MB of RSS growth during the churn: the control plane may hold per stalled
    stream the responses already queued (its channel of 2, one in hand, one in the encoder or
    HTTP/2 send buffer): 40 x ~4 x ~100 KB ~ 16 MB. A design that queued every change for a
    stream that does not read would hold 40 streams x ~40 changes x ~100 KB ~ 160 MB."""
    cm = deploy.cloudmap.setup()
    bulk_id = cm.sd.create_service(Name="bulk", NamespaceId=cm.namespace_id, HealthCheckCustomConfig={})["Service"]["Id"]

    def bulk_register(iid: str, k: int) -> None:
        op = cm.sd.register_instance(
            ServiceId=bulk_id, InstanceId=iid, Attributes=_bulk_attrs(f"127.1.{k // 250}.{k % 250 + 1}", ZONES[k % 3])
        )
        cm.wait_operation(op["OperationId"])

    def bulk_deregister(iid: str) -> None:
        cm.wait_operation(cm.sd.deregister_instance(ServiceId=bulk_id, InstanceId=iid)["OperationId"])

    for k in range(BULK_INSTANCES):
        bulk_register(f"bulk-{k}", k)
    for z in ZONES:
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")
    # The padding only weighs on responses when published as endpoint metadata (default: none).
    published = ", ".join(f'"{k}"' for k in BULK_ATTRS)
    cp = deploy.control_plane(
        extra_args=config_args(deploy.tmp, f'[services."{BULK}"]\nmetadata_attributes = [{published}]\n')
    )
    clients = deploy.clients_in_zones()
    ca = clients[A]
    pid = cp.proc.pid

    # Size of the bulk EDS response, read once by a well-behaved raw client.
    probe = AdsStream(cp.xds_port)
    try:
        probe.subscribe(EDS, [BULK], first_node=node("probe", A))
        eds_bytes = probe.wait_response(EDS).response.ByteSize()
    finally:
        probe.close()
    assert eds_bytes > 50_000, f"the bulk EDS response is only {eds_bytes} bytes: the test would prove little"

    rss_start = vm_rss_kib(pid)
    conns = []
    n_stalled = STALLED_CONNECTIONS * STREAMS_PER_CONNECTION
    try:
        for ci in range(STALLED_CONNECTIONS):
            streams = []
            for si in range(STREAMS_PER_CONNECTION):
                nid = f"stalled-{ci}-{si}"
                streams.append(
                    [request(LDS, [BULK], with_node=node(nid, ZONES[si % 3]))]
                    + [request(t, [BULK]) for t in (RDS, CDS, EDS)]
                )
            conns.append(StalledH2Connection(cp.xds_port, streams))

        def stalled_subscribed():
            n = 0
            for cl in cp.config_dump()["clients"]:
                if (cl["node_id"] or "").startswith("stalled-"):
                    n += 1
            return n == n_stalled

        wait_until(stalled_subscribed, 15, f"{n_stalled} stalled streams listed in /config_dump")
        time.sleep(2.0)  # let the first responses settle into the buffers before the baseline
        rss_base = vm_rss_kib(pid)

        # Churn for 20 s: bulk.demo alternates between 50 and 51 instances (a new id each time),
        # so every step moves the revision and changes the ~100 KB EDS response.
        t0 = time.time()
        rss_samples = []
        steps = 0
        updates_before = cp.log_text().count(BULK_UPDATED)
        extra = None
        new = deploy.server(A, "i-a3", register=False)
        t_reg = None
        while time.time() < t0 + 20.0:
            k = BULK_INSTANCES + steps // 2
            if steps % 2 == 0:
                extra = f"bulk-churn-{k}"
                bulk_register(extra, k)
            else:
                bulk_deregister(extra)
            steps += 1
            if t_reg is None and time.time() >= t0 + 5.0:
                deploy.cloudmap.register("i-a3", new.host, new.port, A)
                t_reg = time.time()
            rss_samples.append(vm_rss_kib(pid))
            time.sleep(0.4)  # churn cadence
        t1 = time.time()
        rss_end = vm_rss_kib(pid)
        still = sum(1 for cl in cp.config_dump()["clients"] if (cl["node_id"] or "").startswith("stalled-"))
        bulk_updates = cp.log_text().count(BULK_UPDATED) - updates_before
    finally:
        for c in conns:
            c.close()

    assert t_reg is not None
    t_first = first_call_to(ca, "i-a3", t_reg)
    growth_mb = (max(rss_samples + [rss_end]) - rss_base) / 1024
    report(
        "stalled_readers",
        stalled_streams=n_stalled,
        bulk_eds_bytes=eds_bytes,
        churn_steps=steps,
        bulk_update_log_lines=bulk_updates,
        rss_start_mb=round(rss_start / 1024, 1),
        rss_after_open_mb=round(rss_base / 1024, 1),
        rss_max_mb=round(max(rss_samples) / 1024, 1),
        rss_end_mb=round(rss_end / 1024, 1),
        growth_mb=round(growth_mb, 1),
        stalled_still_connected=still,
        new_instance_used_after_register_s=None if t_first is None else round(t_first - t_reg, 2),
    )
    assert still == n_stalled, f"only {still} of {n_stalled} stalled streams still connected at the end of the churn"
    assert bulk_updates >= 10, f"the control plane saw only {bulk_updates} bulk.demo updates: churn did not reach it"
    assert growth_mb < 50, f"RSS grew by {growth_mb:.1f} MB in 20 s of churn with {n_stalled} stalled streams"
    assert t_first is not None and t_first - t_reg <= 3.0, (
        f"i-a3 not used within 3 s of registering (first call {None if t_first is None else round(t_first - t_reg, 2)}s)"
    )
    assert_no_failures(deploy.clients, since=t0, until=t1)
    assert_no_failures(deploy.clients)


# ---------------------------------------------------------------------------------------------
# 6. /metrics with a Prometheus text parser
# ---------------------------------------------------------------------------------------------

WANT_FAMILIES = {
    # family (as the parser names it) → (types accepted, sample name, labels every sample has)
    "cloudmap_xds_acks": ({"counter"}, "cloudmap_xds_acks_total", {"type_url"}),
    "cloudmap_xds_nacks": ({"counter"}, "cloudmap_xds_nacks_total", {"type_url"}),
    "cloudmap_xds_pushes": ({"counter"}, "cloudmap_xds_pushes_total", {"type_url"}),
    "cloudmap_xds_streams": ({"gauge"}, "cloudmap_xds_streams", {"zone", "kind"}),
    "cloudmap_xds_cloudmap_call_seconds": ({"histogram", "summary"}, None, {"operation", "outcome"}),
    "cloudmap_xds_cloudmap_errors": ({"counter"}, "cloudmap_xds_cloudmap_errors_total", {"operation", "code"}),
    "cloudmap_xds_last_sync_timestamp_seconds": ({"gauge"}, "cloudmap_xds_last_sync_timestamp_seconds", {"service"}),
    "cloudmap_xds_service_updated_timestamp_seconds": ({"gauge"}, "cloudmap_xds_service_updated_timestamp_seconds", {"service"}),
    "cloudmap_xds_endpoints": ({"gauge"}, "cloudmap_xds_endpoints", {"service"}),
    "cloudmap_xds_streams_refused": ({"counter"}, "cloudmap_xds_streams_refused_total", set()),
}


def parse_families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.timeout(60)
def test_ops_allocator_commits_its_arena_on_demand(deploy):
    """The binary sets mimalloc's arena_eager_commit to 0 before mimalloc starts: its 1 GiB arena
    is reserved (---p) and committed as used. Committed up front (rw-p, mimalloc's default on
    Linux) it kept 13 instead of 9.6 KiB per idle stream resident at N = 1,000 (BENCHMARKS.md).
    MIMALLOC_ARENA_EAGER_COMMIT, when set, wins: the second control plane shows the check sees
    the difference."""
    deploy.cloudmap.setup(namespace="demo")
    cp = deploy.control_plane(env={"MIMALLOC_ARENA_EAGER_COMMIT": None})
    arenas = large_anonymous_mappings(cp.proc.pid)
    assert any(perms == "---p" for _, perms in arenas), f"no reserved arena among {arenas}"
    assert not any(perms.startswith("rw") for _, perms in arenas), f"an arena committed up front: {arenas}"

    eager = deploy.control_plane(name="cloudmap-xds-eager", env={"MIMALLOC_ARENA_EAGER_COMMIT": "2"})
    arenas = large_anonymous_mappings(eager.proc.pid)
    assert any(perms.startswith("rw") for _, perms in arenas), f"the environment did not win: {arenas}"


@pytest.mark.timeout(150)
def test_ops_metrics_parse_with_prometheus_parser(deploy):
    # --max-streams 4: the 3 grpcio clients and one raw client fill it; a fifth stream is refused,
    # so cloudmap_xds_streams_refused_total exists.
    deploy.cloudmap.setup()
    for z in ZONES:
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")
    cp = deploy.control_plane(extra_args=["--max-streams", "4"])
    clients = deploy.clients_in_zones()
    cp.wait_census({z: 1 for z in ZONES})
    absent_at_start = sorted(f for f in WANT_FAMILIES if f not in parse_families(cp.get("/metrics")[1]))

    # A NACK, so the NACK counter exists.
    nacker = AdsStream(cp.xds_port)  # the stream opens at once: the refused one only after it
    refused = None
    try:
        nacker.subscribe(CDS, [SERVICE], first_node=node("metrics-nacker", A))
        r = nacker.wait_response(CDS).response
        nacker.send(request(CDS, [SERVICE], nonce=r.nonce, error="ops-test metrics NACK"))
        wait_until(lambda: metric_sum(cp, "cloudmap_xds_nacks_total") >= 1, 5, "the NACK counted")
        refused = AdsStream(cp.xds_port)
        refused.subscribe(LDS, [SERVICE], first_node=node("metrics-refused", A))
        end = refused.wait_ended(10)
        assert end.code.name == "RESOURCE_EXHAUSTED", f"5th stream with --max-streams 4: {end}"
    finally:
        if refused is not None:
            refused.close()
        nacker.close()

    # A Cloud Map error, so the error counter exists; then a successful sync again.
    sync0 = metric_sum(cp, "cloudmap_xds_last_sync_timestamp_seconds", service=SERVICE)
    deploy.proxy.stop()
    wait_until(lambda: metric_sum(cp, "cloudmap_xds_cloudmap_errors_total") > 0, 10, "a Cloud Map error counted")
    deploy.proxy.start()
    wait_until(
        lambda: metric_sum(cp, "cloudmap_xds_last_sync_timestamp_seconds", service=SERVICE) > sync0 + 1,
        REFRESH + MAX_BACKOFF + 2,
        "a successful sync after the error",
    )

    status, text = cp.get("/metrics")
    assert status == 200
    fams = parse_families(text)  # raises on text the Prometheus parser cannot read
    problems = []
    for name, (types, sample_name, labels) in WANT_FAMILIES.items():
        f = fams.get(name)
        if f is None:
            problems.append(f"{name}: family missing")
            continue
        if f.type not in types:
            problems.append(f"{name}: type {f.type}, want {sorted(types)}")
        if not f.samples:
            problems.append(f"{name}: no samples")
        for s in f.samples:
            if sample_name and s.name != sample_name:
                problems.append(f"{name}: sample {s.name}, want {sample_name}")
                break
            missing = labels - set(s.labels)
            if missing:
                problems.append(f"{name}: sample {s.name}{s.labels} lacks labels {sorted(missing)}")
                break
    assert not problems, "\n".join(problems) + "\n--- /metrics ---\n" + text[:4000]

    def values(name, **labels):
        return [s.value for s in fams[name].samples if all(s.labels.get(k) == v for k, v in labels.items())]

    acked = {s.labels["type_url"] for s in fams["cloudmap_xds_acks"].samples if s.value > 0}
    assert set(TYPE_URLS) <= acked, f"ACKs not counted for every type: {acked}"
    assert values("cloudmap_xds_endpoints", service=SERVICE) == [6.0]
    streams = {(s.labels["zone"], s.labels["kind"]): s.value for s in fams["cloudmap_xds_streams"].samples}
    assert all(streams.get((z, "grpc"), 0) >= 1 for z in ZONES), f"streams gauge: {streams}"
    last_sync = values("cloudmap_xds_last_sync_timestamp_seconds", service=SERVICE)
    assert last_sync and time.time() - last_sync[0] < 10, f"last sync {last_sync} is not recent"
    call_ops = {s.labels.get("operation") for s in fams["cloudmap_xds_cloudmap_call_seconds"].samples}
    assert {"DiscoverInstances", "DiscoverInstancesRevision"} <= call_ops, f"call_seconds operations: {call_ops}"
    assert values("cloudmap_xds_streams_refused") and values("cloudmap_xds_streams_refused")[0] >= 1
    assert_no_failures(deploy.clients)
    report(
        "metrics",
        families=len(fams),
        call_seconds_type=fams["cloudmap_xds_cloudmap_call_seconds"].type,
        absent_until_first_event=absent_at_start,
        error_codes=sorted({(s.labels["operation"], s.labels["code"]) for s in fams["cloudmap_xds_cloudmap_errors"].samples}),
    )
    # Last, so every other check above has run: the latency is specified as a histogram
    # (_bucket/_sum/_count, aggregatable across replicas), not a summary (per-process quantiles).
    call = fams["cloudmap_xds_cloudmap_call_seconds"]
    assert call.type == "histogram", (
        f"cloudmap_xds_cloudmap_call_seconds is exposed as a {call.type}, want a histogram; samples: "
        + ", ".join(sorted({s.name for s in call.samples}))
    )


# ---------------------------------------------------------------------------------------------
# 7. CSDS
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ops_csds_lists_connected_clients_with_acked_resources(deploy):
    from envoy.admin.v3 import config_dump_shared_pb2
    from envoy.service.status.v3 import csds_pb2
    from envoy.type.matcher.v3 import node_pb2, string_pb2

    clients = standard_settled(deploy)
    cp = deploy.cp
    synced, acked = csds_pb2.ConfigStatus.Value("SYNCED"), config_dump_shared_pb2.ClientResourceStatus.Value("ACKED")
    want = {f"client-{z[-1]}": z for z in ZONES}

    def check():
        resp = fetch_client_status(cp.admin_port)  # CSDS is on the admin address
        by_node = {c.node.id: c for c in resp.config}
        problems = []
        for node_id, zone in want.items():
            c = by_node.get(node_id)
            if c is None:
                problems.append(f"{node_id} not listed (listed: {sorted(by_node)})")
                continue
            if c.node.locality.zone != zone or not c.node.user_agent_name.startswith("gRPC"):
                problems.append(f"{node_id}: node {c.node.locality.zone!r} {c.node.user_agent_name!r}")
            got = {(g.type_url, g.name) for g in c.generic_xds_configs}
            if got != {(t, SERVICE) for t in TYPE_URLS}:
                problems.append(f"{node_id}: resources {sorted(got)}")
            for g in c.generic_xds_configs:
                if g.config_status != synced or g.client_status != acked or not g.version_info:
                    problems.append(
                        f"{node_id}: {SHORT[g.type_url]} {g.name} config_status={csds_pb2.ConfigStatus.Name(g.config_status)} "
                        f"client_status={config_dump_shared_pb2.ClientResourceStatus.Name(g.client_status)} version={g.version_info!r}"
                    )
                if not g.HasField("xds_config"):
                    problems.append(f"{node_id}: {SHORT[g.type_url]} without xds_config contents")
        return (resp, problems)

    def ok():
        resp, problems = check()
        return resp if not problems else None

    try:
        resp = wait_until(ok, 10, "CSDS lists client-a/b/c with every resource SYNCED/ACKED")
    except AssertionError as e:
        raise AssertionError(f"{e}: {check()[1]}") from None

    only_b = fetch_client_status(
        cp.admin_port, node_matchers=[node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(exact="client-b"))]
    )
    assert [c.node.id for c in only_b.config] == ["client-b"], f"node_matchers exact client-b: {[c.node.id for c in only_b.config]}"
    assert_no_failures(clients)
    report(
        "csds",
        clients=sorted(c.node.id for c in resp.config),
        resources_per_client={c.node.id: len(c.generic_xds_configs) for c in resp.config},
    )


# ---------------------------------------------------------------------------------------------
# 8. Limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ops_limits_resource_names_and_streams(deploy):
    deploy.cloudmap.setup()
    deploy.server(A, "i-a1")
    cp = deploy.control_plane(extra_args=["--max-resource-names", "5", "--max-streams", "2"])

    def n_clients():
        return len(cp.config_dump()["clients"])

    # 6 names > 5: INVALID_ARGUMENT.
    s = AdsStream(cp.xds_port)
    try:
        s.subscribe(LDS, [SERVICE] + [f"pad{i}.demo" for i in range(5)], first_node=node("too-many-names", A))
        too_many = s.wait_ended(10)
    finally:
        s.close()
    assert too_many.code.name == "INVALID_ARGUMENT", f"6 names with --max-resource-names 5: {too_many}"
    wait_until(lambda: n_clients() == 0, 5, "the rejected stream gone from /config_dump")

    # Exactly 5 names: accepted. Then a second stream; the third is refused.
    s1, s2, s3, s4 = AdsStream(cp.xds_port), AdsStream(cp.xds_port), None, None
    try:
        s1.subscribe(LDS, [SERVICE] + [f"pad{i}.demo" for i in range(4)], first_node=node("five-names", A))
        lds = s1.wait_response(LDS).response
        assert [r.type_url for r in lds.resources] == [LDS], "5 names: want the one existing listener"
        s2.subscribe(LDS, [SERVICE], first_node=node("second", B))
        s2.wait_response(LDS)
        refused_before = metric_sum(cp, "cloudmap_xds_streams_refused_total")
        s3 = AdsStream(cp.xds_port)
        s3.subscribe(LDS, [SERVICE], first_node=node("third", C))
        third = s3.wait_ended(10)
        assert third.code.name == "RESOURCE_EXHAUSTED", f"third stream with --max-streams 2: {third}"
        refused = metric_sum(cp, "cloudmap_xds_streams_refused_total") - refused_before
        assert refused == 1, f"cloudmap_xds_streams_refused_total grew by {refused}"
        # A slot freed is a slot usable.
        s2.close()
        wait_until(lambda: n_clients() == 1, 5, "the closed stream gone from /config_dump")
        s4 = AdsStream(cp.xds_port)
        s4.subscribe(LDS, [SERVICE], first_node=node("fourth", C))
        s4.wait_response(LDS)
        assert s1.ended is None, f"the first stream ended: {s1.ended}"
    finally:
        for x in (s1, s2, s3, s4):
            if x is not None:
                x.close()
    report(
        "limits",
        too_many_names=f"{too_many.code.name}: {too_many.details}",
        third_stream=f"{third.code.name}: {third.details}",
    )
