"""A proxyless gRPC (grpcio, C-core xDS) client for the integration tests.

Run with GRPC_XDS_BOOTSTRAP pointing at an A27 bootstrap file. It dials the target
(default xds:///echo.demo), calls demo.v1.Describer/Describe in a loop and prints one
JSON line per call to stdout, flushed:

    {"t": unix_time, "ok": bool, "zone": ..., "instance": ..., "error": ..., "code": ...}

The demo_pb2 / demo_pb2_grpc stubs must be importable (PYTHONPATH or --stubs DIR).
The loop is bounded by --max-seconds so the process always ends by itself; the test
harness stops it long before that.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="xds:///echo.demo")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between calls")
    ap.add_argument("--deadline", type=float, default=2.0, help="per-call deadline, seconds")
    ap.add_argument("--caller", default="xds-client")
    ap.add_argument("--metadata", action="append", default=[], help="KEY=VALUE request metadata (repeatable)")
    ap.add_argument("--stubs", default=None, help="directory holding demo_pb2*.py")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop after this long")
    ap.add_argument("--max-calls", type=int, default=0, help="stop after this many calls (0: no limit)")
    ap.add_argument(
        "--first-wait-for-ready",
        type=float,
        default=0.0,
        help="until the first success, calls use wait_for_ready with this deadline (0: off, the "
        "default: fail-fast calls wait while the channel connects and report why it cannot)",
    )
    args = ap.parse_args()

    if args.stubs:
        sys.path.insert(0, args.stubs)
    import grpc  # noqa: E402
    import demo_pb2  # noqa: E402
    import demo_pb2_grpc  # noqa: E402

    # SIGTERM keeps its default action (end the process at once, even inside a blocking call):
    # every line written so far has been flushed, so nothing is lost.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    metadata = tuple(tuple(kv.split("=", 1)) for kv in args.metadata) or None
    channel = grpc.insecure_channel(args.target)
    stub = demo_pb2_grpc.DescriberStub(channel)
    out = sys.stdout
    started = time.monotonic()
    had_success = False
    calls = 0
    next_at = time.monotonic()
    while True:
        if time.monotonic() - started > args.max_seconds:
            break
        if args.max_calls and calls >= args.max_calls:
            break
        warmup = not had_success and args.first_wait_for_ready > 0
        t = time.time()
        rec = {"t": t, "ok": False, "zone": None, "instance": None, "error": None, "code": None}
        if warmup:
            rec["warmup"] = True
        try:
            resp = stub.Describe(
                demo_pb2.DescribeRequest(caller=args.caller),
                timeout=args.first_wait_for_ready if warmup else args.deadline,
                wait_for_ready=True if warmup else None,
                metadata=metadata,
            )
            rec.update(ok=True, zone=resp.zone, instance=resp.instance_id, address=resp.address)
            had_success = True
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            rec.update(code=code.name if code is not None else None, error=(e.details() if hasattr(e, "details") else str(e)))
        except Exception as e:  # noqa: BLE001 — report every failure as a line
            rec.update(error=f"{type(e).__name__}: {e}")
        rec["dur"] = round(time.time() - t, 4)
        calls += 1
        try:
            out.write(json.dumps(rec) + "\n")
            out.flush()
        except BrokenPipeError:
            break
        next_at += args.interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
