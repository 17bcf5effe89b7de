"""Health endpoints for the sandbox and the tests, switchable between healthy and failing.

``python -m sandbox.health --port PORT`` serves on ``127.0.0.1:PORT``:

* ``GET /<region>/<service>/health``: 200 ``{"status": "ok"}`` while healthy, 503 ``{"status": "failing"}``
  otherwise (a service never switched is healthy);
* ``POST /<region>/<service>/state`` with ``{"healthy": false}`` switches one service;
  ``POST /<region>/state`` switches every service of the region, those not yet seen included;
* ``GET /state`` lists the switches; ``POST /reset`` makes everything healthy again.

:class:`HealthServer` runs the same server in a background thread.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HealthBoard:
    """Which region and service is healthy; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[str, bool] = {}
        self._regions: dict[str, bool] = {}

    def set(self, region: str, service: str | None, healthy: bool) -> None:
        with self._lock:
            if service is None:
                self._regions[region] = healthy
                for key in [k for k in self._services if k.startswith(f"{region}/")]:
                    del self._services[key]
            else:
                self._services[f"{region}/{service}"] = healthy

    def healthy(self, region: str, service: str) -> bool:
        with self._lock:
            return self._services.get(f"{region}/{service}", self._regions.get(region, True))

    def reset(self) -> None:
        with self._lock:
            self._services.clear()
            self._regions.clear()

    def snapshot(self) -> dict:
        with self._lock:
            return {"regions": dict(self._regions), "services": dict(self._services)}


def _handler(board: HealthBoard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dr-sandbox-health/1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            return

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _parts(self) -> list[str]:
            return [p for p in self.path.split("?", 1)[0].split("/") if p]

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parts = self._parts()
            if parts == ["state"]:
                self._reply(200, board.snapshot())
            elif len(parts) == 3 and parts[2] == "health":
                ok = board.healthy(parts[0], parts[1])
                self._reply(200 if ok else 503, {"status": "ok" if ok else "failing",
                                                 "region": parts[0], "service": parts[1]})
            else:
                self._reply(404, {"error": f"unknown path {self.path}"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            parts = self._parts()
            if parts == ["reset"]:
                board.reset()
                self._reply(200, board.snapshot())
                return
            if not parts or parts[-1] != "state" or len(parts) not in (2, 3):
                self._reply(404, {"error": f"unknown path {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                healthy = body["healthy"]
                if not isinstance(healthy, bool):
                    raise ValueError("healthy must be true or false")
            except (ValueError, KeyError, TypeError) as exc:
                self._reply(400, {"error": f"expected {{\"healthy\": true|false}}: {exc}"})
                return
            board.set(parts[0], parts[1] if len(parts) == 3 else None, healthy)
            self._reply(200, board.snapshot())

    return Handler


class HealthServer:
    """The health endpoints in a background thread: ``HealthServer().start()``; ``url`` is its base URL."""

    def __init__(self, port: int = 0) -> None:
        self.board = HealthBoard()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self.board))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-endpoints", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def endpoint(self, region: str, service: str) -> str:
        return f"{self.url}/{region}/{service}/health"

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def set_healthy(self, region: str, healthy: bool, service: str | None = None) -> None:
        self.board.set(region, service, healthy)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.health", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args(argv)
    server = HealthServer(args.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server._server.shutdown).start())
    print(f"Health endpoints listening on {server.url}", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
