"""prepare.py: sources, pinned split, tokenizer, token files, idempotence, bits per byte."""

from __future__ import annotations

import json
import math
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from trainer.prepare import (
    BOS_TOKEN,
    DataError,
    TokenLoader,
    evaluate_bpb,
    is_val_document,
    load_tokenizer,
    load_tokens,
    prepare_data,
    token_byte_lengths,
)


def _split_documents(split_dir: Path) -> list[str]:
    encoding = load_tokenizer(split_dir)
    text = encoding.decode(load_tokens(split_dir).tolist())
    return [doc for doc in text.split(BOS_TOKEN) if doc]


def _write_corpus(folder: Path, count: int, salt: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}{salt}: " + "the quick brown fox jumps. " * (5 + i % 7))
    return folder


def test_bpb_matches_hand_computed_value() -> None:
    """Uniform logits over 4 tokens cost ln 4 nats per target; a zero-byte target is excluded."""
    token_bytes = torch.tensor([1, 2, 0, 3])
    tokens = np.array([0, 1, 2, 3, 1])  # targets 1, 2, 3, 1 -> bytes 2 + 0 + 3 + 2 = 7, three scored targets
    uniform = lambda x: torch.zeros(*x.shape, 4)  # noqa: E731
    assert evaluate_bpb(uniform, tokens, token_bytes, seq_len=4) == pytest.approx(3 * math.log(4) / (math.log(2) * 7))


def test_byte_lengths_count_raw_bytes_of_partial_utf8_tokens() -> None:
    """A token holding half a UTF-8 character counts its raw bytes, not a replacement character's."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\xe2\x82"] = 256  # the first two bytes of the euro sign
    encoding = tiktoken.Encoding("partial", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={BOS_TOKEN: 257})
    lengths = token_byte_lengths(encoding)
    assert encoding.decode([256]) == "\ufffd"  # decoding as text would count 3 bytes
    assert lengths[256].item() == 2
    assert lengths[257].item() == 0
    assert lengths[ord("a")].item() == 1


def test_tokenizer_round_trips_text(prepared_data: Path) -> None:
    """Encoding then decoding gives the text back, including characters never seen in training."""
    encoding = load_tokenizer(prepared_data / "val")
    text = "def f(x):\n    return x ** 2  # café, €, 😀, 中文\n\n\tend"
    assert encoding.decode(encoding.encode_ordinary(text)) == text
    assert encoding.encode_single_token(BOS_TOKEN) == encoding.n_vocab - 1 == 511


def test_splits_are_disjoint_and_pinned(prepared_data: Path) -> None:
    """Every val document is chosen by its content hash and none of them appears in the train split."""
    train_docs, val_docs = _split_documents(prepared_data / "train"), _split_documents(prepared_data / "val")
    assert val_docs and all(is_val_document(doc) for doc in val_docs)
    assert not any(is_val_document(doc) for doc in train_docs)
    assert not set(train_docs) & set(val_docs)


def test_prepare_twice_is_a_no_op(prepared_data: Path) -> None:
    """Re-running with unchanged inputs rewrites nothing; the prepared files are read-only."""
    source = json.loads((prepared_data / "meta.json").read_text())["source"]
    files = sorted(p for p in prepared_data.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    messages: list[str] = []
    prepare_data(source, prepared_data, vocab_size=512, progress=messages.append)
    assert any("nothing to do" in m for m in messages)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert all(not p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) for p in files)


def test_changed_source_is_prepared_again(tmp_path: Path) -> None:
    """New input text replaces the prepared data instead of being ignored."""
    corpus = _write_corpus(tmp_path / "corpus", 40)
    out = prepare_data(str(corpus), tmp_path / "data", vocab_size=300, progress=lambda _: None)
    first = json.loads((out / "meta.json").read_text())["input_sha256"]
    (corpus / "doc000.txt").write_text("an edited document " * 20)
    prepare_data(str(corpus), out, vocab_size=300, progress=lambda _: None)
    assert json.loads((out / "meta.json").read_text())["input_sha256"] != first
    assert any("an edited document" in doc for doc in _split_documents(out / "train") + _split_documents(out / "val"))


def test_corrupted_tokenizer_is_rejected(prepared_data: Path, tmp_path: Path) -> None:
    """A tokenizer.json that no longer matches its checksum is refused with what to do."""
    split = tmp_path / "val"
    shutil.copytree(prepared_data / "val", split)
    path = split / "tokenizer.json"
    path.chmod(0o644)
    data = json.loads(path.read_text())
    data["tokens"][300], data["tokens"][301] = data["tokens"][301], data["tokens"][300]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"checksum.*prepare"):
        load_tokenizer(split)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    """A source path that does not exist names the accepted kinds of source."""
    with pytest.raises(DataError, match=r"does not exist.*stdlib"):
        prepare_data(str(tmp_path / "nope"), tmp_path / "data", progress=lambda _: None)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_too_few_documents_is_a_clear_error(tmp_path: Path) -> None:
    """A corpus that cannot fill both splits is refused before any tokenizer training."""
    corpus = _write_corpus(tmp_path / "corpus", 1)
    with pytest.raises(DataError, match="too few"):
        prepare_data(str(corpus), tmp_path / "data", vocab_size=300, progress=lambda _: None)


def test_jsonl_line_without_text_is_a_clear_error(tmp_path: Path) -> None:
    """A .jsonl record without a 'text' string is reported with its file and line number."""
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2 has no string field 'text'"):
        prepare_data(str(source), tmp_path / "data", vocab_size=300, progress=lambda _: None)


def test_jsonl_and_parquet_sources_are_read(tmp_path: Path) -> None:
    """Documents come from .jsonl lines and a parquet 'text' column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"record {i}: " + "lorem ipsum dolor sit amet " * (3 + i % 5) for i in range(60)]
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:30]))
    pq.write_table(pa.table({"text": texts[30:], "id": list(range(30))}), corpus / "b.parquet")
    out = prepare_data(str(corpus), tmp_path / "data", vocab_size=300, progress=lambda _: None)
    assert sorted(_split_documents(out / "train") + _split_documents(out / "val")) == sorted(texts)


