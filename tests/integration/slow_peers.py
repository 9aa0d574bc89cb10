"""Slow peers for tests/integration/test_limits.py, run as subprocesses.

    python slow_peers.py serve --stubs DIR --zone Z --instance-id ID [--delay 4]
        A grpc.aio demo.v1.Describer server on 127.0.0.1 (a free port) whose Describe sleeps
        --delay seconds, or the `delay-ms` request metadata when given, before answering
        (with --fail-code CODE, e.g. UNAVAILABLE, it answers every call with that status).
        Prints `slow-server listening on HOST:PORT zone=Z instance=ID` once serving.

    python slow_peers.py burst --stubs DIR --target T [--authority A] --calls N --delay-ms MS
        One warm-up call (wait_for_ready, delay 0) until the channel works, then N concurrent
        Describe calls (grpc.aio, one channel) asking for MS of delay each; prints one JSON line
        {"ok": .., "failed": .., "errors": {"CODE: details": count}, "seconds": ..}.
        With an xds:/// target, GRPC_XDS_BOOTSTRAP must name the bootstrap file.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import time


async def serve(args) -> None:
    import grpc
    import demo_pb2
    import demo_pb2_grpc

    served = 0

    class Describer(demo_pb2_grpc.DescriberServicer):
        async def Describe(self, request, context):
            nonlocal served
            delay = args.delay
            for key, value in context.invocation_metadata():
                if key == "delay-ms":
                    delay = int(value) / 1000.0
            await asyncio.sleep(delay)
            served += 1
            if args.fail_code:
                await context.abort(getattr(grpc.StatusCode, args.fail_code), f"{args.instance_id} fails on purpose")
            return demo_pb2.DescribeResponse(
                instance_id=args.instance_id, zone=args.zone, region="us-east-1", address=address, served=served
            )

    # C-core queues at most 1000 calls the application has not picked up yet; a burst of 1,500
    # arriving at once must not meet that limit (it is the server under test here, not the client).
    server = grpc.aio.server(
        options=[("grpc.server.max_pending_requests", 10_000), ("grpc.server.max_pending_requests_hard_limit", 10_000)]
    )
    demo_pb2_grpc.add_DescriberServicer_to_server(Describer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    await server.start()
    print(f"slow-server listening on {address} zone={args.zone} instance={args.instance_id}", flush=True)
    await server.wait_for_termination()


async def burst(args) -> dict:
    import grpc
    import demo_pb2
    import demo_pb2_grpc

    options = [("grpc.default_authority", args.authority)] if args.authority else []
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stub = demo_pb2_grpc.DescriberStub(channel)
        warm_deadline = time.monotonic() + args.warmup
        while True:
            try:
                await stub.Describe(
                    demo_pb2.DescribeRequest(caller="warm-up"), timeout=5, wait_for_ready=True,
                    metadata=(("delay-ms", "0"),),
                )  # fmt: skip
                break
            except grpc.RpcError:
                if time.monotonic() > warm_deadline:
                    raise
                await asyncio.sleep(0.1)

        async def one(i: int):
            try:
                await stub.Describe(
                    demo_pb2.DescribeRequest(caller=f"burst-{i}"), timeout=args.deadline,
                    metadata=(("delay-ms", str(args.delay_ms)),),
                )  # fmt: skip
                return None
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(args.calls)))
        seconds = time.monotonic() - t0
    errors = collections.Counter(r for r in results if r is not None)
    return {
        "ok": sum(1 for r in results if r is None),
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common(5)),
        "seconds": round(seconds, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--stubs", required=True)
    s.add_argument("--zone", required=True)
    s.add_argument("--instance-id", required=True)
    s.add_argument("--delay", type=float, default=4.0)
    s.add_argument("--fail-code", default=None, help="answer every call with this status (e.g. UNAVAILABLE)")
    b = sub.add_parser("burst")
    b.add_argument("--stubs", required=True)
    b.add_argument("--target", required=True)
    b.add_argument("--authority", default=None)
    b.add_argument("--calls", type=int, required=True)
    b.add_argument("--delay-ms", type=int, required=True)
    b.add_argument("--deadline", type=float, default=30.0, help="per-call deadline, seconds")
    b.add_argument("--warmup", type=float, default=30.0, help="give up warming up after this long")
    args = ap.parse_args()
    sys.path.insert(0, args.stubs)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.mode == "serve":
        asyncio.run(serve(args))
        return 0
    print(json.dumps(asyncio.run(burst(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
