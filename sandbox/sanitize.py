"""One place every string and number from the sandbox (and from the agent) is cleaned and bounded before it
reaches the store, git, a prompt, the status page or a terminal.

Text: bytes are decoded as UTF-8 with replacement; lone surrogates (e.g. a non-UTF-8 file name that
os.scandir gave back with surrogateescape) become '?'; NUL, ANSI/VT escape sequences (CSI, OSC, other
ESC forms) and every other C0/C1 control character except newline and tab are dropped; the result is cut
to a length. Numbers: bools are not numbers, non-finite floats and values beyond what the store's columns
hold are dropped (None), never raised on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

MAX_TEXT_CHARS = 64 * 1024
MAX_NAME_CHARS = 200
MAX_SUMMARY_KEYS = 64
MAX_ABS_FLOAT = 1e15            # summary figures (seconds, tokens, MFU...) beyond this are nonsense
MAX_ABS_INT = 2**63 - 1         # a Postgres BIGINT

# ESC [ ... final byte (CSI), ESC ] ... BEL or ESC \ (OSC), ESC P/X/^/_ ... ESC \ (DCS, SOS, PM, APC), then
# any other two-character ESC sequence, and the 8-bit CSI/OSC introducers.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*(?:\x1b\\)?|"
                      r"\x1b[@-Z\\-_]?|\x9b[0-?]*[ -/]*[@-~]|\x9d[^\x07\x9c]*[\x07\x9c]?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_KEY = re.compile(r"[^A-Za-z0-9_.\-]")


def clean_text(value: object, limit: int = MAX_TEXT_CHARS, *, keep_end: bool = False) -> str:
    """`value` as printable text: decoded, without NUL, escapes or control characters, at most `limit` chars
    (the first ones, or the last ones with keep_end, as for an output tail)."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", errors="replace")
    else:
        text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", errors="replace").decode("utf-8", errors="replace")  # lone surrogates -> '?'
    text = _CONTROLS.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))
    if len(text) > limit:
        text = text[-limit:] if keep_end else text[:limit]
    return text


def clean_line(value: object, limit: int = 2000) -> str:
    """clean_text on one line: newlines and tabs become spaces."""
    return clean_text(value, limit).replace("\n", " ").replace("\t", " ")


def clean_name(value: object) -> str:
    """A file name (str with surrogate escapes, or bytes) as a short printable string."""
    if isinstance(value, str):
        value = value.encode("utf-8", errors="surrogateescape")
    return clean_line(value, MAX_NAME_CHARS)


def clean_float(value: object, bound: float = MAX_ABS_FLOAT) -> float | None:
    """A finite float within ±bound, or None (bools, strings, NaN, inf, overflow)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) and abs(number) <= bound else None


def clean_int(value: object) -> int | None:
    """An int a BIGINT column holds, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None
        value = int(value)
    return value if isinstance(value, int) and abs(value) <= MAX_ABS_INT else None


def clean_summary(summary: object) -> dict[str, float]:
    """A candidate's printed `key: number` summary: at most MAX_SUMMARY_KEYS short keys, bounded finite values."""
    if not isinstance(summary, Mapping):
        return {}
    cleaned: dict[str, float] = {}
    for key, value in summary.items():
        name = _KEY.sub("_", clean_line(key, 64))
        number = clean_float(value)
        if name and number is not None and len(cleaned) < MAX_SUMMARY_KEYS:
            cleaned[name] = number
    return cleaned


def clean_fields(fields: Mapping[str, Any], text_limit: int = MAX_TEXT_CHARS) -> dict[str, Any]:
    """Store fields: strings cleaned, ints bounded, floats finite; a value that cannot be kept becomes None."""
    cleaned: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None or isinstance(value, bool):
            cleaned[key] = value
        elif isinstance(value, str | bytes):
            cleaned[key] = clean_text(value, text_limit)
        elif isinstance(value, int):
            cleaned[key] = clean_int(value)
        elif isinstance(value, float):
            cleaned[key] = clean_float(value, math.inf)
        else:
            cleaned[key] = value
    return cleaned