def test_loader_batches_are_shifted_windows(prepared_data: Path) -> None:
    """y is x shifted by one token, both taken from the train token file."""
    loader = TokenLoader(prepared_data / "train", batch_size=4, seq_len=32, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def _pieces(row: np.ndarray, stream: np.ndarray, starts: set[int], bos: int) -> list[int]:
    """The stream offsets of the documents a packed row is made of (each piece opens with its BOS)."""
    offsets, position = [], 0
    while position < len(row):
        following = np.flatnonzero(row[position + 1:] == bos)
        end = position + 1 + int(following[0]) if len(following) else len(row)
        piece = row[position:end]
        matches = [s for s in starts if np.array_equal(stream[s:s + len(piece)], piece)]
        assert matches, "a row holds tokens that are not a document's opening"
        offsets.append(matches[0])
        position = end
    return offsets


def test_training_rows_start_at_a_bos_and_hold_whole_documents_by_best_fit(prepared_data: Path) -> None:
    """Every training row opens with BOS and is made of document openings from the train stream; only a row's
    last piece may be cropped, and no document appears twice within the epoch."""
    stream = load_tokens(prepared_data / "train")
    bos = int(json.loads((prepared_data / "train" / "meta.json").read_text())["bos_id"])
    starts = {int(s) for s in np.flatnonzero(np.asarray(stream) == bos)}
    lengths = dict(zip(sorted(starts), np.diff([*sorted(starts), len(stream)]), strict=True))
    loader = TokenLoader(prepared_data / "train", batch_size=8, seq_len=256, seed=3)
    seen: list[int] = []
    for _ in range(3):
        x, y = loader.next_batch()
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
        for row in rows:
            assert row[0] == bos
            offsets = _pieces(row, np.asarray(stream), starts, bos)
            assert all(lengths[offset] <= 257 for offset in offsets[:-1])  # whole documents, but the last
            seen.extend(offsets)
    assert loader.epoch == 0 and len(seen) == len(set(seen))
