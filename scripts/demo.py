#!/usr/bin/env python3
"""The cloudmap-xds demo, end to end on one machine (run it through scripts/demo.sh).

What it does, on 127.0.0.1 only and with free ports:
  1. starts the Cloud Map emulator (moto), creates HTTP namespace `demo` and service `echo`
     (HealthCheckCustomConfig, so health can be set), starts six demo-servers (two per zone in
     us-east-1a/b/c) and registers them as ECS service discovery would, starts cloudmap-xds, and
     one `demo-client serve` per zone (its bootstrap written by `cloudmap-xds bootstrap --zone`);
  2. runs `demo-client load` from every zone at once (balanced census): ~100 % same zone;
  3. kills zone A's servers (SIGKILL, then UNHEALTHY in Cloud Map, as ECS would) while a load runs
     from zone A: the calls fail over to the other zones, < 1 % fail;
  4. a load from zone A once the control plane has seen the health change: 100 % other zones;
  5. ECS replaces the tasks (two new servers in zone A, the dead ones deregistered): every zone
     is back to ~100 % same zone;
then stops every process it started (by PID), unless --keep: then everything stays up, the
/describe URLs are printed and `scripts/demo.sh --stop` ends it.

--json: the human-readable report goes to stderr and one JSON summary line to stdout (also
written to LOG_DIR/summary.json). Exit status 0 when every expectation held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from harness import READY_LINE, REGION, ZONES, CloudMap, free_port, http_get, tail, wait_until  # noqa: E402

SERVICE = "echo"
NAMESPACE = "demo"
TARGET = f"xds:///{SERVICE}.{NAMESPACE}"
DIAL = f"{SERVICE}.{NAMESPACE}"
EDS_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SERVE_LINE = re.compile(r"demo-client listening on http://(?P<addr>[0-9.]+:\d+)")
STATE_FILE = ROOT / "target" / "cloudmap-xds-demo.json"

OUT = sys.stdout  # the human-readable report (stderr with --json)


def say(text: str = "") -> None:
    print(text, file=OUT, flush=True)


def short(zone: str) -> str:
    return zone.removeprefix(REGION)  # "us-east-1a" -> "a"


class Interrupted(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# processes: every one started here is listed in LOG_DIR/pids and stopped by PID
# ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn (not with --keep): SIGKILL the child if the demo itself dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 — best effort (Linux only)
        pass


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, exe: str, stdout: Path, stderr: Path):
        self.name, self.popen, self.pid, self.exe = name, popen, popen.pid, exe
        self.stdout, self.stderr = stdout, stderr

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        return f"--- {self.stderr} ---\n{tail(self.stderr, n)}"


class Procs:
    def __init__(self, log_dir: Path, keep: bool):
        self.log_dir = log_dir
        self.keep = keep
        self.all: list[Proc] = []
        self.pid_file = log_dir / "pids"

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, base_env: dict | None = None) -> Proc:
        """Starts args[0]; its environment is base_env (default: ours) updated with env."""
        stdout, stderr = self.log_dir / f"{name}.stdout", self.log_dir / f"{name}.stderr"
        with open(stdout, "wb") as fo, open(stderr, "wb") as fe:
            popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env={**(os.environ if base_env is None else base_env), "NO_COLOR": "1", **(env or {})},
                # Own session: a Ctrl-C reaches only the demo, which then stops everything in order.
                start_new_session=True,
                preexec_fn=None if self.keep else _die_with_parent,
            )
        p = Proc(name, popen, args[0], stdout, stderr)
        self.all.append(p)
        with open(self.pid_file, "a") as f:
            f.write(f"{p.pid} {p.exe} {name}\n")
        return p

    @staticmethod
    def stop(p: Proc, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        if p.popen.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait(timeout=10)

    def stop_all(self) -> list[str]:
        """Stops everything (reverse start order); returns the names of those that would not go."""
        for p in reversed(self.all):
            try:
                self.stop(p)
            except Exception as e:  # noqa: BLE001
                say(f"  could not stop {p.name} (pid {p.pid}): {e!r}")
        return [p.name for p in self.all if p.popen.poll() is None]


# ---------------------------------------------------------------------------------------------
# the pieces of the deployment
# ---------------------------------------------------------------------------------------------


def wait_file_line(p: Proc, path: Path, pattern: re.Pattern, timeout: float, what: str) -> re.Match:
    def found():
        m = pattern.search(path.read_text(errors="replace")) if path.exists() else None
        if m:
            return m
        if not p.alive():
            raise AssertionError(f"{p.name} exited ({p.popen.returncode}) before {what}:\n{p.log_tail()}")
        return None

    return wait_until(found, timeout, what)


class Demo:
    def __init__(self, args, log_dir: Path, procs: Procs):
        self.args = args
        self.log_dir = log_dir
        self.procs = procs
        self.cp_bin = bin_path("CLOUDMAP_XDS_BIN", "cloudmap-xds")
        self.server_bin = bin_path("DEMO_SERVER_BIN", "demo-server")
        self.client_bin = bin_path("DEMO_CLIENT_BIN", "demo-client")
        self.peers = Path(os.environ.get("PEERS_PY") or ROOT / ".peers" / "py")
        self.servers: dict[str, dict] = {}  # instance id -> {zone, addr, proc}
        self.serve: dict[str, dict] = {}  # zone -> {url, proc, bootstrap}
        self.cloudmap: CloudMap | None = None
        self.xds_port = 0
        self.admin = ""
        self.last_census_event = time.monotonic()  # a client (dis)connected
        self.summary: dict = {"ok": False, "log_dir": str(log_dir), "steps": {}, "failures": []}
        self.failures: list[str] = self.summary["failures"]

    # -- checks -----------------------------------------------------------------------------

    def expect(self, cond: bool, text: str) -> None:
        say(f"  {'✔' if cond else '✘'} {text}")
        if not cond:
            self.failures.append(text)

    # -- moto and Cloud Map -----------------------------------------------------------------

    def start_moto(self) -> None:
        exe = self.peers / "bin" / "moto_server"
        if not exe.exists():
            raise AssertionError(f"{exe} missing: run scripts/install-peers.sh")
        port = free_port()
        p = self.procs.start("moto", [str(exe), "-H", "127.0.0.1", "-p", str(port)])
        url = f"http://127.0.0.1:{port}"

        def up():
            if not p.alive():
                raise AssertionError(f"moto_server exited:\n{tail(p.stdout)}\n{tail(p.stderr)}")
            return http_get(url + "/moto-api/", timeout=1)[0] == 200

        wait_until(up, 30, f"moto at {url}")
        self.moto_url = url
        self.cloudmap = CloudMap(url).setup(namespace=NAMESPACE, service=SERVICE)
        say(f"  Cloud Map emulator (moto) on {url}: namespace {NAMESPACE!r} {self.cloudmap.namespace_id}, "
            f"service {SERVICE!r} {self.cloudmap.service_id} (HealthCheckCustomConfig)")  # fmt: skip

    def ecs_register(self, instance_id: str, host: str, port: int, zone: str) -> None:
        """What ECS service discovery does for a task: register it with these attributes, then
        report its container health through the custom health check."""
        attrs = CloudMap.ecs_attributes(host, port, zone, SERVICE)
        attrs.update(ECS_TASK_DEFINITION_FAMILY="echo", AWS_INIT_HEALTH_STATUS="HEALTHY")
        self.cloudmap.register_attrs(instance_id, attrs)
        self.cloudmap.set_health(instance_id, "HEALTHY")

    # -- demo-server ------------------------------------------------------------------------

    def start_server(self, zone: str, instance_id: str) -> None:
        p = self.procs.start(
            f"demo-server-{instance_id}",
            [str(self.server_bin), "--listen", "127.0.0.1:0", "--zone", zone, "--instance-id", instance_id],
            env={"RUST_LOG": "warn"},
        )
        m = wait_file_line(p, p.stdout, READY_LINE, 15, f"ready line of demo-server {instance_id}")
        host, port = m["host"], int(m["port"])
        self.ecs_register(instance_id, host, port, zone)
        self.servers[instance_id] = {"zone": zone, "addr": f"{host}:{port}", "proc": p}

    # -- control plane ----------------------------------------------------------------------

    def start_control_plane(self) -> None:
        self.xds_port = free_port()
        admin_port = free_port()
        while admin_port == self.xds_port:
            admin_port = free_port()
        self.admin = f"http://127.0.0.1:{admin_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDMAP_XDS_"))}
        env.update(
            AWS_REGION=REGION, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",
            AWS_ENDPOINT_URL=self.moto_url, AWS_EC2_METADATA_DISABLED="true",
            RUST_LOG=os.environ.get("CLOUDMAP_XDS_RUST_LOG", "info"), NO_COLOR="1",
        )  # fmt: skip
        args = [
            str(self.cp_bin), "--namespace", NAMESPACE,
            "--xds-listen", f"127.0.0.1:{self.xds_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
            "--revision-interval", "500ms", "--refresh-interval", "2s",
            "--census-debounce", f"{self.args.census_debounce:g}s",
        ]  # fmt: skip
        # Nothing from the caller's AWS or CLOUDMAP_XDS_* settings leaks in (clap reads CLOUDMAP_XDS_*).
        p = self.procs.start("cloudmap-xds", args, base_env=env)
        self.cp = p

        def ready():
            if not p.alive():
                raise AssertionError(f"cloudmap-xds exited ({p.popen.returncode}):\n{p.log_tail(40)}")
            return http_get(self.admin + "/ready", timeout=1)[0] == 200

        wait_until(ready, 30, f"{self.admin}/ready == 200 (first Cloud Map sync)")
        say(f"  cloudmap-xds: ADS on 127.0.0.1:{self.xds_port}, admin {self.admin}, operator page {self.admin}/ui (policy zone-aware,")
        say(f"    revision poll 500ms, refresh 2s, census debounce {self.args.census_debounce:g}s: the load tool's")
        say("    short-lived clients come and go within it, so they do not move the zones' shares)")

    def config_dump(self) -> dict:
        status, body = http_get(self.admin + "/config_dump", timeout=2)
        if status != 200:
            raise RuntimeError(f"/config_dump answered {status}")
        return json.loads(body)

    def service_dump(self) -> dict:
        return next((s for s in self.config_dump()["services"] if s["name"] == DIAL), {})

    def synced(self, census: dict[str, int] | None, capacity: dict[str, int] | None = None) -> bool:
        """The applied census (when given) and the healthy capacity are as given, and every client
        subscribed to the service has ACKed the newest EDS sent to it."""
        dump = self.config_dump()
        svc = next((s for s in dump["services"] if s["name"] == DIAL), None)
        self._last_dump = {"service": svc, "clients": dump["clients"]}
        if svc is None or (census is not None and svc["census"] != census):
            return False
        if capacity is not None and {z: c for z, c in svc["capacity"].items() if c} != capacity:
            return False
        for cl in dump["clients"]:
            eds = next((t for t in cl["types"] if t["type_url"] == EDS_TYPE), None)
            if eds is not None and DIAL in eds["subscribed"]:
                if not eds["last_sent"] or eds["last_acked"] != eds["last_sent"]:
                    return False
        return True

    def wait_synced(self, census: dict[str, int] | None, capacity: dict[str, int] | None = None,
                    timeout: float = 20) -> None:  # fmt: skip
        try:
            wait_until(lambda: self.synced(census, capacity), timeout,
                       f"control plane: census {census}, capacity {capacity}, every client ACKed its EDS",
                       interval=0.1)  # fmt: skip
        except AssertionError as e:
            svc = (getattr(self, "_last_dump", None) or {}).get("service") or {}
            raise AssertionError(f"{e}; /config_dump has census {svc.get('census')}, capacity {svc.get('capacity')}") from None

    # -- demo-client ------------------------------------------------------------------------

    def bootstrap(self, node_id: str, zone: str) -> Path:
        path = self.log_dir / f"bootstrap-{node_id}.json"
        r = subprocess.run(
            [str(self.cp_bin), "bootstrap", "--server-uri", f"127.0.0.1:{self.xds_port}", "--zone", zone,
             "--node-id", node_id, "--cluster", "demo-client", "--output", str(path)],
            capture_output=True, text=True, timeout=30,
            env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDMAP_XDS_", "ECS_"))},
        )  # fmt: skip
        if r.returncode != 0:
            raise AssertionError(f"cloudmap-xds bootstrap failed ({r.returncode}): {r.stderr}")
        return path

    def start_serve(self, zone: str) -> None:
        node = f"demo-client-{short(zone)}"
        bs = self.bootstrap(node, zone)
        p = self.procs.start(
            node,
            [str(self.client_bin), "serve", "--listen", "127.0.0.1:0", "--target", TARGET],
            env={"GRPC_XDS_BOOTSTRAP": str(bs), "RUST_LOG": "info"},
        )
        self.last_census_event = time.monotonic()
        m = wait_file_line(p, p.stderr, SERVE_LINE, 15, f"listening line of {node}")
        self.serve[zone] = {"url": f"http://{m['addr']}", "proc": p, "bootstrap": bs}

    def describe(self, zone: str) -> tuple[int, dict]:
        status, body = http_get(self.serve[zone]["url"] + "/describe", timeout=5)
        return status, json.loads(body)

    def load(self, zone: str, n: int, c: int, tag: str, bs: Path | None = None, timeline: Path | None = None) -> tuple[Proc, Path]:
        node = f"demo-load-{short(zone)}-{tag}"
        bs = bs or self.bootstrap(node, zone)
        extra = ["--timeline", str(timeline)] if timeline else []
        p = self.procs.start(
            node,
            [str(self.client_bin), "load", "--target", TARGET, "-n", str(n), "-c", str(c), "--json", *extra],
            env={"GRPC_XDS_BOOTSTRAP": str(bs)},
        )
        self.last_census_event = time.monotonic()
        return p, p.stdout

    def finish_load(self, p: Proc, timeout: float = 60) -> dict:
        try:
            p.popen.wait(timeout=timeout)
            self.last_census_event = time.monotonic()
        except subprocess.TimeoutExpired:
            Procs.stop(p)
            raise AssertionError(f"{p.name} did not finish within {timeout}s:\n{p.log_tail()}") from None
        text = p.stdout.read_text(errors="replace").strip()
        try:
            report = json.loads(text.splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(f"{p.name} exited {p.popen.returncode} without a JSON report:\n{p.log_tail()}") from None
        report["exitCode"] = p.popen.returncode
        return report

    def settle_census(self) -> None:
        """Wait until no census change is pending in the control plane. It applies connects and
        disconnects in windows of --census-debounce that start at a change (and one more window
        when changes came in during the first), so two windows after the last change it is quiet;
        the next loads then start a fresh window and are done before it closes."""
        wait = self.last_census_event + 2 * self.args.census_debounce + 0.3 - time.monotonic()
        if wait > 0:
            say(f"  (letting the census settle for {wait:.1f} s, so no earlier (dis)connect is applied mid-load)")
            time.sleep(wait)

    def parallel_loads(self, n: int, c: int, tag: str) -> dict[str, dict]:
        self.settle_census()
        # Bootstraps first, then the three loads back to back, so they overlap as much as they can.
        bootstraps = {z: self.bootstrap(f"demo-load-{short(z)}-{tag}", z) for z in ZONES}
        t0 = time.monotonic()
        running = {z: self.load(z, n, c, tag, bootstraps[z])[0] for z in ZONES}
        ended: dict[str, float] = {}
        deadline = t0 + 60
        while len(ended) < len(running) and time.monotonic() < deadline:
            for z, p in running.items():
                if z not in ended and not p.alive():
                    ended[z] = time.monotonic() - t0
            time.sleep(0.01)
        reports = {z: self.finish_load(p) for z, p in running.items()}
        for z, r in reports.items():
            r["wallSeconds"] = round(ended.get(z, time.monotonic() - t0), 3)
            (self.log_dir / f"load-{tag}-{short(z)}.json").write_text(json.dumps(r, indent=2))
        return reports


def bin_path(env: str, name: str) -> Path:
    p = Path(os.environ.get(env) or ROOT / "target" / "debug" / name)
    if not p.is_absolute():
        p = ROOT / p
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise AssertionError(f"{p} is not an executable (scripts/demo.sh builds it: cargo build --bins)")
    return p


# ---------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------


def render(report: dict, indent: str = "    ") -> str:
    """demo-client load's own table layout, from its --json report."""
    cz = report["clientZone"]
    lines = [f"{report['total']} calls: {report['ok']} ok, {report['failed']} failed; client zone {cz}", ""]
    lines.append(f"{'zone':<14} {'count':>7} {'%':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for z, s in report["zones"].items():
        mark = "  ← same zone" if z == cz else ""
        lines.append(f"{z:<14} {s['count']:>7} {s['share'] * 100:>6.1f}% {s['p50Ms']:>9.2f} {s['p99Ms']:>9.2f}{mark}")
    lines.append("")
    lines.append(f"{'instance':<14} {'zone':<12} {'count':>7} {'%':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for i, s in report["instances"].items():
        lines.append(f"{i:<14} {s['zone']:<12} {s['count']:>7} {s['share'] * 100:>6.1f}% {s['p50Ms']:>9.2f} {s['p99Ms']:>9.2f}")
    lines.append("")
    lines.append(f"same-zone share: {report['sameZoneShare'] * 100:.1f}%   failed calls: {report['failed']}")
    for e, k in report.get("errors", {}).items():
        lines.append(f"  {k:>6} × {e}")
    return "\n".join(indent + l if l else "" for l in lines)


def matrix(reports: dict[str, dict]) -> str:
    head = f"    {'client in':<12}" + "".join(f"{'→ ' + z:>14}" for z in ZONES) + f"{'failed':>9}{'same zone':>12}"
    rows = [head]
    for cz, r in reports.items():
        cells = "".join(f"{r['zones'].get(z, {}).get('count', 0):>14}" for z in ZONES)
        rows.append(f"    {cz:<12}{cells}{r['failed']:>9}{r['sameZoneShare'] * 100:>11.1f}%")
    return "\n".join(rows)


def split_timeline(path: Path, at_unix_ms: int) -> dict[str, dict[str, int]]:
    """{"before": {zone or "failed": calls}, "after": {...}} from a `demo-client load --timeline`
    file, split at the kill."""
    out: dict[str, dict[str, int]] = {"before": {}, "after": {}}
    for line in path.read_text().splitlines():
        at, _, zone = line.partition(" ")
        if not at.isdigit():
            continue
        side = out["before" if int(at) < at_unix_ms else "after"]
        key = "failed" if zone == "-" else zone
        side[key] = side.get(key, 0) + 1
    return out


def render_split(split: dict[str, dict[str, int]], client_zone: str, indent: str = "    ") -> str:
    head = f"{indent}{'calls':<14}" + "".join(f"{'→ ' + z:>14}" for z in ZONES) + f"{'failed':>9}{'same zone':>12}"
    rows = [head]
    for side, label in (("before", "before kill"), ("after", "after kill")):
        counts = split[side]
        ok = sum(v for k, v in counts.items() if k != "failed")
        same = counts.get(client_zone, 0) / ok * 100 if ok else 0.0
        cells = "".join(f"{counts.get(z, 0):>14}" for z in ZONES)
        rows.append(f"{indent}{label:<14}{cells}{counts.get('failed', 0):>9}{same:>11.1f}%")
    return "\n".join(rows)


def failed_share(r: dict) -> float:
    return r["failed"] / r["total"] if r["total"] else 1.0


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def run(demo: Demo, args) -> None:
    t_start = time.monotonic()
    step = demo.summary["steps"]
    n, c = args.requests, args.concurrency

    say("Step 1: Cloud Map emulator, six echo servers registered like ECS, cloudmap-xds, one client per zone")
    demo.start_moto()
    for z in ZONES:
        for k in (1, 2):
            demo.start_server(z, f"echo-{short(z)}{k}")
    for iid, s in demo.servers.items():
        say(f"  demo-server {iid:<9} {s['zone']}  {s['addr']:<16} pid {s['proc'].pid}  registered, HEALTHY")
    demo.start_control_plane()
    for z in ZONES:
        demo.start_serve(z)
    capacity = {z: 2 for z in ZONES}
    census = {z: 1 for z in ZONES}
    demo.wait_synced(census, capacity)
    say(f"  census (clients per zone) {census}, capacity (healthy servers per zone) {capacity}")
    describes = {}
    for z in ZONES:
        status, body = demo.describe(z)
        describes[z] = {"status": status, "body": body}
        shown = {k: body.get(k) for k in ("zone", "instanceId", "clientZone", "latencyMs", "requestId")}
        if isinstance(shown["latencyMs"], float):
            shown["latencyMs"] = round(shown["latencyMs"], 2)
        say(f"  curl {demo.serve[z]['url']}/describe → {status} {json.dumps(shown, separators=(',', ':'))}")
    step["setup"] = {
        "seconds": round(time.monotonic() - t_start, 2),
        "census": census, "capacity": capacity, "describe": describes,
        "serve_urls": {z: s["url"] + "/describe" for z, s in demo.serve.items()},
    }  # fmt: skip
    say(f"  (ready after {step['setup']['seconds']:.1f} s)")

    say()
    say(f"Step 2: each zone's client calls echo.demo {n} times ({c} workers; the three zones at once, so the")
    say("        census stays balanced) — expect ~100 % same zone")
    t0 = time.monotonic()
    balanced = demo.parallel_loads(n, c, "balanced")
    for z, r in balanced.items():
        say(f"  client in {z}:")
        say(render(r))
        say()
    say(matrix(balanced))
    for z, r in balanced.items():
        demo.expect(r["sameZoneShare"] >= 0.95 and r["failed"] == 0,
                    f"{z}: {r['sameZoneShare'] * 100:.1f} % same zone (want ≥ 95 %), {r['failed']} failed")  # fmt: skip
    step["balanced"] = {"seconds": round(time.monotonic() - t0, 2), "reports": balanced}
    # calls per second of one load process, to size the failover load
    rate = min(r["total"] / max(r["wallSeconds"], 0.05) for r in balanced.values())

    dead = ZONES[0]
    victims = [iid for iid, s in demo.servers.items() if s["zone"] == dead]
    others = [z for z in ZONES if z != dead]
    n_fail = int(min(max(rate * args.failover_seconds, 2000), 50000))
    say()
    say(f"Step 3: zone {dead} fails while its client is under load: {n_fail} calls from {dead}; after "
        f"{args.kill_after:.1f} s")  # fmt: skip
    say(f"        its servers {', '.join(victims)} are killed (SIGKILL) and marked UNHEALTHY in Cloud Map")
    say(f"        — expect the calls to move to {' and '.join(others)}, < 1 % failed")
    t0 = time.monotonic()
    timeline = demo.log_dir / "load-failover.timeline"
    p, _ = demo.load(dead, n_fail, c, "failover", timeline=timeline)
    time.sleep(args.kill_after)
    t_kill = time.monotonic()
    kill_unix_ms = int(time.time() * 1000)
    if not p.alive():
        say(f"  (the load ended before the kill: {p.popen.returncode})")
    for iid in victims:
        Procs.stop(demo.servers[iid]["proc"], signal.SIGKILL)
    killed_at = round(time.monotonic() - t0, 3)
    for iid in victims:
        demo.cloudmap.set_health(iid, "UNHEALTHY")
    say(f"  {time.monotonic() - t0:5.2f} s  killed {', '.join(victims)}; Cloud Map health → UNHEALTHY")
    # When does the control plane notice (health changes are read every --refresh-interval)?
    noticed = None
    try:
        wait_until(lambda: demo.service_dump().get("capacity", {}).get(dead, 0) == 0, 15,
                   f"control plane: no healthy capacity left in {dead}", interval=0.05)  # fmt: skip
        noticed = round(time.monotonic() - t_kill, 2)
        say(f"  {time.monotonic() - t0:5.2f} s  cloudmap-xds read the health change ({noticed:.2f} s after the kill) "
            "and pushed new EDS")  # fmt: skip
    except AssertionError as e:
        demo.expect(False, str(e))
    failover = demo.finish_load(p, timeout=120)
    (demo.log_dir / "load-failover.json").write_text(json.dumps(failover, indent=2))
    say(f"  {time.monotonic() - t0:5.2f} s  load finished")
    say(render(failover))
    split = split_timeline(timeline, kill_unix_ms)
    say()
    say(render_split(split, dead))
    moved = sum(failover["zones"].get(z, {}).get("count", 0) for z in others)
    moved_share = moved / failover["ok"] if failover["ok"] else 0.0
    demo.expect(failed_share(failover) < 0.01,
                f"{failover['failed']} of {failover['total']} calls failed ({failed_share(failover) * 100:.2f} %, want < 1 %)")  # fmt: skip
    # The calls made before the kill stay in the zone; how many depends on the machine's speed, so
    # ask only for a clear move here — step 4 shows that nothing goes to the dead zone afterwards.
    demo.expect(moved_share >= 0.2, f"{moved_share * 100:.1f} % of the calls went to {' and '.join(others)}")
    step["failover"] = {
        "zone": dead, "killed": victims, "killed_at_s": killed_at, "noticed_after_s": noticed,
        "seconds": round(time.monotonic() - t0, 2), "report": failover, "moved_share": round(moved_share, 4),
        "before_kill": split["before"], "after_kill": split["after"],
    }  # fmt: skip

    say()
    say(f"Step 4: zone {dead} is still down; its client calls again {n} times — expect 0 % in {dead}, 0 failed")
    t0 = time.monotonic()
    # (The applied census may still count the failover load's client: with no capacity in the dead
    # zone its leaving moves no share, so the control plane keeps the census it has.)
    demo.wait_synced(None, {z: 2 for z in others})
    p, _ = demo.load(dead, n, c, "after")
    after = demo.finish_load(p)
    (demo.log_dir / "load-after.json").write_text(json.dumps(after, indent=2))
    say(render(after))
    in_dead = after["zones"].get(dead, {}).get("count", 0)
    demo.expect(in_dead == 0 and after["failed"] == 0 and after["ok"] == after["total"],
                f"{in_dead} calls to {dead}, {after['failed']} failed, "
                f"{' / '.join(str(after['zones'].get(z, {}).get('count', 0)) for z in others)} to {' / '.join(others)}")  # fmt: skip
    step["after"] = {"seconds": round(time.monotonic() - t0, 2), "report": after}

    say()
    say(f"Step 5: ECS replaces the tasks: two new servers in {dead} register, the dead ones are deregistered;")
    say("        every zone calls again at once — expect ~100 % same zone")
    t0 = time.monotonic()
    for iid in victims:
        demo.cloudmap.deregister(iid)
        del demo.servers[iid]
    for k in (3, 4):
        iid = f"echo-{short(dead)}{k}"
        demo.start_server(dead, iid)
        say(f"  demo-server {iid:<9} {dead}  {demo.servers[iid]['addr']:<16} pid {demo.servers[iid]['proc'].pid}"
            "  registered, HEALTHY")  # fmt: skip
    demo.wait_synced(census, capacity)
    recovered = demo.parallel_loads(n, c, "recovered")
    say(matrix(recovered))
    for z, r in recovered.items():
        demo.expect(r["sameZoneShare"] >= 0.95 and r["failed"] == 0,
                    f"{z}: {r['sameZoneShare'] * 100:.1f} % same zone (want ≥ 95 %), {r['failed']} failed")  # fmt: skip
    step["recovered"] = {"seconds": round(time.monotonic() - t0, 2), "reports": recovered}


def still_running(pids: list[dict]) -> list[dict]:
    """The listed processes that still run the same executable (not a reused PID; a script such
    as moto_server shows up as its interpreter followed by the script)."""
    out = []
    for p in pids:
        try:
            argv = Path(f"/proc/{p['pid']}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if p["exe"] in argv[:2]:
            out.append(p)
    return out


def stop_kept() -> int:
    if not STATE_FILE.exists():
        print("demo: nothing to stop (no --keep demo is recorded)")
        return 0
    state = json.loads(STATE_FILE.read_text())
    alive = still_running(state["pids"])
    for p in reversed(alive):
        try:
            os.kill(p["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while still_running(alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in still_running(alive):
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    STATE_FILE.unlink()
    print(f"demo: stopped {len(alive)} processes: " + ", ".join(f"{p['name']} ({p['pid']})" for p in alive))
    print(f"demo: logs were in {state['log_dir']}")
    return 0


def main() -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-dir", type=Path, help="where the logs go (scripts/demo.sh makes a temp dir)")
    ap.add_argument("--stop", action="store_true", help="stop what a --keep run left running")
    ap.add_argument("--keep", action="store_true", help="leave everything running at the end")
    ap.add_argument("--json", action="store_true", help="report on stderr, one JSON summary line on stdout")
    ap.add_argument("-n", "--requests", type=int, default=600, help="calls per load (default 600)")
    ap.add_argument("-c", "--concurrency", type=int, default=4, help="workers per load (default 4)")
    ap.add_argument("--failover-seconds", type=float, default=4.0, help="how long the failover load should last")
    ap.add_argument("--kill-after", type=float, default=0.8, help="seconds into the failover load to kill the zone")
    ap.add_argument("--census-debounce", type=float, default=5.0,
                    help="the control plane's --census-debounce in seconds (default 5)")  # fmt: skip
    args = ap.parse_args()
    if args.stop:
        return stop_kept()
    if args.log_dir is None:
        ap.error("--log-dir is required")
    if args.keep and STATE_FILE.exists() and still_running(json.loads(STATE_FILE.read_text())["pids"]):
        print(f"demo: a --keep demo is still running ({STATE_FILE}); stop it first: scripts/demo.sh --stop",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        OUT = sys.stderr
    t_start = time.monotonic()

    def on_signal(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    log_dir = args.log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = Procs(log_dir, keep=args.keep)
    demo = None
    summary: dict = {"ok": False, "log_dir": str(log_dir), "failures": []}
    kept = False
    try:
        demo = Demo(args, log_dir, procs)
        summary = demo.summary
        summary["binaries"] = {"cloudmap-xds": str(demo.cp_bin), "demo-server": str(demo.server_bin),
                               "demo-client": str(demo.client_bin)}  # fmt: skip
        run(demo, args)
        summary["ok"] = not demo.failures
    except Interrupted as e:
        say(f"\ninterrupted ({e}): stopping everything")
        summary["failures"].append(f"interrupted by {e}")
    except Exception as e:  # noqa: BLE001 — report, then clean up
        say(f"\nFAILED: {e}")
        summary["failures"].append(f"{type(e).__name__}: {e}")
        if demo is not None and getattr(demo, "cp", None) is not None:
            say(demo.cp.log_tail(30))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        summary["pids"] = [{"name": p.name, "pid": p.pid, "exe": p.exe} for p in procs.all]
        summary["wall_seconds"] = round(time.monotonic() - t_start, 2)
        say()
        if args.keep and summary["ok"] and demo is not None:
            kept = True
            alive = [p for p in procs.all if p.alive()]
            STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
            STATE_FILE.write_text(json.dumps({"log_dir": str(log_dir), "pids": summary["pids"]}, indent=2))
            say("Everything is still running (--keep):")
            for z, s in demo.serve.items():
                say(f"  curl {s['url']}/describe        # client in {z}")
            say(f"  open {demo.admin}/ui              # the operator page: zones, traffic matrix, clients")
            say(f"  curl {demo.admin}/config_dump      # the control plane's view")
            say(f"  Cloud Map emulator: {demo.moto_url}   ADS: 127.0.0.1:{demo.xds_port}")
            say(f"Stop it with: scripts/demo.sh --stop      (or: kill {' '.join(str(p.pid) for p in alive)})")
            summary["serve_urls"] = {z: s["url"] + "/describe" for z, s in demo.serve.items()}
            summary["ui_url"] = demo.admin + "/ui"
        else:
            left = procs.stop_all()
            summary["left_running"] = left
            if left:
                say(f"could not stop: {left}")
                summary["ok"] = False
            say(f"Stopped all {len(procs.all)} processes the demo started.")
        summary["kept"] = kept
        say(f"Logs: {log_dir}")
        verdict = "OK" if summary["ok"] else "FAILED: " + "; ".join(summary["failures"])
        say(f"Demo {verdict} — {summary['wall_seconds']:.1f} s")
        (log_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if args.json:
            print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
