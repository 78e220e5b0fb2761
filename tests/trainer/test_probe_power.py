"""The probe's power: the formula, checked by Monte-Carlo against the real probe code, and the eval stage's floor."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer import eval_stage, harness, probe_power
from trainer.probe_power import FLOOR_ENV, detection_probability, probe_power_verdict, rows_needed

SEQ, VOCAB = 100, 32
PEEKED = (37,)  # 1 of 100 positions: a one-token look-ahead at 1% of positions
PEEKED_5 = (3, 29, 37, 61, 88)  # 5% of positions


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: one thread is fastest, and a loaded machine does not stall the Monte-Carlo."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(peeked: tuple[int, ...]) -> torch.nn.Module:
    """A stand-in whose output at the `peeked` positions also reads the next input token."""
    generator = torch.Generator().manual_seed(0)
    own, ahead = torch.randn(VOCAB, VOCAB, generator=generator), torch.randn(VOCAB, VOCAB, generator=generator)
    mask = torch.zeros(SEQ)
    mask[list(peeked)] = 1.0

    def forward(x: torch.Tensor) -> torch.Tensor:
        return own[x] + mask[None, :, None] * ahead[torch.roll(x, -1, dims=1)]

    return forward  # type: ignore[return-value]


def _caught(model: torch.nn.Module, rows: int) -> bool:
    """One eval of `rows` rows through the real probe_batch / probe_drift, as score_window runs them."""
    inputs = torch.randint(0, VOCAB, (rows, SEQ))
    for start in range(0, rows, 16):
        batch = inputs[start:start + 16]
        probe, order, cuts = eval_stage.probe_batch(batch, VOCAB)
        scored = torch.log_softmax(model(batch).float(), dim=-1)
        probed = torch.log_softmax(model(probe).float(), dim=-1)
        if eval_stage.probe_drift(scored, probed, order, cuts) != "passed":
            return True
    return False


def test_full_row_share_is_the_eval_stages() -> None:
    """The formula's FULL_ROW_SHARE is the one the probe uses."""
    assert probe_power.FULL_ROW_SHARE == eval_stage.FULL_ROW_SHARE


def test_rows_needed_is_the_smallest_count_with_the_power() -> None:
    """rows_needed reaches the power and one row fewer does not, for several shares and vocabularies."""
    for share in (0.002, 0.01, 0.05, 0.5):
        for vocab in (0, 512, 8192):
            rows = rows_needed(share, 0.99, vocab)
            assert detection_probability(rows, share, vocab) >= 0.99
            assert rows == 1 or detection_probability(rows - 1, share, vocab) < 0.99


@pytest.mark.parametrize(("peeked", "rows", "trials"), [(PEEKED_5, 16, 600), (PEEKED, 64, 300)])
def test_monte_carlo_of_the_real_probe_matches_the_formula(peeked: tuple[int, ...], rows: int, trials: int) -> None:
    """The real probe catches a look-ahead at a share f of positions as often as 1 - (1 - q)^rows (5 sigma)."""
    model = _model(peeked)
    expected = detection_probability(rows, len(peeked) / SEQ, VOCAB)
    hits = sum(_caught(model, rows) for _ in range(trials))
    sigma = math.sqrt(expected * (1 - expected) / trials)
    assert abs(hits / trials - expected) < 5 * sigma, (hits / trials, expected)


def test_the_floor_catches_a_one_percent_look_ahead() -> None:
    """At rows_needed() rows the real probe catches the 1% look-ahead in (nearly) every eval."""
    model, trials = _model(PEEKED), 30
    rows = rows_needed(len(PEEKED) / SEQ, 0.99, VOCAB)
    assert sum(_caught(model, rows) for _ in range(trials)) >= trials - 3  # expected misses: 0.3


def test_an_honest_model_is_never_caught() -> None:
    """The same stand-in without the look-ahead passes every probe: the counts above are the peek's."""
    model = _model(())
    assert not any(_caught(model, 64) for _ in range(20))


def test_verdict_refuses_below_the_floor_only_when_the_daemon_asks() -> None:
    """Below the floor: refused with the rows and tokens needed under FLOOR_ENV=1, else marked not a trust check."""
    asked = probe_power_verdict(64, 1024, 8192, {FLOOR_ENV: "1"})
    assert asked.refused and not asked.trust_check and "refusing to score" in asked.line
    assert f"{rows_needed(vocab_size=8192)} rows" in asked.line and f"{rows_needed(vocab_size=8192) * 1024}" in asked.line
    smoke = probe_power_verdict(2, 1024, 8192, {FLOOR_ENV: "0"})
    assert not smoke.refused and "NOT a trust check" in smoke.line
    assert smoke.record() == {"probe_power": round(detection_probability(2, vocab_size=8192), 6), "trust_check": False}
    enough = probe_power_verdict(rows_needed(vocab_size=8192), 1024, 8192, {FLOOR_ENV: "1"})
    assert not enough.refused and enough.trust_check


def test_eval_stage_refuses_an_eval_under_the_floor(prepared_data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The real eval stage, asked for the floor, exits EXIT_PROBE_POWER before scoring and writes no result."""
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    monkeypatch.setenv(FLOOR_ENV, "1")
    code = harness.main(["eval", "--checkpoint", str(tmp_path / "m.pt2"), "--data", str(prepared_data / "val"),
                         "--out", str(tmp_path / "out")])
    assert code == probe_power.EXIT_PROBE_POWER
    assert not (tmp_path / "out" / "result.json").exists()
    assert "refusing to score: probe power: 4 probed rows" in capsys.readouterr().out


def test_small_eval_without_the_floor_says_it_is_not_a_trust_check(prepared_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Not asked for the floor (the smoke run), the eval stage runs and its output and result say it."""
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    monkeypatch.setenv(FLOOR_ENV, "0")
    code = harness.main(["eval", "--checkpoint", str(tmp_path / "m.pt2"), "--data", str(prepared_data / "val"),
                         "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert code == 0 and result["trust_check"] is False and 0 < result["probe_power"] < 0.99
    assert "NOT a trust check" in capsys.readouterr().out
