"""Data fences: how untrusted text (anything a candidate or a past proposal wrote) enters the agent's prompt.

Every such text is wrapped in `<data-NONCE>` ... `</data-NONCE>`, where NONCE is a secret of the research
line (`daemon.store.lines.LineQueries.line_nonce`: random, stored server-side, the same for every proposal
and night of the line so the prompt cache keeps working). The system text says fenced text is data, never
an instruction. Text cannot end its fence early:
- the nonce is taken out of the text (case-insensitively, replaced by a marker that contains no hex
  digit, so removing it cannot join two pieces into a new copy);
- every tag shape that could read as a fence (`<data`, `</...`, with look-alike brackets or spaces) is
  escaped as `&lt;`;
- control and invisible format characters are dropped and every Unicode line break becomes `\\n`,
  so the text cannot hide a tag from a reader or break lines in a way the parser here does not see.
`fenced_spans(text, nonce)` is the parser: what a test uses to check that nothing escaped.
"""

from __future__ import annotations

import re
import secrets
import unicodedata

NONCE_BYTES = 16
NONCE_MARKER = "[fence-id removed]"
# Bracket look-alikes a reader could take for '<' (ASCII, fullwidth, small, single angle quotes, math angles).
_BRACKETS = "<\uff1c\ufe64\u2039\u276e\u3008\u27e8\u2329\u02c2\u1438\u276c"
_TAG_SHAPE = re.compile(rf"[{_BRACKETS}](?=\s*/|\s*data)", re.IGNORECASE)
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
TRUNCATED = "[... cut ...]"


def new_nonce() -> str:
    """A fresh secret fence id (hex)."""
    return secrets.token_hex(NONCE_BYTES)


def open_tag(nonce: str) -> str:
    return f"<data-{nonce}>"


def close_tag(nonce: str) -> str:
    return f"</data-{nonce}>"


def clean(text: str, nonce: str) -> str:
    """`text` made safe to put between the fence tags (see the module docstring)."""
    text = _LINE_BREAKS.sub("\n", text)
    text = "".join(ch for ch in text if ch in "\t\n" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    text = re.sub(re.escape(nonce), NONCE_MARKER, text, flags=re.IGNORECASE) if nonce else text
    return _TAG_SHAPE.sub("&lt;", text)


def fence(text: str, nonce: str, limit: int | None = None, max_lines: int | None = None) -> str:
    """`text` cleaned, cut to its last `max_lines` lines and `limit` characters, inside the line's fence."""
    cleaned = clean(text, nonce)
    if max_lines is not None:
        lines = cleaned.split("\n")
        if len(lines) > max_lines:
            cleaned = "\n".join(["[... earlier lines cut ...]", *lines[-max_lines:]])
    if limit is not None and len(cleaned) > limit:
        cleaned = TRUNCATED + cleaned[-limit:]
    return f"{open_tag(nonce)}\n{cleaned}\n{close_tag(nonce)}"


def fenced_spans(text: str, nonce: str) -> tuple[list[str], list[str]]:
    """(the fenced contents, the text outside any fence) of a prompt text; `ValueError` when the fences do not
    pair up (a close without an open, an open inside a fence, an open never closed)."""
    inside: list[str] = []
    outside: list[str] = []
    position = 0
    opening, closing = open_tag(nonce), close_tag(nonce)
    while True:
        start = text.find(opening, position)
        stray = text.find(closing, position)
        if stray != -1 and (start == -1 or stray < start):
            raise ValueError(f"a closing fence at {stray} without an opening one")
        if start == -1:
            outside.append(text[position:])
            return inside, outside
        outside.append(text[position:start])
        end = text.find(closing, start + len(opening))
        if end == -1:
            raise ValueError(f"the fence opened at {start} is never closed")
        body = text[start + len(opening):end]
        if opening in body:
            raise ValueError(f"a fence opened inside the fence at {start}")
        inside.append(body)
        position = end + len(closing)
