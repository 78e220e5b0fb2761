"""Turn untrusted output bytes into a short, printable tail safe for logs, the database and prompts."""

from __future__ import annotations

import re

# CSI/OSC escape sequences first (so their parameters do not survive), then every other control char.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize_tail(data: bytes, cap_bytes: int) -> str:
    """The last `cap_bytes` of `data`, decoded leniently, without escape sequences or control characters."""
    tail = data[-cap_bytes:] if cap_bytes > 0 else b""
    text = tail.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", _ESCAPES.sub("", text))
