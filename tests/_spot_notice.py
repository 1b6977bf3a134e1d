"""A stand-in for the EC2 instance-metadata service's spot notice, on 127.0.0.1.

``GET /latest/meta-data/spot/instance-action`` answers 404 until ``give_notice()``, then
``{"action": "terminate", "time": "<two minutes ahead>"}``, as EC2 does. ``PUT /latest/api/token``
hands out an IMDSv2 session token; with ``require_token`` a GET without it is refused with 401
(instances launched with IMDSv2 required). Every GET of the notice path is timed in ``polls``.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN = "test-imds-token"


class SpotNoticeEndpoint:
    def __init__(self, require_token: bool = False):
        self.require_token = require_token
        self.notice: dict | None = None
        self.polls: list[float] = []  # time.monotonic() of each GET of the notice path
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{NOTICE_PATH}"

    def give_notice(self, action: str = "terminate") -> None:
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=2)
        self.notice = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def __enter__(self) -> SpotNoticeEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(endpoint: SpotNoticeEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                self._answer(200, TOKEN.encode())
            else:
                self._answer(400, b"")

        def do_GET(self) -> None:
            if self.path != NOTICE_PATH:
                self._answer(404, b"")
                return
            endpoint.polls.append(time.monotonic())
            if endpoint.require_token and self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                self._answer(401, b"")
            elif endpoint.notice is None:
                self._answer(404, b"")
            else:
                self._answer(200, json.dumps(endpoint.notice).encode(), "application/json")

        def _answer(self, status: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet: tests read no server log
            pass

    return Handler
