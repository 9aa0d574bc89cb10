"""Checks of the test harness itself (and of demo-server), without the control plane:
the moto fixture, the stop/start TCP proxy, and the grpcio client against one demo-server."""

from __future__ import annotations

import socket
import time

import botocore.exceptions
import pytest

from harness import CloudMap, DemoServer, XdsClient


def test_cloudmap_helpers_against_moto(cloudmap: CloudMap):
    cloudmap.setup("demo")
    cloudmap.register("i-1", "127.0.0.1", 1234, "us-east-1a")
    cloudmap.register_attrs("i-2", {"AWS_INSTANCE_IPV4": "127.0.0.2", "AVAILABILITY_ZONE": "us-east-1b"})
    by_id = {i["InstanceId"]: i for i in cloudmap.discover()}
    assert set(by_id) == {"i-1", "i-2"}
    a = by_id["i-1"]["Attributes"]
    assert a["AWS_INSTANCE_PORT"] == "1234" and a["AVAILABILITY_ZONE"] == "us-east-1a" and a["REGION"] == "us-east-1"
    assert a["ECS_SERVICE_NAME"] == "echo" and a["ECS_CLUSTER_NAME"]
    cloudmap.set_health("i-1", "UNHEALTHY")
    by_id = {i["InstanceId"]: i for i in cloudmap.discover()}
    assert by_id["i-1"]["HealthStatus"] == "UNHEALTHY"
    cloudmap.deregister("i-2")
    assert [i["InstanceId"] for i in cloudmap.discover()] == ["i-1"]


def test_moto_reset_between_tests(cloudmap: CloudMap):
    # The previous test created namespace "demo"; the per-test reset removed it.
    assert cloudmap.sd.list_namespaces()["Namespaces"] == []


def test_proxy_stop_start_keeps_moto_state(cloudmap: CloudMap, proxy):
    cloudmap.setup("demo")
    cloudmap.register("i-1", "127.0.0.1", 1234, "us-east-1a")
    via = CloudMap(proxy.url)
    via.namespace, via.service = "demo", "echo"
    assert [i["InstanceId"] for i in via.discover()] == ["i-1"]
    assert proxy.accepted >= 1
    port = proxy.port

    proxy.stop()
    assert proxy.open_connections() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        via.discover()

    proxy.start()
    assert proxy.port == port
    assert [i["InstanceId"] for i in via.discover()] == ["i-1"]


def test_proxy_resets_open_connections(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        s.sendall(b"GET /moto-api/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.")
        proxy.stop()
        s.settimeout(5)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            # drain whatever is left, then the RST shows up
            while s.recv(65536):
                pass
            raise AssertionError("got an orderly close, expected a reset")
    finally:
        s.close()


def test_grpcio_client_against_demo_server_directly(procs, tmp_path, demo_stubs, demo_server_bin):
    s = DemoServer(demo_server_bin, "us-east-1b", "i-direct", tmp_path, procs)
    c = XdsClient(demo_stubs, 0, "us-east-1b", "direct", tmp_path, procs, target=s.addr)
    t0 = c.wait_first_success(timeout=20)
    calls = c.wait_calls(50, since=t0, timeout=20)
    summ = c.summary(calls)
    assert summ.failed == 0, str(summ)
    assert summ.per_instance == {"i-direct": 50}, str(summ)
    assert summ.own_zone_share == 1.0
    # After the server stops, calls fail fast (the client reports failures, not hangs).
    s.stop()
    t1 = time.time()
    c.wait_for(lambda c: c.summary(c.calls(since=t1)).failed >= 3, 10, "failed calls after the server stopped")
