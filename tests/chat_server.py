"""A real chat-completions HTTP server on 127.0.0.1 for the LLM tests (no network).

Each request takes the next reply from ``script`` (the last one repeats):

- ``"some text"``: HTTP 200 with that as the assistant's message content;
- ``("slow", seconds, text)``: the same after sleeping ``seconds``;
- ``("status", code, body)``: HTTP ``code`` with a JSON error body (``body``: str);
- ``("raw", code, bytes)``: exactly these bytes as a text/html body.

``requests`` records each request's path, headers (lower-case names) and JSON body.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, script=None):
        self.script = list(script or ['{"concepts": ["clothing"]}'])
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"unparsed": raw.decode(errors="replace")}
                with server._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    server.requests.append({"path": self.path, "headers": headers, "body": body})
                    step = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                try:
                    server._reply(self, step, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def calls(self) -> int:
        return len(self.requests)

    @staticmethod
    def _send(handler, code: int, payload: bytes, content_type: str = "application/json") -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
        handler.wfile.flush()

    def _reply(self, handler, step, body) -> None:
        if isinstance(step, tuple) and step[0] == "slow":
            time.sleep(step[1])
            step = step[2]
        if isinstance(step, tuple) and step[0] == "status":
            payload = json.dumps({"error": {"message": step[2], "type": "server_error"}}).encode()
            self._send(handler, step[1], payload)
            return
        if isinstance(step, tuple) and step[0] == "raw":
            self._send(handler, step[1], step[2], "text/html")
            return
        reply = {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "test"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": step}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        self._send(handler, 200, json.dumps(reply).encode())


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for "server down" tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
