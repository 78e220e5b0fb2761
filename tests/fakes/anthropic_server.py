"""A fake Anthropic Messages API on 127.0.0.1, scripted per test, for driving the real `anthropic` SDK.

Usage:

    with FakeAnthropicServer() as server:
        server.enqueue(error_reply(429, headers={"retry-after": "3"}),
                       tool_reply({"description": "...", "hypothesis": "...", "edits": [...]},
                                  usage={"input_tokens": 1200, "output_tokens": 300}))
        client = anthropic.Anthropic(api_key="test", base_url=server.url, max_retries=0)
        ...
        server.requests[0].body        # the JSON the SDK sent, for assertions on the prompt

Each POST /v1/messages is first checked against the real API's request rules
(`tests.fakes.messages_rules`): a request the real API would refuse gets its 400 (and is listed in
`server.rejections`) without consuming a scripted reply. A valid one takes the next `Reply` from the
queue: its status, headers and JSON body, sent after `delay_s` seconds (a slow server). With the queue
empty the server answers 500 with an error body saying so, so a test that under-scripts fails loudly.

When the request enables extended thinking, a scripted 200 reply without a thinking block gets one
prepended (the real API always thinks first), signed; the signature is checked when the block comes back.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from tests.fakes.messages_rules import RequestRejected, breakpoints, check_request

MODEL = "claude-sonnet-5-5"


@dataclass(frozen=True)
class Reply:
    """One scripted answer: HTTP status, extra headers, JSON body, and a delay before answering."""

    body: dict[str, Any]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when it was not JSON


def tool_reply(tool_input: Any, usage: dict[str, int] | None = None, *, tool_name: str = "propose_experiment",
               text: str = "", stop_reason: str = "tool_use", delay_s: float = 0.0, thinking: str = "") -> Reply:
    """A 200 reply: optional thinking and text blocks, then one tool_use block with `tool_input`."""
    content: list[dict[str, Any]] = [{"type": "thinking", "thinking": thinking, "signature": ""}] if thinking else []
    if text:
        content.append({"type": "text", "text": text})
    content.append({"type": "tool_use", "id": f"toolu_{_next_id()}", "name": tool_name, "input": tool_input})
    return Reply(body=_message(content, usage, stop_reason), delay_s=delay_s)


def text_reply(text: str, usage: dict[str, int] | None = None, *, stop_reason: str = "end_turn") -> Reply:
    """A 200 reply with one text block and no tool call."""
    return Reply(body=_message([{"type": "text", "text": text}], usage, stop_reason))


def error_reply(status: int, message: str = "scripted error", *, headers: dict[str, str] | None = None,
                error_type: str | None = None, delay_s: float = 0.0) -> Reply:
    """An error in the API's wire format (`{"type": "error", "error": {"type", "message"}}`)."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
    kind = error_type or kinds.get(status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return Reply(body=body, status=status, headers=headers or {}, delay_s=delay_s)


_counter = iter(range(1, 1 << 62))
_counter_lock = threading.Lock()


def _next_id() -> str:
    with _counter_lock:
        return f"{next(_counter):016d}"


def _message(content: list[dict[str, Any]], usage: dict[str, int] | None, stop_reason: str) -> dict[str, Any]:
    full_usage = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0}
    full_usage.update(usage or {})
    return {"id": f"msg_{_next_id()}", "type": "message", "role": "assistant", "model": MODEL,
            "content": content, "stop_reason": stop_reason, "stop_sequence": None, "usage": full_usage}


class FakeAnthropicServer:
    """A threaded HTTP server speaking the Messages API wire format; see the module docstring."""

    def __init__(self) -> None:
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.requests: list[RecordedRequest] = []
        self.rejections: list[tuple[RecordedRequest, str]] = []  # requests refused with a 400, and why
        self._signatures: dict[str, str] = {}  # thinking signatures issued -> their thinking text
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-anthropic", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def enqueue(self, *replies: Reply) -> None:
        """Append replies; each request to /v1/messages consumes the next one."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def pending(self) -> int:
        """How many scripted replies are still unused."""
        with self._lock:
            return len(self._replies)

    def start(self) -> FakeAnthropicServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # ends pending delays at once
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeAnthropicServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if request.path.split("?")[0] != "/v1/messages":
                return error_reply(404, f"fake server: no route {request.path}")
            try:
                check_request(request.body, self._signatures)
            except RequestRejected as exc:
                self.rejections.append((request, str(exc)))
                return error_reply(400, str(exc))
            if not self._replies:
                return error_reply(500, "fake server: no scripted reply left for this request")
            return self._answer(request.body, self._replies.popleft())

    def _answer(self, request: dict[str, Any], reply: Reply) -> Reply:
        """The scripted reply as the real API would shape it for this request (thinking, cache usage)."""
        if reply.status != 200 or reply.body.get("type") != "message":
            return reply
        body = json.loads(json.dumps(reply.body))
        thinking_on = (request.get("thinking") or {}).get("type") in ("enabled", "adaptive")
        if not thinking_on:  # no thinking without asking for it
            body["content"] = [block for block in body["content"] if block["type"] != "thinking"]
        elif not any(block["type"] == "thinking" for block in body["content"]):
            body["content"].insert(0, {"type": "thinking", "thinking": "Looking at the ledger first.", "signature": ""})
        for block in body["content"]:
            if block["type"] == "thinking":
                block["signature"] = f"sig_{_next_id()}"
                self._signatures[block["signature"]] = block["thinking"]
        usage = body["usage"]
        if "cache_creation" not in usage:
            ttl_1h = any(control.get("ttl") == "1h" for _, control in breakpoints(request))
            written = usage.get("cache_creation_input_tokens") or 0
            usage["cache_creation"] = {"ephemeral_1h_input_tokens": written if ttl_1h else 0,
                                       "ephemeral_5m_input_tokens": 0 if ttl_1h else written}
        return Reply(body=body, status=reply.status, headers=reply.headers, delay_s=reply.delay_s)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length).decode("utf-8", "replace")
                try:
                    body: Any = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw
                reply = server._next_reply(RecordedRequest("POST", self.path, dict(self.headers.items()), body))
                if reply.delay_s and server._closing.wait(reply.delay_s):
                    return
                payload = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.send_header("request-id", f"req_{_next_id()}")
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout) before the delayed reply was sent

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler
