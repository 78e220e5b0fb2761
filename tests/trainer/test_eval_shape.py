"""The eval's scoring shape: BOS-aligned val rows, a sequence length from the daemon-set preset, never the candidate's."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import harness, prepare
from trainer.prepare import export_checkpoint


class _Causal(torch.nn.Module):
    """Position-wise (so trivially causal) logits: an embedding and a head, any sequence length."""

    def __init__(self, vocab_size: int = 512) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(idx))


def _eval(checkpoint: Path, data: Path, out: Path, monkeypatch: pytest.MonkeyPatch, preset: str | None,
          tokens: int = 8192) -> tuple[int, dict]:
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", str(tokens))
    if preset is None:
        monkeypatch.delenv("AUTORESEARCH_PRESET", raising=False)
    else:
        monkeypatch.setenv("AUTORESEARCH_PRESET", preset)
    code = harness.main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)])
    result_path = out / "result.json"
    return code, json.loads(result_path.read_text()) if result_path.exists() else {}


def _row_starts(stream: np.ndarray, window: np.ndarray) -> list[int]:
    """Where each window row lies in the val stream (the first match at or after the previous row)."""
    starts, cursor = [], 0
    for row in window:
        for start in np.flatnonzero(stream[cursor:] == row[0]) + cursor:
            if np.array_equal(stream[start:start + len(row)], row):
                starts.append(int(start))
                cursor = int(start) + 1
                break
        else:
            raise AssertionError("a window row is not a slice of the val stream")
    return starts


def test_every_eval_row_starts_with_bos(prepared_data: Path) -> None:
    """Each scored row starts at a document's BOS (column 0)."""
    val = prepared_data / "val"
    window = prepare.eval_token_window(val, 40 * 1024)
    bos = prepare.read_split_meta(val)["bos_id"]
    assert window.shape == (40, prepare.SEQ_LEN + 1)
    assert (window[:, 0] == bos).all()


def test_eval_rows_are_stream_slices_whose_targets_never_overlap(prepared_data: Path) -> None:
    """Rows are untouched slices of the val stream (so every document start inside a row keeps its BOS), and no
    target token is scored twice."""
    val = prepared_data / "val"
    stream = np.asarray(prepare.load_tokens(val), dtype=np.int64)
    window = prepare.eval_token_window(val, 40 * 1024)
    starts = _row_starts(stream, window)
    assert all(later - earlier >= prepare.SEQ_LEN for earlier, later in itertools.pairwise(starts))


def test_eval_rows_are_consecutive_without_a_bos_token(prepared_data: Path, tmp_path: Path) -> None:
    """Data whose meta names no BOS token is cut into consecutive rows, as before."""
    val = tmp_path / "val"
    val.mkdir()
    for name in ("tokens.bin", "tokenizer.json"):
        (val / name).write_bytes((prepared_data / "val" / name).read_bytes())
    meta = json.loads((prepared_data / "val" / "meta.json").read_text())
    del meta["bos_id"]
    (val / "meta.json").write_text(json.dumps(meta))
    window = prepare.eval_token_window(val, 4 * 1024)
    stream = np.asarray(prepare.load_tokens(val), dtype=np.int64)
    assert np.array_equal(window, np.stack([stream[i * 1024:i * 1024 + 1025] for i in range(4)]))


def test_too_small_val_split_is_a_clear_data_error(prepared_data: Path) -> None:
    """A row longer than the val split is refused with what to do."""
    with pytest.raises(prepare.DataError, match="prepare a bigger corpus"):
        prepare.eval_token_window(prepared_data / "val", 2**20, seq_len=10**6)


@pytest.mark.parametrize(("preset", "cuda", "expected"), [
    ("gpu", True, 2048), ("gpu", False, 2048), ("cpu", True, 1024), ("cpu", False, 1024),
    ("tiny", False, 1024), ("tiny", True, 2048), ("auto", True, 2048), ("auto", False, 1024), ("", False, 1024),
])
def test_scoring_length_follows_the_preset(preset: str, cuda: bool, expected: int) -> None:
    """gpu scores at upstream's 2048, cpu at the small 1024; tiny and auto follow the device."""
    assert prepare.scoring_seq_len(preset, cuda) == expected


def test_unknown_preset_has_no_scoring_length() -> None:
    """A preset name the trainer does not know is a clear error, not a guess."""
    with pytest.raises(ValueError, match="is not a preset"):
        prepare.scoring_seq_len("huge", False)


def test_gpu_preset_is_scored_at_2048_on_bos_rows(prepared_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With the daemon's preset gpu, a checkpoint exported at 2048 is scored on rows of 2048 targets."""
    export_checkpoint(_Causal(), tmp_path, seq_len=2048)
    code, result = _eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch, "gpu",
                         tokens=8 * 2048)
    assert code == 0 and result["status"] == "ok", result
    assert result["seq_len"] == 2048 and result["eval_rows"] == 8 and result["probe"] == "passed"


@pytest.mark.parametrize(("exported", "preset"), [(1024, "gpu"), (2048, "cpu"), (512, None)])
def test_checkpoint_at_another_length_is_invalid(prepared_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, exported: int,
                                                 preset: str | None) -> None:
    """A program exported at another sequence length than the preset's scoring one is `invalid`, saying why."""
    export_checkpoint(_Causal(), tmp_path, seq_len=exported)
    code, result = _eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch, preset)
    scoring = prepare.scoring_seq_len(preset or "", False)
    assert code == 0 and result["status"] == "invalid" and result["val_bpb"] is None
    assert f"the scoring shape (sequence length {scoring})" in result["error"]
    assert "scoring_seq_len()" in result["error"]


def test_unknown_preset_in_the_eval_env_is_a_usage_error(prepared_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval stage refuses a preset it cannot map to a scoring shape, before scoring anything."""
    export_checkpoint(_Causal(), tmp_path)
    code, result = _eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch, "huge")
    assert code == harness.EXIT_USAGE and result == {}


def test_val_bpb_of_one_checkpoint_is_stable(prepared_data: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two evals of the same checkpoint (other random row orders and probes) give the same val_bpb."""
    export_checkpoint(_Causal(), tmp_path)
    scores = []
    for run in range(2):
        code, result = _eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / f"eval{run}", monkeypatch,
                             "cpu", tokens=16 * 1024)
        assert code == 0 and result["status"] == "ok", result
        scores.append(result["val_bpb"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-9)
    window = prepare.eval_token_window(prepared_data / "val", 16 * 1024)
    token_bytes = prepare.token_byte_lengths(prepare.load_tokenizer(prepared_data / "val"))
    assert scores[0] == pytest.approx(prepare.evaluate_bpb(_Causal().eval(), window, token_bytes), rel=1e-6)
