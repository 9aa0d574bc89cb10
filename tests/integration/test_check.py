"""`cloudmap-xds check` against moto (issue: operator page, item 3): a deliberately broken
estate — a namespace typo, an instance without a port, one without a zone, a service without
instances — gives exit code 1, a report with the instances per zone and the skipped one with its
reason, the IAM actions, and one remedy per problem; the same estate repaired gives exit 0."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from harness import REGION


def run_check(exe, endpoint: str, *namespaces: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDMAP_XDS_"))}
    env.update(AWS_REGION=REGION, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true", NO_COLOR="1")  # fmt: skip
    return subprocess.run(
        [str(exe), "check", "--namespace", ",".join(namespaces)], env=env, capture_output=True, text=True, timeout=60
    )


def test_check_reports_a_broken_estate_with_remedies_and_passes_once_repaired(cloudmap, proxy, cloudmap_xds_bin):
    cloudmap.setup()
    cloudmap.register("i-a1", "127.0.0.1", 5001, "us-east-1a")
    no_port = cloudmap.ecs_attributes("127.0.0.1", 1, "us-east-1b")
    del no_port["AWS_INSTANCE_PORT"]
    cloudmap.register_attrs("i-noport", no_port)
    no_zone = cloudmap.ecs_attributes("127.0.0.1", 5003, "us-east-1c")
    del no_zone["AVAILABILITY_ZONE"]
    cloudmap.register_attrs("i-nozone", no_zone)
    empty = cloudmap.sd.create_service(Name="empty", NamespaceId=cloudmap.namespace_id, HealthCheckCustomConfig={})

    out = run_check(cloudmap_xds_bin, proxy.url, "demo", "typo")
    report = out.stdout
    assert out.returncode == 1, f"exit {out.returncode}\n{report}\n{out.stderr[-2000:]}"
    for needle in [
        f"region: {REGION}",
        "credentials: found",
        "echo.demo (dial xds:///echo.demo): 3 instance(s), 2 served, 1 skipped",
        "us-east-1a: 1 healthy",
        "skipped i-noport: no AWS_INSTANCE_PORT attribute",
        "settings: policy zone-aware",
        "empty.demo (dial xds:///empty.demo): 0 instance(s)",
        "namespace typo: NOT FOUND",
        "DiscoverInstances, DiscoverInstancesRevision, GetInstancesHealthStatus, GetService, GetServiceAttributes",
        "4 problem(s):",
        "echo.demo: instance i-noport is skipped: no AWS_INSTANCE_PORT attribute",
        "echo.demo: 1 instance(s) have no AVAILABILITY_ZONE attribute",
        "empty.demo: no instance can be served",
        "namespace typo is not in Cloud Map in region us-east-1",
    ]:
        assert needle in report, f"{needle!r} not in the report:\n{report}"
    # The IAM actions it prints are those the CDK stack grants the control plane's task role.
    printed = re.search(r"IAM actions needed \(servicediscovery:\):\n  (.+)\n", report).group(1).split(", ")
    stack = (Path(__file__).resolve().parents[2] / "deploy" / "lib" / "stack.ts").read_text()
    granted = re.search(r"CONTROL_PLANE_ACTIONS = \[(.*?)\];", stack, re.S).group(1)
    granted = sorted(re.findall(r"'servicediscovery:(\w+)'", granted))
    assert printed == granted, f"check prints {printed}, the CDK stack grants {granted}"
    # One remedy line per problem.
    assert report.count("\n    fix: ") == 4, report

    # Repaired: the typo dropped, the instances fixed, the empty service deleted.
    for instance_id, port, zone in [("i-noport", 5002, "us-east-1b"), ("i-nozone", 5003, "us-east-1c")]:
        cloudmap.deregister(instance_id)  # moto keeps both registrations of a re-registered id
        cloudmap.register(instance_id, "127.0.0.1", port, zone)
    cloudmap.sd.delete_service(Id=empty["Service"]["Id"])
    out = run_check(cloudmap_xds_bin, proxy.url, "demo")
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-2000:]}"
    assert "3 instance(s), 3 served, 0 skipped" in out.stdout and "no problems found" in out.stdout, out.stdout
