"""Raw xDS clients for the ops tests (test_ops.py), built on the envoy protos of `xds-protos`.

- AdsStream: one ADS (State-of-the-World) bidi stream over grpcio that the test drives by hand:
  it sends exactly the DiscoveryRequests the test asks for (subscribe, ACK, NACK) and records
  every DiscoveryResponse with its arrival time, and how the stream ended (grpc status).
- fetch_client_status: a CSDS FetchClientStatus unary call (to the admin port, where CSDS is
  served by default, or to the xDS port with --csds-on-xds-port).
- StalledH2Connection: an HTTP/2 connection written by hand on a plain socket that opens ADS
  streams, sends their requests and then never reads a single byte, so the control plane can
  only send what fits in the flow-control window (64 KiB by default) and the kernel buffers;
  everything else it would have to keep itself.

Nothing here starts a process; every socket and channel is closed by close().
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.rpc import status_pb2

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
CSDS_FETCH_METHOD = "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus"

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_URLS = (LDS, RDS, CDS, EDS)
SHORT = {LDS: "LDS", RDS: "RDS", CDS: "CDS", EDS: "EDS"}


def node(node_id: str, zone: str | None, user_agent: str = "ops-test raw-ads") -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster="ops-test", user_agent_name=user_agent)
    if zone:
        n.locality.region = "us-east-1"
        n.locality.zone = zone
    return n


def request(
    type_url: str,
    names: list[str] | tuple[str, ...],
    version: str = "",
    nonce: str = "",
    error: str | None = None,
    with_node: base_pb2.Node | None = None,
) -> discovery_pb2.DiscoveryRequest:
    r = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
    )
    if error is not None:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))  # INVALID_ARGUMENT, as clients send
    if with_node is not None:
        r.node.CopyFrom(with_node)
    return r


@dataclass
class Received:
    t: float
    response: discovery_pb2.DiscoveryResponse

    @property
    def type_url(self) -> str:
        return self.response.type_url


@dataclass
class Ended:
    code: grpc.StatusCode | None
    details: str | None
    t: float = field(default_factory=time.time)


class AdsStream:
    """One hand-driven ADS stream. The stream opens (and counts against --max-streams) when the
    object is made; send() queues a request; responses are read by a background thread into
    `received` (and handed to `on_response`, if given, from that thread)."""

    def __init__(self, xds_port: int, on_response=None, channel: grpc.Channel | None = None):
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(f"127.0.0.1:{xds_port}")
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.received: list[Received] = []
        self.ended: Ended | None = None
        self._ended_evt = threading.Event()
        self._new = threading.Condition(self._lock)
        self.on_response = on_response
        method = self.channel.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        self.call = method(self._requests())
        self._reader = threading.Thread(target=self._read, name="ads-raw-reader", daemon=True)
        self._reader.start()

    def _requests(self):
        while True:
            r = self._q.get()
            if r is None:
                return
            yield r

    def _read(self) -> None:
        try:
            for resp in self.call:
                rec = Received(time.time(), resp)
                with self._lock:
                    self.received.append(rec)
                    self._new.notify_all()
                if self.on_response is not None:
                    self.on_response(self, rec)
            end = Ended(grpc.StatusCode.OK, None)
        except grpc.RpcError as e:
            end = Ended(e.code(), e.details())
        with self._lock:
            self.ended = end
            self._new.notify_all()
        self._ended_evt.set()

    # -- driving ------------------------------------------------------------------------------

    def send(self, req: discovery_pb2.DiscoveryRequest) -> None:
        self._q.put(req)

    def subscribe(self, type_url: str, names, first_node: base_pb2.Node | None = None) -> None:
        self.send(request(type_url, names, with_node=first_node))

    # -- reading ------------------------------------------------------------------------------

    def responses(self, type_url: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if type_url is None or r.type_url == type_url]

    def wait_response(self, type_url: str, n: int = 1, timeout: float = 10.0) -> Received:
        """Wait until at least n responses of type_url arrived; return the n-th."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = [r for r in self.received if r.type_url == type_url]
                if len(got) >= n:
                    return got[n - 1]
                if self.ended is not None:
                    raise AssertionError(
                        f"ADS stream ended ({self.ended.code}: {self.ended.details}) before response #{n} "
                        f"of {SHORT.get(type_url, type_url)}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:.1f}s waiting for response #{n} of {SHORT.get(type_url, type_url)} "
                        f"(got {len(got)}; all: {[SHORT.get(r.type_url) for r in self.received]})"
                    )
                self._new.wait(left)

    def wait_ended(self, timeout: float = 10.0) -> Ended:
        if not self._ended_evt.wait(timeout):
            raise AssertionError(f"ADS stream did not end within {timeout:.1f}s")
        assert self.ended is not None
        return self.ended

    def close(self) -> None:
        self._q.put(None)
        try:
            self.call.cancel()
        except Exception:  # noqa: BLE001
            pass
        self._reader.join(timeout=5)
        if self._own_channel:
            self.channel.close()


def fetch_client_status(port: int, timeout: float = 5.0, **kw) -> csds_pb2.ClientStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        fetch = ch.unary_unary(
            CSDS_FETCH_METHOD,
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        return fetch(csds_pb2.ClientStatusRequest(**kw), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# A client that never reads: HTTP/2 by hand on a plain socket
# ---------------------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_DATA, FRAME_HEADERS, FRAME_SETTINGS = 0x0, 0x1, 0x4
FLAG_END_HEADERS = 0x4
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE default: the server's setting is never read
SEND_WINDOW = 65535  # the default initial windows: the server's WINDOW_UPDATEs are never read


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream_id & 0x7FFFFFFF) + payload


def _hpack_int(value: int, prefix_bits: int, first_byte: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte | value])
    out = bytearray([first_byte | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


class StalledH2Connection:
    """Opens `len(stream_requests)` ADS streams on one HTTP/2 connection, sends each stream's
    DiscoveryRequests (gRPC-framed) and then never reads the socket. Requests are kept small:
    without reading the server's SETTINGS and WINDOW_UPDATEs, the client may send at most the
    default 64 KiB per connection."""

    def __init__(self, port: int, stream_requests: list[list[discovery_pb2.DiscoveryRequest]]):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        # A small receive buffer, so the kernel holds little of what the server sends.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        out = bytearray(H2_PREFACE + _frame(FRAME_SETTINGS, 0, 0, b""))
        data_bytes = 0
        for i, reqs in enumerate(stream_requests):
            sid = 1 + 2 * i
            block = b"".join(
                _hpack_literal(k, v)
                for k, v in (
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", ADS_METHOD),
                    (":authority", f"127.0.0.1:{port}"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    ("user-agent", "ops-test-stalled-h2"),
                )
            )
            out += _frame(FRAME_HEADERS, FLAG_END_HEADERS, sid, block)
            body = b"".join(b"\x00" + struct.pack(">I", len(m)) + m for m in (r.SerializeToString() for r in reqs))
            data_bytes += len(body)
            for off in range(0, len(body), MAX_FRAME):
                out += _frame(FRAME_DATA, 0, sid, body[off : off + MAX_FRAME])  # no END_STREAM: stays open
        if data_bytes >= SEND_WINDOW:
            raise ValueError(f"{data_bytes} request bytes exceed the default HTTP/2 window; use fewer or smaller requests")
        self.sock.sendall(bytes(out))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
