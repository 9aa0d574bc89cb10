"""Clusters and routes that do not cap clients (issue 11, item 6).

- grpcio (C-core xDS) caps concurrent requests per cluster at 1024 when the CDS cluster carries
  no `circuit_breakers` (gRFC A32): 1,500 concurrent 4 s calls through `xds:///echo.demo` must
  all succeed (before: 1,024 answers, 476 `UNAVAILABLE: circuit breaker drop`).
- Envoy applies a 15 s route timeout unless the route sets `timeout: 0s`: one 20 s call through
  the egress listener must succeed (before: `UNAVAILABLE: upstream request timeout` at 15 s).

The service's single instance is a grpc.aio Describer that sleeps (slow_peers.py serve), registered
in moto with the ECS attributes demo-server gets; the calls come from slow_peers.py burst.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from envoy_harness import API_TYPES, Envoy, envoy_binary
from harness import SLOW_PEERS, Proc, SlowPeer, free_port, spawn, tail, write_bootstrap

ECHO = "echo.demo"


def burst(deploy, name: str, target: str, calls: int, delay_ms: int, timeout: float, authority: str | None = None,
          bootstrap: Path | None = None) -> dict:  # fmt: skip
    """Run slow_peers.py burst to completion (stopped by PID after `timeout`); its JSON result."""
    out, err = deploy.tmp / f"burst-{name}.stdout", deploy.tmp / f"burst-{name}.stderr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "error"}
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    if bootstrap is not None:
        env["GRPC_XDS_BOOTSTRAP"] = str(bootstrap)
    args = [sys.executable, str(SLOW_PEERS), "burst", "--stubs", str(deploy.stubs), "--target", target,
            "--calls", str(calls), "--delay-ms", str(delay_ms), "--deadline", str(timeout - 5)]  # fmt: skip
    if authority:
        args += ["--authority", authority]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = spawn(args, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env)
    proc = deploy.procs.add(Proc(f"burst {name}", popen, {"stdout": out, "stderr": err}))
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise AssertionError(f"burst {name} did not finish within {timeout}s:\n{tail(err)}") from None
    proc.stopped_by_us = True  # it was meant to end by itself
    assert popen.returncode == 0, f"burst {name} failed ({popen.returncode}):\n{tail(err)}"
    return json.loads(out.read_text().strip().splitlines()[-1])


def test_grpc_client_is_not_capped_at_1024_concurrent_calls(deploy):
    deploy.cloudmap.setup()
    SlowPeer(deploy, "us-east-1a", "i-slow-a1")
    cp = deploy.control_plane()
    bootstrap = write_bootstrap(deploy.tmp / "bootstrap-burst.json", cp.xds_port, "burst-1", "us-east-1a")
    result = burst(deploy, "grpc", "xds:///echo.demo", calls=1500, delay_ms=4000, timeout=60, bootstrap=bootstrap)
    assert result["ok"] == 1500 and result["failed"] == 0, f"1,500 concurrent 4 s calls: {result}"
    # All in flight at once: one round of 4 s, not two.
    assert result["seconds"] < 8, f"the calls were not concurrent: {result}"
    cp.assert_acked_no_nacks()


def test_envoy_egress_call_longer_than_15s_succeeds(deploy):
    envoy_binary()  # a missing Envoy fails here, before anything starts
    deploy.cloudmap.setup()
    SlowPeer(deploy, "us-east-1a", "i-slow-a1")
    egress = free_port()
    cp = deploy.control_plane(extra_args=["--envoy-egress-port", str(egress)])
    envoy = Envoy(cp.xds_port, "us-east-1a", API_TYPES["sotw"], deploy.tmp, deploy.procs)
    try:
        envoy.wait_egress_listener(egress)
        envoy.wait_cluster_hosts(ECHO, 1)
        thresholds = envoy.dynamic_clusters()[ECHO]["cluster"]["circuit_breakers"]["thresholds"][0]
        assert int(thresholds["max_requests"]) == 2147483647, thresholds
        result = burst(deploy, "envoy", f"127.0.0.1:{egress}", calls=1, delay_ms=20_000, timeout=40, authority=ECHO)
        assert result["ok"] == 1 and result["failed"] == 0, f"one 20 s call through Envoy's egress: {result}"
        assert result["seconds"] >= 20, result
        assert not {k: v for k, v in envoy.rejected().items() if v}, envoy.rejected()
    finally:
        envoy.save_admin()
