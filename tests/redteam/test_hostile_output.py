"""Class 8: hostile strings and numbers out of the sandbox. A fuzz run (fixed seed, bounded) feeds random bytes
through out-dir file names, printed summary lines, output and error text and experiment descriptions along the
real runner (local backend) and store (SQLite and Postgres) path: every run becomes one clean row, none raises."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.research.runner import StageOutcome, StageRunner
from daemon.research.session import outcome_fields
from daemon.store import Store, open_store
from sandbox import sanitize

FUZZ_SEED = 20261130
FUZZ_RUNS = 4

# The candidate writes files whose names are random bytes, prints random bytes, then a summary block with
# random keys and absurd numbers, then exits with a random status (0 leaves no checkpoint: exit 4).
HOSTILE_CANDIDATE = """
import os, sys
out = os.environ["AUTORESEARCH_OUT_DIR"].encode()
for name in {names!r}:
    try:
        with open(os.path.join(out, name), "wb") as handle:
            handle.write(b"x")
    except OSError as exc:
        print("could not create", exc)
sys.stdout.buffer.write({noise!r})
sys.stdout.buffer.write(b"\\n---\\n" + {summary!r} + b"\\n")
sys.stdout.flush()
raise SystemExit({status})
"""
ABSURD_NUMBERS = (b"1" * 40, b"1e400", b"-1e309", b"nan", b"inf", b"99999999999999999999", b"0x10", b"1e308")
TROUBLE = (b"\x00", b"\x1b[2J", b"\x1b]0;owned\x07", b"\xff\xfe", b"\xed\xa0\x80", b"\r", b"\x9b31m", b"\xc3")


def _random_bytes(rng: random.Random, size: int) -> bytes:
    pieces = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))) for _ in range(size)]
    return b"".join(rng.choice([piece, rng.choice(TROUBLE)]) for piece in pieces)


def _hostile_source(rng: random.Random) -> str:
    names = [(_random_bytes(rng, 3).replace(b"/", b"_").replace(b"\x00", b"0") or b"n")[:200] for _ in range(5)]
    summary = b"\n".join(_random_bytes(rng, 2) + b": " + rng.choice(ABSURD_NUMBERS) for _ in range(6))
    summary += b"\nnum_steps: " + b"9" * 30 + b"\ntraining_seconds: 1e999\npeak_vram_mb: -1e300"
    return HOSTILE_CANDIDATE.format(names=names, noise=_random_bytes(rng, 40), summary=summary,
                                    status=rng.choice([0, 1, 7]))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fuzz_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path / 'fuzz.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = open_store(url, retry_seconds=5)
    store.upgrade()
    yield store
    store.close()


@pytest.fixture(scope="module")
def fuzz_outcomes(local_runner: StageRunner) -> list[tuple[StageOutcome, bytes]]:
    rng = random.Random(FUZZ_SEED)
    runs = []
    for i in range(FUZZ_RUNS):
        outcome = local_runner.run(9300 + i, 1, _hostile_source(rng), 0)
        runs.append((outcome, _random_bytes(rng, 30)))
    return runs


def _printable(text: str) -> bool:
    return not any(ch in text for ch in ("\x00", "\x1b", "\x9b", "\r")) and \
        text.encode("utf-8", errors="strict") is not None


def test_hostile_output_becomes_clean_rows(fuzz_outcomes: list[tuple[StageOutcome, bytes]], fuzz_store: Store) -> None:
    """Each fuzzed run is stored as one crashed row with printable text and bounded numbers; nothing raises."""
    session = fuzz_store.create_session("fuzz", "test", "", {})
    for outcome, description in fuzz_outcomes:
        assert outcome.status == "crashed" and outcome.val_bpb is None
        hostile_text = description.decode("utf-8", errors="surrogateescape")
        experiment = fuzz_store.create_experiment(session.id, "candidate", "print(1)\n", description=hostile_text,
                                                  hypothesis=hostile_text)
        claimed = fuzz_store.claim_next(session.id, "fuzz-owner", "lane", None, 60)
        assert claimed is not None and claimed.id == experiment.id
        fields = outcome_fields(outcome)
        stored = fuzz_store.transition(experiment.id, "running", outcome.status, owner="fuzz-owner", **fields)
        assert stored.status == "crashed"
        for text in (stored.description, stored.hypothesis, stored.error, stored.log_tail, stored.probe):
            assert _printable(text), repr(text[:200])
        assert all(abs(value) <= sanitize.MAX_ABS_FLOAT for value in outcome.summary.values())


def test_hostile_out_dir_names_are_reported_cleanly(fuzz_outcomes: list[tuple[StageOutcome, bytes]]) -> None:
    """Non-UTF-8 and control bytes in out-dir file names never reach the error text raw."""
    for outcome, _ in fuzz_outcomes:
        assert _printable(outcome.error) and _printable(outcome.log_tail)


@pytest.mark.parametrize("value", ["a\x00b", "\x1b[31mred\x1b[0m", "\ud800lone", "\x9b2Jx", "ok\r\nline", b"\xff\xfe"])
def test_clean_text_removes_what_breaks_stores_and_terminals(value: str | bytes) -> None:
    """NUL, escapes, lone surrogates, 8-bit CSI and CR are gone; the text encodes as UTF-8."""
    cleaned = sanitize.clean_text(value)
    assert _printable(cleaned)
    cleaned.encode("utf-8")


@pytest.mark.parametrize("value", [10**30, float("inf"), float("nan"), -1e300, True, "3"])
def test_numbers_out_of_range_are_dropped(value: object) -> None:
    """Huge, non-finite, boolean and textual values are not numbers the store takes."""
    assert sanitize.clean_float(value) is None
    assert sanitize.clean_summary({"k": value}) == {}


def test_store_fields_are_bounded() -> None:
    """A BIGINT overflow becomes None instead of an error; finite floats stay."""
    assert sanitize.clean_fields({"exit_code": 2**70, "val_bpb": 1.5, "error": "a\x00b"}) == \
        {"exit_code": None, "val_bpb": 1.5, "error": "ab"}
