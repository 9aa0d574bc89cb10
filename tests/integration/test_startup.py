"""Start-up errors that tell the operator what to do (issue 11, item 10), against the real binary.

- A port already taken stops the start within seconds, non-zero, and stderr names the flag to
  change: the admin port (before, the process ran on without /ready or /metrics and the ECS health
  check reached whatever held the port) and the xDS port.
- Without AWS credentials, or without a region, the control plane keeps running and logs one
  short line naming the remedy on each retry, and no line of the SDK's 1,000-character detail.
"""

from __future__ import annotations

import socket
import time

import pytest

from harness import ControlPlane, wait_until


@pytest.mark.parametrize("which", ["admin", "xds"])
def test_startup_a_taken_port_exits_naming_its_flag(which, cloudmap_xds_bin, proxy, procs, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        t0 = time.monotonic()
        port = {"admin_port": taken} if which == "admin" else {"xds_port": taken}
        cp = ControlPlane(cloudmap_xds_bin, "demo", proxy.url, tmp_path, procs, **port)
        rc = cp.wait_exit(timeout=5)
        took = time.monotonic() - t0
    finally:
        holder.close()
    stderr = "\n".join(cp.stderr_lines())
    assert rc != 0, f"exit code {rc}; stderr:\n{stderr}"
    assert f"--{which}-listen" in stderr, stderr
    assert f"127.0.0.1:{taken}" in stderr, stderr
    assert took < 5, f"took {took:.1f} s to give up"


NO_CREDENTIALS = "no AWS credentials: set AWS_PROFILE / AWS_ACCESS_KEY_ID or use an ECS task role"
NO_REGION = "no AWS region: set AWS_REGION"


@pytest.mark.parametrize("missing", ["credentials", "region"])
def test_startup_missing_credentials_or_region_is_one_short_line_with_the_remedy(
    missing, cloudmap_xds_bin, proxy, procs, tmp_path
):
    if missing == "credentials":
        env = {
            "AWS_ACCESS_KEY_ID": None,
            "AWS_SECRET_ACCESS_KEY": None,
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": "cloudmap-xds-test-no-such-profile",
            # Keep any ~/.aws of the machine out of it.
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        }
        remedy = NO_CREDENTIALS
    else:
        env = {"AWS_REGION": None, "AWS_DEFAULT_REGION": None, "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config")}
        remedy = NO_REGION
    cp = ControlPlane(cloudmap_xds_bin, "demo", proxy.url, tmp_path, procs, env=env)
    cp.wait_healthz()

    def remedy_lines():
        assert cp.proc.alive(), "the control plane keeps running and retrying"
        lines = [line for line in cp.stderr_lines() if remedy in line]
        return lines if len(lines) >= 2 else None  # the first failure and a retry

    lines = wait_until(remedy_lines, 15, f"two log lines with {remedy!r}")
    assert all(len(line) < 300 for line in lines), max(lines, key=len)
    longest = max(cp.stderr_lines(), key=len)
    assert len(longest) <= 1000, f"a log line of {len(longest)} characters: {longest[:300]}…"
    status, _ = cp.get("/ready")
    assert status == 503, "nothing synced, so not ready"
