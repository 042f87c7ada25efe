"""A local HTTP server that speaks enough of the OpenAI Chat Completions and Anthropic Messages
APIs for the real SDKs to talk to it, answering each request with the next queued behaviour."""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    text: str = "```python\nclass ModelNew:\n    pass\n```"
    input_tokens: int = 1200  # every prompt token, the cached ones included
    cached_tokens: int = 0
    output_tokens: int = 300
    finish: str = "stop"  # OpenAI's word; the Anthropic shape answers end_turn


@dataclass(frozen=True)
class Fail:
    status: int  # 429 and 5xx are retried by the SDKs; the headers make their back-off ~1 ms


@dataclass(frozen=True)
class Stall:
    seconds: float  # longer than the client's timeout: the client gives up first


@dataclass(frozen=True)
class Garbage:
    body: bytes = b"<html>this is not JSON {"  # a 200 with a body the API would never send
    content_type: str = "application/json"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict = field(default_factory=dict)


class LLMServer:
    """Use as a context manager; `queue(...)` behaviours; when the queue is empty every request gets Reply()."""

    def __init__(self):
        self.behaviours: deque = deque()
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.models = ["served-model"]  # what GET /v1/models lists
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def queue(self, *behaviours) -> None:
        self.behaviours.extend(behaviours)

    def requests_to(self, path: str) -> list[Received]:
        return [request for request in self.received if request.path == path]

    def __enter__(self) -> LLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()  # ends a Stall early
        self.server.shutdown()
        self.server.server_close()

    def next_behaviour(self, received: Received):
        with self.lock:
            self.received.append(received)
            return self.behaviours.popleft() if self.behaviours else Reply()

    def handler_class(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [
                        {"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in owner.models]})
                else:
                    self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                body = json.loads(raw or b"{}")
                behaviour = owner.next_behaviour(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                anthropic = self.path.startswith("/v1/messages")
                if self.path not in ("/v1/chat/completions", "/v1/messages"):
                    self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                elif isinstance(behaviour, Stall):
                    owner.stopping.wait(behaviour.seconds)
                    self.close_connection = True
                elif isinstance(behaviour, Garbage):
                    self.send_raw(200, behaviour.body, behaviour.content_type)
                elif isinstance(behaviour, Fail):
                    message = f"simulated HTTP {behaviour.status}"
                    error = ({"type": "error", "error": {"type": "api_error", "message": message}} if anthropic
                             else {"error": {"message": message, "type": "server_error", "code": None}})
                    self.send_json(behaviour.status, error, {"retry-after": "0", "retry-after-ms": "1"})
                elif anthropic:
                    self.send_json(200, anthropic_reply(body, behaviour))
                else:
                    self.send_json(200, openai_reply(body, behaviour))

            def send_json(self, status: int, payload: dict, headers: dict | None = None):
                self.send_raw(status, json.dumps(payload).encode(), "application/json", headers)

            def send_raw(self, status: int, data: bytes, content_type: str, headers: dict | None = None):
                try:
                    self.send_response(status)
                    self.send_header("content-type", content_type)
                    self.send_header("content-length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up first
                    pass

        return Handler


def openai_reply(request: dict, reply: Reply) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": request.get("model"),
        "choices": [{"index": 0, "finish_reason": reply.finish,
                     "message": {"role": "assistant", "content": reply.text}}],
        "usage": {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
                  "total_tokens": reply.input_tokens + reply.output_tokens,
                  "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}},
    }


def anthropic_reply(request: dict, reply: Reply) -> dict:
    # Anthropic counts cache reads apart from input_tokens, which holds only the uncached rest.
    return {
        "id": "msg_test", "type": "message", "role": "assistant", "model": request.get("model"),
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": "end_turn" if reply.finish == "stop" else "max_tokens", "stop_sequence": None,
        "usage": {"input_tokens": reply.input_tokens - reply.cached_tokens, "output_tokens": reply.output_tokens,
                  "cache_read_input_tokens": reply.cached_tokens, "cache_creation_input_tokens": 0},
    }
