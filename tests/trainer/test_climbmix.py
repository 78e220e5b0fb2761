"""`--source climbmix[:N]`: N train shards plus the pinned validation shard, from a local stand-in server."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trainer import prepare
from trainer.prepare import CLIMBMIX_VAL_SHARD, DataError, climbmix_urls, prepare_data

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "five", "boxing", "wizards", "jump", "quickly"]


def _texts(shard: int, count: int = 30) -> list[str]:
    return [f"shard {shard} doc {i}: " + " ".join(WORDS[(i + j + shard) % len(WORDS)] for j in range(40))
            for i in range(count)]


def _parquet(texts: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue()


class _Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = {f"/shard_{i:05d}.parquet": _parquet(_texts(i)) for i in range(3)}
        self.files[f"/shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"] = _parquet(_texts(99, 12))
        self.requests: list[str] = []
        self.wrong_etag = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers.get("Range") else 0
        digest = "0" * 64 if self.server.wrong_etag else hashlib.sha256(body).hexdigest()
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("X-Linked-ETag", f'"{digest}"')  # what Hugging Face sends for LFS files
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AUTORESEARCH_CLIMBMIX_URL", srv.base)
    monkeypatch.setattr(prepare, "DOWNLOAD_RETRIES", 2)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_val_split_is_exactly_the_pinned_shard(server: _Server, tmp_path: Path) -> None:
    """climbmix:2 trains on shards 0 and 1 and validates on the pinned shard only (never shard 2)."""
    out = prepare_data("climbmix:2", tmp_path / "data", vocab_size=300, progress=lambda _: None)
    val_meta = json.loads((out / "val" / "meta.json").read_text())
    train_meta = json.loads((out / "train" / "meta.json").read_text())
    assert val_meta["num_documents"] == 12 and train_meta["num_documents"] == 60
    assert val_meta["source"] == "climbmix:2"
    assert sorted(server.requests) == ["/shard_00000.parquet", "/shard_00001.parquet",
                                       f"/shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"]


def test_more_shards_download_only_the_new_ones(server: _Server, tmp_path: Path) -> None:
    """Shards keep their names: going from climbmix:1 to climbmix:2 fetches shard 1 only."""
    prepare_data("climbmix:1", tmp_path / "data", vocab_size=300, progress=lambda _: None)
    server.requests.clear()
    prepare_data("climbmix:2", tmp_path / "data", vocab_size=300, progress=lambda _: None)
    assert server.requests == ["/shard_00001.parquet"]


def test_a_val_document_repeated_in_a_train_shard_never_trains(server: _Server, tmp_path: Path) -> None:
    """A document of the validation shard that also sits in a train shard is dropped from train."""
    server.files["/shard_00000.parquet"] = _parquet([*_texts(0), _texts(99, 12)[3]])
    out = prepare_data("climbmix:1", tmp_path / "data", vocab_size=300, progress=lambda _: None)
    assert json.loads((out / "train" / "meta.json").read_text())["num_documents"] == 30


def test_download_shows_progress_and_records_checksums(server: _Server, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress lines show MB and percent; every shard gets a .sha256 record matching its bytes."""
    monkeypatch.setattr(prepare, "PROGRESS_EVERY_SECONDS", 0.0)
    lines: list[str] = []
    prepare.collect_pinned_split("climbmix:1", tmp_path, lines.append)
    assert any("shard_00000.parquet:" in line and "MB (100%)" in line for line in lines)
    shard = tmp_path / "climbmix" / "shard_00000.parquet"
    assert (tmp_path / "climbmix" / "shard_00000.parquet.sha256").read_text().strip() == \
        hashlib.sha256(shard.read_bytes()).hexdigest()


def test_server_checksum_mismatch_is_refused(server: _Server, tmp_path: Path) -> None:
    """A shard whose bytes differ from the server's sha256 is deleted, retried, then a clear error."""
    server.wrong_etag = True
    with pytest.raises(DataError, match="failed 2 times"):
        prepare.collect_pinned_split("climbmix:1", tmp_path, lambda _: None)
    assert not (tmp_path / "climbmix" / "shard_00000.parquet").exists()


def test_damaged_cached_shard_is_downloaded_again(server: _Server, tmp_path: Path) -> None:
    """A cached shard that no longer matches its recorded checksum is fetched again, not trusted."""
    prepare.collect_pinned_split("climbmix:1", tmp_path, lambda _: None)
    shard = tmp_path / "climbmix" / "shard_00000.parquet"
    shard.write_bytes(b"bit rot")
    server.requests.clear()
    pinned = prepare.collect_pinned_split("climbmix:1", tmp_path, lambda _: None)
    assert server.requests == ["/shard_00000.parquet"] and pinned is not None and len(pinned.train) == 30


def test_interrupted_download_resumes(server: _Server, tmp_path: Path) -> None:
    """A .part file left by an interrupted download is continued with a Range request."""
    body = server.files["/shard_00000.parquet"]
    folder = tmp_path / "climbmix"
    folder.mkdir()
    (folder / "shard_00000.parquet.part").write_bytes(body[:100])
    prepare.collect_pinned_split("climbmix:1", tmp_path, lambda _: None)
    assert (folder / "shard_00000.parquet").read_bytes() == body


@pytest.mark.parametrize("source", ["climbmix:0", "climbmix:x", f"climbmix:{CLIMBMIX_VAL_SHARD}"])
def test_bad_shard_count_is_a_clear_error(source: str) -> None:
    """A shard count that is not a number in range names the accepted form."""
    with pytest.raises(DataError, match=r"e\.g\. climbmix:8"):
        climbmix_urls(source)


def test_default_is_upstreams_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain 'climbmix' takes the default shard count from Hugging Face, validation on the last shard."""
    monkeypatch.delenv("AUTORESEARCH_CLIMBMIX_URL", raising=False)
    train, val = climbmix_urls("climbmix")
    assert len(train) == prepare.CLIMBMIX_DEFAULT_SHARDS
    assert train[0] == f"{prepare.CLIMBMIX_URL}/shard_00000.parquet"
    assert val == f"{prepare.CLIMBMIX_URL}/shard_06542.parquet"


def test_prepare_climbmix_is_one_command(server: _Server, run_cli, tmp_path: Path) -> None:
    """`autoresearch prepare --source climbmix:1` downloads, splits and tokenizes in one go."""
    proc = run_cli("prepare", "--source", "climbmix:1", "--vocab-size", "300",
                   env={"AUTORESEARCH_CLIMBMIX_URL": server.base, "AUTORESEARCH_WORKSPACE": str(tmp_path / "ws")})
    assert proc.returncode == 0, proc.stderr
    assert "pinned shard 6542" in proc.stdout and "data ready" in proc.stdout
