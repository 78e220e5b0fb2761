"""prepare.py with parquet shard URLs: parallel, retried, resumable downloads from a local HTTP server."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trainer.prepare import BOS_TOKEN, DataError, load_tokenizer, load_tokens, prepare_data

TEXTS = [f"shard text {i}: " + "pack my box with five dozen liquor jugs. " * (2 + i % 6) for i in range(80)]


def _parquet_bytes(texts: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue()


class _ShardServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ShardHandler)
        self.files = {"/a.parquet": _parquet_bytes(TEXTS[:40]), "/b.parquet": _parquet_bytes(TEXTS[40:])}
        self.failures_left = 0
        self.range_requests: list[str] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{name}"


class _ShardHandler(BaseHTTPRequestHandler):
    server: _ShardServer

    def do_GET(self) -> None:
        if self.server.failures_left > 0:
            self.server.failures_left -= 1
            self.send_error(503)
            return
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if (wanted := self.headers.get("Range")) is not None:
            self.server.range_requests.append(wanted)
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return


@pytest.fixture()
def shard_server() -> Iterator[_ShardServer]:
    server = _ShardServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _all_documents(data: Path) -> list[str]:
    docs = []
    for split in ("train", "val"):
        text = load_tokenizer(data / split).decode(load_tokens(data / split).tolist())
        docs += [d for d in text.split(BOS_TOKEN) if d]
    return sorted(docs)


def test_shards_are_downloaded_after_server_errors(shard_server: _ShardServer, tmp_path: Path) -> None:
    """Transient 503 answers are retried; every shard's text ends up in the prepared data."""
    shard_server.failures_left = 2
    source = f"{shard_server.url('/a.parquet')},{shard_server.url('/b.parquet')}"
    messages: list[str] = []
    data = prepare_data(source, tmp_path / "data", vocab_size=300, progress=messages.append)
    assert _all_documents(data) == sorted(TEXTS)
    assert any("retry 1/" in m for m in messages) and any("shards 2/2" in m for m in messages)


def test_partial_download_is_resumed(shard_server: _ShardServer, tmp_path: Path) -> None:
    """A .part file left by an interrupted download is continued with a Range request."""
    body = shard_server.files["/a.parquet"]
    downloads = tmp_path / "data" / ".downloads"
    downloads.mkdir(parents=True)
    (downloads / "00000-a.parquet.part").write_bytes(body[:100])
    prepare_data(shard_server.url("/a.parquet"), tmp_path / "data", vocab_size=300, progress=lambda _: None)
    assert shard_server.range_requests == ["bytes=100-"]
    assert (downloads / "00000-a.parquet").read_bytes() == body


def test_missing_shard_is_a_clear_error(shard_server: _ShardServer, tmp_path: Path) -> None:
    """A 404 is not retried: it names the URL and asks to check it."""
    with pytest.raises(DataError, match=r"HTTP 404; check the URL"):
        prepare_data(shard_server.url("/missing.parquet"), tmp_path / "data", vocab_size=300, progress=lambda _: None)
