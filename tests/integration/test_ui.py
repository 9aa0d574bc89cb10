"""The operator page and the observability files against a live estate (issue: operator page).

- `/ui` rendered by a real headless Chromium (Debian's `chromium`, installed by
  scripts/install-peers.sh): servers 2/2/2, clients 4/1/1, one instance Cloud Map has without a
  port. The rendered page shows the service, its three zones, the traffic matrix as the clients
  were told (zone a keeps 50.0 %, the zone-aware worked example), the cross-zone share (4 × 0.5
  of 6 clients = 33.3 %), the skipped instance with its reason and the clients; the page logs
  nothing to the console (an uncaught error would); a screenshot is saved to
  target/test-artifacts/ui.png.
- deploy/observability: every metric the Grafana dashboard and the alerting rules query is one a
  running control plane exports (the alert rules themselves are checked by promtool in
  scripts/test-deploy.sh).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from harness import ZONES, wait_until

A, B, C = ZONES
ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
ARTIFACTS = ROOT / "target" / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium not found: scripts/install-peers.sh installs Debian's chromium package"
    return path


def run_chromium(tmp: Path, url: str, *args: str) -> tuple[str, str]:
    """(stdout, stderr) of one headless Chromium run with a fresh profile."""
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    out = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert out.returncode == 0, f"chromium exited {out.returncode}: {out.stderr[-2000:]}"
    return out.stdout, out.stderr


def ui_state(cp) -> dict:
    status, body = cp.get("/ui/state")
    assert status == 200, f"/ui/state answered {status}: {body[:300]}"
    return json.loads(body)


def text_of(dom: str) -> str:
    """The page's text with tags dropped and whitespace squeezed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_the_operator_page_shows_zones_shares_skips_and_clients_in_a_real_browser(deploy):
    deploy.cloudmap.setup()
    for z in ZONES:
        for n in (1, 2):
            deploy.server(z, f"i-{z[-1]}{n}")
    attrs = deploy.cloudmap.ecs_attributes("127.0.0.1", 1, A)
    del attrs["AWS_INSTANCE_PORT"]
    deploy.cloudmap.register_attrs("i-noport", attrs)
    cp = deploy.control_plane()
    clients = [deploy.client(A, node_id=f"client-a{i}") for i in range(1, 5)]
    clients += [deploy.client(B, node_id="client-b1"), deploy.client(C, node_id="client-c1")]
    for c in clients:
        deploy.wait_first_success(c)
    cp.wait_census({A: 4, B: 1, C: 1})

    def settled():
        state = ui_state(cp)
        svc = next((s for s in state["services"] if s["name"] == "echo.demo"), None)
        acked = [c for c in state["clients"] if c["state"] == "acked"]
        ok = svc is not None and svc["cross_zone_percent"] == 33.3 and len(acked) == len(clients)
        return (state, svc) if ok else None

    state, svc = wait_until(settled, 15, "the plans use clients 4/1/1 and every client ACKed")
    row_a = next(r for r in svc["matrix"] if r["zone"] == A)
    assert row_a["percent"][A] == 50.0 and row_a["clients"] == 4, row_a
    assert [z["zone"] for z in svc["zones"]] == [A, B, C]
    assert svc["skipped"] == [{"instance_id": "i-noport", "reason": "no AWS_INSTANCE_PORT attribute"}], svc["skipped"]

    url = f"{cp.admin}/ui"
    dom, log = run_chromium(deploy.tmp, url, "--dump-dom")
    text = text_of(dom)
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert console == [], f"the page wrote to the console: {console}"
    assert "ready" in text and "cannot reach" not in text, text[:500]
    for needle in ["echo.demo", A, B, C, "33.3 % cross-zone", "50.0 %", "100.0 %", "i-noport",
                   "no AWS_INSTANCE_PORT attribute", "client-a1", "client-c1", "(no zone)"]:  # fmt: skip
        assert needle in text, f"{needle!r} not on the rendered page: {text[:3000]}"
    # The matrix is a heat map: each share cell is coloured by its value.
    assert re.search(r'class="heat local"[^>]*style="background: rgb\(', dom) or re.search(
        r'style="background: rgb\([^"]*"[^>]*class="heat local"', dom
    ), "no coloured local cell in the matrix"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui.png"
    shot.unlink(missing_ok=True)
    run_chromium(deploy.tmp, url, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000, shot
    print(f"screenshot: {shot}")


def queried_metrics() -> dict[str, str]:
    """{metric family: where it is queried} for the dashboard's and the alerts' expressions."""
    exprs: list[tuple[str, str]] = []
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            exprs.append((f"dashboard panel {panel['title']!r}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var.get("definition"):
            exprs.append((f"dashboard variable {var['name']}", var["definition"]))
    for line in (OBSERVABILITY / "alerts.yml").read_text().splitlines():
        m = re.match(r"\s*expr:\s*(.+)", line)
        if m:
            exprs.append(("alerts.yml", m.group(1)))
    assert len(exprs) >= 15, exprs
    names: dict[str, str] = {}
    for where, expr in exprs:
        for name in re.findall(r"\bcloudmap_xds_[a-z_]+", expr):
            names.setdefault(re.sub(r"_(bucket|sum|count)$", "", name), where)
    return names


def test_dashboard_and_alerts_query_only_metrics_the_binary_exports(deploy):
    deploy.cloudmap.setup()
    ns_id = deploy.cloudmap.namespace_id
    gone = deploy.cloudmap.sd.create_service(Name="gone", NamespaceId=ns_id, HealthCheckCustomConfig={})["Service"]
    for z in ZONES:
        deploy.server(z, f"i-{z[-1]}1")
    cp = deploy.control_plane(extra_args=["--services-interval", "1s"])
    client = deploy.client(A, node_id="client-a1")
    deploy.wait_first_success(client)
    # A Cloud Map error (the service deleted under the watcher) makes the error counter appear.
    deploy.cloudmap.sd.delete_service(Id=gone["Id"])

    def exported():
        families = {name for name, _, _ in cp.metrics()}
        families |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in families}
        return families if "cloudmap_xds_cloudmap_errors_total" in families else None

    families = wait_until(exported, 15, "a Cloud Map error counted")
    wanted = queried_metrics()
    missing = {name: where for name, where in wanted.items() if name not in families}
    assert not missing, f"queried but not exported: {missing}\nexported: {sorted(families)}"
    assert "cloudmap_xds_cross_zone_share" in wanted and "cloudmap_xds_max_streams" in wanted
