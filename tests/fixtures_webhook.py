"""A local HTTP receiver that records every JSON body posted to it (a stand-in Slack webhook)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandbox.paths import free_port


class WebhookReceiver:
    """Posted JSON bodies, in arrival order."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/hooks/dr"
        self.messages: list[dict] = []
        self._lock = threading.Lock()

    def record(self, body: dict) -> None:
        with self._lock:
            self.messages.append(body)

    def texts(self) -> list[str]:
        with self._lock:
            return [m.get("text", "") for m in self.messages]

    def wait_for(self, predicate, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [t for t in self.texts() if predicate(t)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no matching webhook message within {timeout} s; received: {self.texts()}")


@pytest.fixture
def webhook():
    port = free_port()
    receiver = WebhookReceiver(port)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            try:
                receiver.record(json.loads(raw))
                self.send_response(200)
            except json.JSONDecodeError:
                self.send_response(400)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
def notifier(webhook, prefect_api) -> str:
    """A saved Slack-shaped webhook block posting to ``webhook``; returns its '<slug>/<name>'."""
    import uuid

    from blocks.notify import slack_compatible_webhook

    name = f"hook-{uuid.uuid4().hex[:8]}"
    slack_compatible_webhook(webhook.url).save(name)
    return f"custom-webhook/{name}"
