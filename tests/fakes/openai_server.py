"""A fake OpenAI Chat Completions API on 127.0.0.1 for driving the real `openai` SDK, scripted per test.

POST /v1/chat/completions is checked against the real API's request rules first; a request the real API
would refuse gets its 400 (listed in `server.rejections`) without consuming a scripted reply:
- model and a non-empty messages list; roles system/developer/user/assistant/tool;
- an assistant message with `tool_calls` is followed by one `tool` message per call (same ids) before any
  other message, and a `tool` message answers only a call of that assistant message;
- tools are `{"type": "function", "function": {"name", "parameters": object schema}}` with valid names;
- `tool_choice` is none/auto/required or names a defined function.
Then the next scripted `Reply` is sent (the same `Reply` type as the Anthropic fake); with none left, a 500.
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from tests.fakes.anthropic_server import RecordedRequest, Reply

MODEL = "gpt-test-1"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_counter = iter(range(1, 1 << 62))
_lock = threading.Lock()


class Rejected(Exception):
    pass


def _next_id() -> int:
    with _lock:
        return next(_counter)


def completion(message: dict[str, Any], finish_reason: str, usage: dict[str, Any] | None = None) -> Reply:
    full = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 0}}
    full.update(usage or {})
    return Reply(body={"id": f"chatcmpl-{_next_id()}", "object": "chat.completion", "created": 1_700_000_000,
                       "model": MODEL, "choices": [{"index": 0, "message": {"role": "assistant", **message},
                                                    "finish_reason": finish_reason, "logprobs": None}],
                       "usage": full})


def tool_call_reply(arguments: Any, usage: dict[str, Any] | None = None, *, name: str = "propose_experiment",
                    raw_arguments: str | None = None) -> Reply:
    """A reply calling `name` with `arguments` (JSON-encoded unless `raw_arguments` gives the exact text)."""
    call = {"id": f"call_{_next_id()}", "type": "function",
            "function": {"name": name, "arguments": raw_arguments if raw_arguments is not None else json.dumps(arguments)}}
    return completion({"content": None, "tool_calls": [call]}, "tool_calls", usage)


def text_completion(text: str) -> Reply:
    return completion({"content": text}, "stop")


def openai_error(status: int, message: str = "scripted error", headers: dict[str, str] | None = None) -> Reply:
    return Reply(body={"error": {"message": message, "type": "invalid_request_error" if status == 400 else
                                 "server_error", "param": None, "code": None}}, status=status, headers=headers or {})


def check_chat_request(body: Any) -> None:
    if not isinstance(body, dict) or "model" not in body:
        raise Rejected("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Rejected("'messages' must contain at least one message")
    names = set()
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise Rejected("tools: each tool must be {'type': 'function', 'function': {...}}")
        if not _NAME.match(str(function.get("name", ""))):
            raise Rejected(f"Invalid 'tools[].function.name': {function.get('name')!r}")
        parameters = function.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type") != "object"):
            raise Rejected("Invalid schema for function parameters: schema must be a JSON Schema of 'type: \"object\"'")
        names.add(function["name"])
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required"):
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or choice.get("type") != "function" or named not in names:
            raise Rejected(f"Invalid value for 'tool_choice': no function named {named!r} in tools")
    pending: list[str] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise Rejected(f"messages[{index}].role: invalid value {role!r}")
        if role == "tool":
            tool_call_id = message.get("tool_call_id")
            if tool_call_id not in pending:
                raise Rejected(f"Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                               f"message with 'tool_calls' (messages[{index}], tool_call_id {tool_call_id!r})")
            pending.remove(tool_call_id)
            continue
        if pending:
            raise Rejected("An assistant message with 'tool_calls' must be followed by tool messages responding to "
                           f"each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                           f"{', '.join(pending)}")
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("arguments"), str) \
                        or not isinstance(call.get("id"), str):
                    raise Rejected(f"messages[{index}].tool_calls: each needs an id and function.arguments as a string")
                pending.append(call["id"])
        elif message.get("content") is None:
            raise Rejected(f"messages[{index}].content: expected a string, got null")
    if pending:
        raise Rejected(f"tool_call_ids without response messages: {', '.join(pending)}")


class FakeOpenAIServer:
    """A threaded HTTP server speaking the Chat Completions wire format; see the module docstring."""

    def __init__(self) -> None:
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.rejections: list[tuple[RecordedRequest, str]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._replies)

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if request.path.split("?")[0] != "/v1/chat/completions":
                return openai_error(404, f"fake server: no route {request.path}")
            try:
                check_chat_request(request.body)
            except Rejected as exc:
                self.rejections.append((request, str(exc)))
                return openai_error(400, str(exc))
            if not self._replies:
                return openai_error(500, "fake server: no scripted reply left for this request")
            return self._replies.popleft()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0)).decode("utf-8", "replace")
                try:
                    body: Any = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw
                reply = server._next_reply(RecordedRequest("POST", self.path, dict(self.headers.items()), body))
                payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
