"""An HTTP/1.1 proxy in front of moto that can answer Cloud Map calls with throttling errors.

The control plane is pointed at it (AWS_ENDPOINT_URL). Every request is counted by operation
(the `X-Amz-Target` header of the awsJson1.1 protocol, e.g.
`Route53AutoNaming_v20170314.DiscoverInstancesRevision` → `DiscoverInstancesRevision`) and by
outcome. With `throttle_every = 2`, every other request (deterministic: the 1st, 3rd, 5th, ...
since throttling was switched on, counted over all operations) is answered

    HTTP/1.1 400 Bad Request
    x-amzn-ErrorType: RequestLimitExceeded
    Content-Type: application/x-amz-json-1.1
    {"__type":"RequestLimitExceeded","message":"Rate exceeded"}

— the awsJson1.1 error shape Cloud Map uses for data-plane throttling — and the rest is
forwarded to moto unchanged. `throttle_every = 0` forwards everything.

Keep-alive is supported both ways (the AWS SDK's HTTP client pools connections); one upstream
connection per handler thread.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

THROTTLE_BODY = json.dumps({"__type": "RequestLimitExceeded", "message": "Rate exceeded"}).encode()
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.throttle_every = 0
        self._lock = threading.Lock()
        self._n_since_on = 0
        self._upstream_conns = threading.local()  # one upstream connection per handler thread
        # (t, operation, throttled) per request
        self.log: list[tuple[float, str, bool]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                target = self.headers.get("X-Amz-Target") or ""
                op = target.rsplit(".", 1)[-1] if target else f"{self.command} {self.path}"
                throttled = proxy._decide(op)
                if throttled:
                    self.send_response(400)
                    self.send_header("x-amzn-ErrorType", "RequestLimitExceeded")
                    self.send_header("x-amzn-RequestId", "ops-test-throttle")
                    self.send_header("Content-Type", "application/x-amz-json-1.1")
                    self.send_header("Content-Length", str(len(THROTTLE_BODY)))
                    self.end_headers()
                    self.wfile.write(THROTTLE_BODY)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                for attempt in (1, 2):
                    conn = proxy._upstream_conns
                    up = getattr(conn, "c", None)
                    if up is None:
                        up = conn.c = http.client.HTTPConnection(*proxy.upstream, timeout=10)
                    try:
                        up.request(self.command, self.path, body=body, headers=headers)
                        resp = up.getresponse()
                        data = resp.read()
                        break
                    except (OSError, http.client.HTTPException):
                        up.close()
                        conn.c = None
                        if attempt == 2:
                            self.send_error(502)
                            return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _decide(self, op: str) -> bool:
        with self._lock:
            throttled = False
            if self.throttle_every:
                self._n_since_on += 1
                throttled = (self._n_since_on - 1) % self.throttle_every == 0
            self.log.append((time.time(), op, throttled))
            return throttled

    def set_throttle(self, every: int) -> None:
        with self._lock:
            self.throttle_every = every
            self._n_since_on = 0

    def counts(self, since: float, until: float) -> dict[str, dict[str, int]]:
        """{operation: {"total": n, "throttled": n}} for requests in [since, until)."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for t, op, thr in self.log:
                if since <= t < until:
                    c = out.setdefault(op, {"total": 0, "throttled": 0})
                    c["total"] += 1
                    c["throttled"] += int(thr)
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
