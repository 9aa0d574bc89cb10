"""Production estates (issue 11) against moto and grpcio: a namespace that does not exist, a
service deleted while served, a service above one DiscoverInstances page (1,000 instances)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from harness import ZONES, CloudMap, DemoServer, wait_until

MISSING = "no-such-namespace"


def _missing_gauge(cp, namespace: str) -> float | None:
    return cp.metric_values("cloudmap_xds_namespace_missing").get(json.dumps({"namespace": namespace}))


def test_missing_namespace_does_not_hold_up_the_others(deploy, moto, demo_server_bin):
    """`--namespace demo,no-such-namespace`: demo is served, the other is reported, and served
    once it appears (before: /ready 503 forever and no client answered)."""
    deploy.cloudmap.setup()
    for z in ZONES:
        deploy.server(z, f"i-{z[-1]}1")
    cp = deploy.control_plane(namespace=f"demo,{MISSING}", extra_args=["--services-interval", "1s"])
    status, body = cp.get("/ready")
    assert status == 200, body
    assert f"namespace {MISSING}: not found in Cloud Map" in body, body
    assert cp.config_dump()["namespaces"][MISSING]["state"] == "missing"
    assert cp.config_dump()["namespaces"]["demo"]["state"] == "synced"
    assert _missing_gauge(cp, MISSING) == 1.0 and _missing_gauge(cp, "demo") == 0.0
    client = deploy.client("us-east-1a")
    deploy.wait_first_success(client)
    errors = cp.grep(f'Cloud Map has no namespace "{MISSING}"')
    assert "ERROR" in errors, errors

    # The namespace is created later: its service is served within a few listings.
    late = CloudMap(moto.url).setup(namespace=MISSING, service="late")
    server = DemoServer(demo_server_bin, "us-east-1b", "i-late", deploy.tmp, deploy.procs)
    late.register("i-late", server.host, server.port, "us-east-1b")
    t0 = time.monotonic()
    c2 = deploy.client("us-east-1b", target=f"xds:///late.{MISSING}", node_id="client-late")
    deploy.wait_first_success(c2, timeout=20)
    assert time.monotonic() - t0 < 15
    wait_until(lambda: _missing_gauge(cp, MISSING) == 0.0, 5, "missing-namespace gauge back to 0")
    assert cp.config_dump()["namespaces"][MISSING]["state"] == "synced"
    # Logged once a minute, not once a listing (the test ran ≥ several listings).
    assert errors.count("Cloud Map has no namespace") == 1, errors
    cp.assert_acked_no_nacks()


def test_only_missing_namespaces_is_not_ready(deploy):
    deploy.cloudmap.setup()
    cp = deploy.control_plane(namespace=MISSING, wait_ready=False, extra_args=["--services-interval", "1s"])
    wait_until(lambda: cp.config_dump()["namespaces"][MISSING]["state"] == "missing", 10, "namespace reported missing")
    status, body = cp.get("/ready")
    assert status == 503 and f"namespace {MISSING}: not found" in body, body


def test_deleted_service_is_removed_after_cloud_map_confirms_it(deploy):
    """A deleted service goes once GetService (or a second listing) confirms it, with the reason logged."""
    cm = deploy.cloudmap
    cm.setup()
    deploy.server("us-east-1a", "i-a1")
    other = cm.sd.create_service(Name="other", NamespaceId=cm.namespace_id, HealthCheckCustomConfig={})["Service"]
    op = cm.sd.register_instance(
        ServiceId=other["Id"], InstanceId="i-o1", Attributes=CloudMap.ecs_attributes("127.0.0.9", 50051, "us-east-1a")
    )
    cm.wait_operation(op["OperationId"])
    cp = deploy.control_plane(extra_args=["--services-interval", "1s"])
    names = lambda: {s["name"] for s in cp.config_dump()["services"]}  # noqa: E731
    assert names() == {"echo.demo", "other.demo"}
    client = deploy.client("us-east-1a")
    deploy.wait_first_success(client)

    cm.sd.deregister_instance(ServiceId=other["Id"], InstanceId="i-o1")
    cm.sd.delete_service(Id=other["Id"])
    t0 = time.monotonic()
    wait_until(lambda: names() == {"echo.demo"}, 10, "deleted service removed")
    took = time.monotonic() - t0
    line = cp.grep("service deleted from Cloud Map")
    assert "ServiceNotFound" in line or "missing from two listings" in line, line
    # Confirmed by GetService at the first listing without it (≈ 1 s), or by the second.
    assert took < 4, f"removal took {took:.1f} s"
    assert "echo.demo" in names()
    assert client.wait_calls(5, since=time.time())  # the other service keeps being served


def test_service_above_one_page_is_served_completely(deploy):
    """1,500 instances: DiscoverInstances returns 1,000; the rest come from ListInstances
    (before: 1,000 served, silently)."""
    cm = deploy.cloudmap
    cm.setup(service="big")

    def register(i: int) -> None:
        attributes = CloudMap.ecs_attributes(f"10.1.{i // 250}.{i % 250 + 1}", 50051, ZONES[i % 3], "big")
        cm.sd.register_instance(ServiceId=cm.service_id, InstanceId=f"i-{i:04d}", Attributes=attributes)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(register, range(1500)))
    cm.sd.update_instance_custom_health_status(ServiceId=cm.service_id, InstanceId="i-0007", Status="UNHEALTHY")
    cp = deploy.control_plane(wait_ready=True)
    service = next(s for s in cp.config_dump()["services"] if s["name"] == "big.demo")
    ids = {e["instance_id"] for e in service["endpoints"]}
    # HEALTHY_OR_ELSE_ALL, applied to the listing: the one unhealthy instance is left out.
    assert len(ids) == 1499 and "i-0007" not in ids and "i-1499" in ids, len(ids)
    assert sum(service["capacity"].values()) == 1499
    warning = cp.grep("more than one DiscoverInstances page")
    assert "big.demo" in warning, warning
    listings = cp.metric_values("cloudmap_xds_full_listings_total")
    assert listings.get(json.dumps({"service": "big.demo"}), 0) >= 1, listings
