"""Serve a publish bundle on 127.0.0.1, so its Netron viewer can load the graphs beside it.

Netron's web app loads its ES modules and the graph by URL, which a ``file://`` page may not
do, so the bundle needs an HTTP server; this one listens on loopback only and logs nothing.

    python -m stages.viewer.serve serve DIR [--port N]
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stages.core.errors import ArtifactError, GptpipeError

LANDING = "index.html"  # the bundle's landing page, at its root: what tells a bundle from any directory


class _QuietHandler(SimpleHTTPRequestHandler):
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",  # Netron loads its modules as ES modules: needs a JS MIME type
        ".onnx": "application/octet-stream",
        ".pt2": "application/octet-stream",
        ".data": "application/octet-stream",
    }

    def log_message(self, format: str, *args) -> None:
        pass


def serve_bundle(directory: str | Path, port: int = 0) -> ThreadingHTTPServer:
    """Serve ``directory`` on 127.0.0.1:``port`` (0 = any free port) from a daemon thread.

    The caller stops it with ``server.shutdown()``; ``server.server_address[1]`` is the port.
    """
    directory = Path(directory).resolve()
    if not (directory / LANDING).is_file():
        raise ArtifactError(f"{directory}: no {LANDING}; pass the output directory of stage 'publish'")
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise GptpipeError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another --port") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="bundle-serve", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.viewer.serve", description="Serve a Netron bundle locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a publish artifact on 127.0.0.1")
    serve.add_argument("directory", help="output directory of stage 'publish'")
    serve.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0 = any free port)")
    args = parser.parse_args(argv)
    try:
        server = serve_bundle(args.directory, args.port)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {args.directory} at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
