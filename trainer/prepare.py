"""Fixed data preparation, tokenizer, dataloader and evaluation (the agent never edits this file).

Host side (`prepare_data`): collect documents from a source, pin a validation split, train a BPE
tokenizer on the train split, pre-tokenize both splits into flat token files, and lay them out as

    DATA_DIR/meta.json
    DATA_DIR/train/{tokens.bin, tokenizer.json, meta.json}
    DATA_DIR/val/{tokens.bin, tokenizer.json, meta.json}

Container side (everything else): `load_tokenizer`, `TokenLoader`, `token_byte_lengths`,
`evaluate_bpb`, and the checkpoint format (`export_checkpoint` / `load_checkpoint`).
Inside the container only torch, numpy and tiktoken exist: `tokenizers`, `pyarrow` and the
download code are imported lazily by the host-only functions that need them. The host of a Docker or
Slurm install has no torch at all (it never trains): the host side needs none.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tiktoken

try:
    import torch
except ImportError:  # a Docker/Slurm host: only the data preparation runs here, and it needs no torch
    torch = None  # type: ignore[assignment]

# The torch-free names live in trainer.layout; they are re-exported here for train.py.
from trainer.checkpoint_check import UnsafeCheckpoint, check_program
from trainer.layout import (
    CHECKPOINT_NAME,
    DataError,
    announce_export_start,
    read_json,
    read_split_meta,
    sha256_file,
)

# ---------------------------------------------------------------------------------------------
# Constants shared by every candidate and by the trusted evaluation

SEQ_LEN = 1024                 # context length of evaluation on CPU (cpu/tiny presets there)
GPU_SEQ_LEN = 2048             # context length of evaluation on GPU presets, as upstream
# The scoring shape by preset; "tiny" and "auto" follow the device the stage runs on. The eval stage reads
# the preset from its own (daemon-set) environment, never from anything the candidate wrote.
SCORING_SEQ_LENS = {"gpu": GPU_SEQ_LEN, "cpu": SEQ_LEN}
EVAL_TOKENS = 2**19            # target tokens scored by the eval stage (capped by the val split size)
EVAL_BATCH_SIZE = 16           # rows per eval forward pass
DEFAULT_VOCAB_SIZE = 8192
VAL_PER_MILLE = 100            # 10% of documents (chosen by content hash) form the pinned val split
BOS_TOKEN = "<|bos|>"          # starts every document; the only special token
PREPARE_VERSION = 1            # bump when the prepared layout or tokenization changes
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
# GPT-4-style pre-tokenizer split, with digit groups of at most 2 for small vocabularies.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
DOWNLOAD_RETRIES = 5
DOWNLOAD_WORKERS = 4
PROGRESS_EVERY_SECONDS = 5.0
# climbmix, the public autoresearch corpus: parquet shards with a pinned validation shard (the last one).
# `--source climbmix:N` takes N train shards plus that shard; AUTORESEARCH_CLIMBMIX_URL points at a mirror.
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542
CLIMBMIX_DEFAULT_SHARDS = 8

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PinnedSplit:
    """The documents of a source that pins its own val split, and what its meta.json records about the split."""

    train: list[str]
    val: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sources -> documents (host side)

def _stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library sources (default: the running interpreter's), without site-packages and test suites."""
    root = host_stdlib_root() if root is None else root
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skipped.intersection(p.relative_to(root).parts)]
    return sorted(files)


def _text_documents(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return  # a few stdlib files are deliberately not UTF-8; they are skipped, not guessed
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{line_no} is not JSON: fix or remove that line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{line_no} has no string field 'text': each line needs one")
                yield record["text"]
    elif suffix == ".parquet":
        yield from _parquet_documents(path)


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # host only

    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=["text"]):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


def _download(url: str, target: Path, progress: Progress) -> Path:
    """Download `url` to `target`, resuming a partial `.part` file, with retries and backoff."""
    if target.exists():
        return target
    partial = target.with_name(target.name + ".part")
    for attempt in range(1, DOWNLOAD_RETRIES + 1):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                # A server that ignores Range answers 200 with the whole file: start over.
                resumed = bool(have) and response.status == 206
                expected = _expected_size(response, have if resumed else 0)
                with open(partial, "ab" if resumed else "wb") as handle:
                    _copy_with_progress(response, handle, target.name, have if resumed else 0, expected, progress)
            _check_download(partial, expected, response.headers.get("X-Linked-ETag") or response.headers.get("ETag"))
            partial.rename(target)
            _write_checksum(target)
            progress(f"downloaded {url} ({target.stat().st_size / 1e6:.1f} MB)")
            return target
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # the part file is already complete
                partial.rename(target)
                return target
            if exc.code < 500 and exc.code != 429:
                raise DataError(f"download of {url} failed: HTTP {exc.code}; check the URL") from None
            error: Exception = exc
        except (urllib.error.URLError, OSError) as exc:
            error = exc
        progress(f"download of {url} failed ({error}); retry {attempt}/{DOWNLOAD_RETRIES}")
        time.sleep(min(2.0**attempt * 0.1, 10.0))
    raise DataError(f"download of {url} failed {DOWNLOAD_RETRIES} times: check the network or the URL")


def _expected_size(response: Any, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None and length.isdigit() else None


def _copy_with_progress(response: Any, handle: Any, name: str, done: int, expected: int | None,
                        progress: Progress) -> None:
    """Copy the body in 1 MiB chunks, with a progress line every PROGRESS_EVERY_SECONDS."""
    last = time.monotonic()
    while chunk := response.read(1 << 20):
        handle.write(chunk)
        done += len(chunk)
        if time.monotonic() - last >= PROGRESS_EVERY_SECONDS:
            last = time.monotonic()
            share = f" ({100 * done / expected:3.0f}%)" if expected else ""
            total = f"/{expected / 1e6:.1f}" if expected else ""
            progress(f"  {name}: {done / 1e6:.1f}{total} MB{share}")


def _check_download(partial: Path, expected: int | None, etag: str | None) -> None:
    """A short file is kept (.part) for the next attempt to resume; a wrong sha256 (the server's LFS ETag, when
    it sends one) is deleted."""
    size = partial.stat().st_size
    if expected is not None and size != expected:
        raise OSError(f"{partial.name}: got {size} of {expected} bytes")
    digest = (etag or "").strip('"').removeprefix("W/").strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{64}", digest) and sha256_file(partial) != digest:
        partial.unlink()
        raise OSError(f"{partial.name}: sha256 differs from the server's {digest[:12]}…; downloading again")


def _write_checksum(path: Path) -> None:
    path.with_name(path.name + ".sha256").write_text(sha256_file(path) + "\n")


def _verified(target: Path) -> bool:
    """A finished download whose recorded checksum still matches (a missing record is written now)."""
    record = target.with_name(target.name + ".sha256")
    if not record.exists():
        _write_checksum(target)
        return True
    return record.read_text().strip() == sha256_file(target)


def climbmix_urls(source: str) -> tuple[list[str], str]:
    """'climbmix' or 'climbmix:N' -> (the URLs of N train shards, the URL of the pinned validation shard)."""
    _, _, count = source.partition(":")
    try:
        shards = int(count) if count else CLIMBMIX_DEFAULT_SHARDS
    except ValueError:
        shards = 0
    if not 1 <= shards < CLIMBMIX_VAL_SHARD:
        raise DataError(f"{source!r}: give the number of train shards, e.g. climbmix:8 (1 to {CLIMBMIX_VAL_SHARD - 1}; "
                        "about 0.1 GB to download each)")
    base = (os.environ.get("AUTORESEARCH_CLIMBMIX_URL") or CLIMBMIX_URL).rstrip("/")
    return [f"{base}/shard_{i:05d}.parquet" for i in range(shards)], f"{base}/shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"


# The embedded `stdlib` source draws its val documents only from a val pool: parts of the standard library that
# the trainer image removes from every Python it holds (deploy/docker/trainer.Dockerfile, whatever the base), so
# the train container cannot read a val document (tests/redteam/test_redteam_val_split.py searches it whole).
# The primary pool is what Debian's python3 does not ship anyway; a host without it (Debian's python3 without
# idle, python3-tk and the test suite) uses the fallback pool, which every python3 ships: pydoc's topic texts,
# turtle (useless without tkinter), the pure-Python decimal (the C _decimal is used) and the modules that
# Python 3.12/3.13 removed, so that nothing torch or a training program runs can depend on them.
STDLIB_SHIPPED_TESTS = {"test_support.py"}  # Debian's libpython3.x-stdlib ships these under test/
STDLIB_MIN_VAL_BYTES = 1_000_000  # a pool is used when its val documents hold at least this much text


@dataclass(frozen=True)
class StdlibValPool:
    """One val pool of the `stdlib` source: its folders, top-level modules and (primary) regression tests."""

    name: str
    dirs: tuple[str, ...]
    modules: tuple[str, ...]
    tests: bool
    per_mille: int  # share of the pool's documents (by content hash) held out for val; the rest trains
    chunk_chars: int | None = None  # files cut at line ends into pieces of about this size (each its own row)
    install: str = ""  # what a Debian host installs to have the pool

    def files(self, root: Path) -> list[Path]:
        pool = [p for folder in self.dirs for p in (root / folder).rglob("*.py")]
        pool += [root / f"{module}.py" for module in self.modules if (root / f"{module}.py").is_file()]
        if self.tests:
            pool += [p for p in (root / "test").rglob("test_*.py")
                     if p.name not in STDLIB_SHIPPED_TESTS and "support" not in p.relative_to(root).parts]
        return sorted(p for p in pool if "__pycache__" not in p.parts)

    def parts(self) -> list[str]:
        return [*(f"{d}/" for d in self.dirs), *(f"{m}.py" for m in self.modules), *(["test/"] if self.tests else [])]


STDLIB_VAL_POOLS = (
    # idlelib etc. and the test suite hold ~14 MB: a quarter of it (about 3.5 MB) is val, the rest trains.
    StdlibValPool("primary", ("idlelib", "tkinter", "turtledemo"), (), tests=True, per_mille=250,
                  install="idle-python3.X, python3-tk and libpython3.X-testsuite"),
    # ~1.4 MB in all, all of it val; pydoc_data/topics.py alone is 0.75 MB and eval rows start at a document, so
    # files are cut into ~4 kB pieces (about 350 rows).
    StdlibValPool("fallback", ("pydoc_data",),
                  ("turtle", "_pydecimal", "aifc", "asynchat", "asyncore", "cgi", "cgitb", "chunk", "crypt",
                   "imghdr", "imp", "mailcap", "nntplib", "pipes", "smtpd", "sndhdr", "sunau", "telnetlib", "uu",
                   "xdrlib"), tests=False, per_mille=1000, chunk_chars=4096, install="libpython3.X-stdlib"),
)


def _hash_per_mille(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 1000


def _line_chunks(text: str, size: int | None) -> list[str]:
    """`text` cut after the first line end past every `size` characters (the whole text when size is None)."""
    if size is None:
        return [text]
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def host_stdlib_root() -> Path:
    """The host interpreter's standard library, the `stdlib` source's default root."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_pinned_split(progress: Progress, root: Path | None = None) -> PinnedSplit:
    """Train and val documents of the embedded source: val is a content-hash sample of the first pool that gives
    at least STDLIB_MIN_VAL_BYTES of text (primary, then fallback); the same stdlib always gives the same split."""
    root = host_stdlib_root() if root is None else root
    found = []
    for pool in STDLIB_VAL_POOLS:
        files = pool.files(root)
        docs = [chunk for path in files for doc in _text_documents(path) if doc.strip()
                for chunk in _line_chunks(doc, pool.chunk_chars) if chunk.strip()]
        val = [doc for doc in docs if _hash_per_mille(doc) < pool.per_mille]
        val_bytes = sum(len(doc.encode("utf-8")) for doc in val)
        found.append(f"{pool.name} ({', '.join(pool.parts())}; {pool.install}): {val_bytes / 1e6:.2f} MB")
        if val_bytes >= STDLIB_MIN_VAL_BYTES:
            break
    else:
        raise DataError(f"the standard library at {root} lacks the parts the `stdlib` source draws its val split "
                        f"from (the trainer image removes them; at least {STDLIB_MIN_VAL_BYTES / 1e6:.1f} MB of "
                        f"val text is needed): {'; '.join(found)}. Install either pool's packages (on Debian) or "
                        "use another data source")
    pooled, held_out = set(files), set(val)
    train = [doc for path in _stdlib_files(root) if path not in pooled for doc in _text_documents(path) if doc.strip()]
    train += [doc for doc in docs if doc not in held_out]
    progress(f"stdlib: {len(train)} train documents; {len(val)} val documents ({val_bytes / 1e6:.2f} MB) drawn only "
             f"from the {pool.name} val pool ({', '.join(pool.parts())}), which the trainer image removes")
    return PinnedSplit(train, val, {"stdlib_val_pool": {"name": pool.name, "parts": pool.parts(),
                                                        "val_bytes": val_bytes}})


def collect_pinned_split(source: str, download_dir: Path, progress: Progress = print,
                         stdlib_root: Path | None = None) -> PinnedSplit | None:
    """Train and val documents of a source that pins its own validation split (climbmix's val shard, stdlib's
    val pool; `stdlib_root` replaces the host's standard library); None for other sources.
    Shards keep their names in download_dir/climbmix, so a larger N downloads only the new ones."""
    if source == "stdlib":
        return _stdlib_pinned_split(progress, stdlib_root)
    if source != "climbmix" and not source.startswith("climbmix:"):
        return None
    train_urls, val_url = climbmix_urls(source)
    urls = [*train_urls, val_url]
    files = _download_all(urls, download_dir / "climbmix", progress, names=[u.rsplit("/", 1)[1] for u in urls])
    train = [doc for path in files[:-1] for doc in _parquet_documents(path) if doc.strip()]
    val = [doc for doc in _parquet_documents(files[-1]) if doc.strip()]
    progress(f"climbmix: {len(train)} train documents from {len(train_urls)} shards, {len(val)} val documents "
             f"from the pinned shard {CLIMBMIX_VAL_SHARD}")
    return PinnedSplit(train, val)


def _download_all(urls: list[str], cache_dir: Path, progress: Progress, names: list[str] | None = None) -> list[Path]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if names is None:
        names = [f"{i:05d}-{Path(url.split('?')[0]).name or 'shard.parquet'}" for i, url in enumerate(urls)]
    targets = [cache_dir / name for name in names]
    for target in targets:
        if target.exists() and not _verified(target):
            progress(f"{target.name} does not match its recorded sha256 (damaged): downloading it again")
            target.unlink()
    done = 0
    with ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
        for _ in pool.map(lambda pair: _download(pair[0], pair[1], progress), zip(urls, targets, strict=True)):
            done += 1
            progress(f"shards {done}/{len(urls)}")
    return targets


def collect_documents(source: str, download_dir: Path, progress: Progress = print) -> list[str]:
    """Documents of `source`: 'stdlib', a local file or folder, or comma-separated parquet URLs."""
    if source == "stdlib":
        files = _stdlib_files()
    elif source.startswith(("http://", "https://")):
        files = _download_all([u.strip() for u in source.split(",") if u.strip()], download_dir, progress)
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise DataError(f"data source {source!r} does not exist: give 'stdlib', a file, a folder or URLs")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    documents = [doc for path in files for doc in _text_documents(path) if doc.strip()]
    progress(f"collected {len(documents)} documents ({sum(map(len, documents)) / 1e6:.1f} M characters) from {source}")
    return documents


def is_val_document(text: str) -> bool:
    """The pinned split: a document's own content decides, so adding documents moves no others."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VAL_PER_MILLE


# ---------------------------------------------------------------------------------------------
# Tokenizer: BPE trained with `tokenizers` on the host, used through tiktoken everywhere

def _byte_level_alphabet() -> dict[str, int]:
    """Map the printable characters of byte-level BPE back to the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_for_byte = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in char_for_byte:
            char_for_byte[b] = chr(256 + extra)
            extra += 1
    return {char: b for b, char in char_for_byte.items()}


def train_tokenizer(documents: list[str], vocab_size: int) -> dict[str, Any]:
    """Train byte-level BPE; returns the serialisable tokenizer (pattern, ranked token bytes, BOS)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers  # host only

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # one id is left for BOS
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    byte_of = _byte_level_alphabet()
    # HF assigns ids in merge order, so an id is a valid tiktoken rank.
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [bytes(byte_of[ch] for ch in piece) for piece, _ in by_id]
    return {"format": "autoresearch-bpe-1", "pattern": SPLIT_PATTERN,
            "tokens": [base64.b64encode(t).decode("ascii") for t in tokens], "bos": BOS_TOKEN}


def _encoding_from_json(data: dict[str, Any], name: str) -> tiktoken.Encoding:
    tokens = [base64.b64decode(t) for t in data["tokens"]]
    ranks = {token: rank for rank, token in enumerate(tokens)}
    if len(ranks) != len(tokens):
        raise DataError(f"tokenizer {name} has duplicate tokens: run `autoresearch prepare` again")
    return tiktoken.Encoding(name=name, pat_str=data["pattern"], mergeable_ranks=ranks,
                             special_tokens={data["bos"]: len(tokens)})


def load_tokenizer(split_dir: str | Path) -> tiktoken.Encoding:
    """The split's tokenizer, after checking its checksum against the split's meta.json."""
    split_dir = Path(split_dir)
    meta = read_json(split_dir / "meta.json")
    path = split_dir / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{path} is missing: run `autoresearch prepare` to rebuild the data")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta.get("tokenizer_sha256"):
        raise DataError(f"{path} does not match the checksum in {split_dir / 'meta.json'} (corrupted or edited): "
                        "delete the data folder and run `autoresearch prepare` again")
    encoding = _encoding_from_json(json.loads(raw), name=f"autoresearch-{meta.get('vocab_size')}")
    if encoding.n_vocab != meta.get("vocab_size"):
        raise DataError(f"{path} has {encoding.n_vocab} tokens but meta.json says {meta.get('vocab_size')}: "
                        "run `autoresearch prepare` again")
    return encoding


def bos_id(encoding: tiktoken.Encoding) -> int:
    return encoding.encode_single_token(BOS_TOKEN)


def token_byte_lengths(encoding: tiktoken.Encoding) -> torch.Tensor:
    """UTF-8 byte length of every token id, from its raw bytes (a token may be a partial UTF-8
    sequence: decoding it to text would count replacement characters instead). Special tokens: 0."""
    special_ids = {encoding.encode_single_token(token) for token in encoding.special_tokens_set}
    lengths = [0 if i in special_ids else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Preparation (host side)

def _token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _write_split(split: str, documents: list[str], encoding: tiktoken.Encoding, tokenizer_raw: bytes,
                 directory: Path, common: dict[str, Any]) -> dict[str, Any]:
    directory.mkdir()
    dtype = _token_dtype(encoding.n_vocab)
    bos = bos_id(encoding)
    with open(directory / "tokens.bin", "wb") as handle:
        num_tokens = 0
        for start in range(0, len(documents), 1024):
            for ids in encoding.encode_ordinary_batch(documents[start:start + 1024], num_threads=os.cpu_count() or 1):
                row = np.asarray([bos, *ids], dtype=dtype)
                handle.write(row.tobytes())
                num_tokens += len(row)
    (directory / "tokenizer.json").write_bytes(tokenizer_raw)
    meta = {**common, "split": split, "dtype": dtype.name, "bos_id": bos, "num_documents": len(documents),
            "num_bytes": sum(len(d.encode("utf-8")) for d in documents), "num_tokens": num_tokens,
            "tokens_sha256": sha256_file(directory / "tokens.bin")}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _is_prepared(out_dir: Path, input_sha256: str) -> bool:
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("input_sha256") == input_sha256 and all(
        (out_dir / split / name).exists() for split in ("train", "val")
        for name in ("tokens.bin", "tokenizer.json", "meta.json"))


def prepare_data(source: str, out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                 progress: Progress = print, stdlib_root: Path | None = None) -> Path:
    """Prepare `source` into `out_dir` (layout in the module docstring); a no-op when unchanged.
    `stdlib_root` replaces the host's standard library for the `stdlib` source (tests)."""
    if not 256 + 1 < vocab_size <= 2**32:
        raise DataError(f"vocab_size {vocab_size} is out of range: use more than 257 (bytes + BOS)")
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pinned = collect_pinned_split(source, out_dir / ".downloads", progress, stdlib_root)  # its own val split
    documents = [*pinned.train, *pinned.val] if pinned else collect_documents(source, out_dir / ".downloads", progress)
    split_rule = f"pinned:{len(pinned.val)}" if pinned else "hash"
    if pinned and pinned.meta:
        split_rule += ":" + json.dumps(pinned.meta, sort_keys=True)
    fingerprint = hashlib.sha256(f"v{PREPARE_VERSION}:{vocab_size}:{SPLIT_PATTERN}:{split_rule}".encode())
    for doc in documents:
        fingerprint.update(hashlib.sha256(doc.encode("utf-8")).digest())
    input_sha256 = fingerprint.hexdigest()
    if _is_prepared(out_dir, input_sha256):
        progress(f"{out_dir} is already prepared from these inputs: nothing to do")
        return out_dir

    if pinned:
        val_docs, held_out = pinned.val, set(pinned.val)
        train_docs = [d for d in pinned.train if d not in held_out]  # a val document never trains, even if repeated
    else:
        val_docs = [d for d in documents if is_val_document(d)]
        train_docs = [d for d in documents if not is_val_document(d)]
    if len(val_docs) < 1 or len(train_docs) < 2:
        raise DataError(f"{source!r} gave {len(documents)} documents, too few for a train and a val split: "
                        "use a source with more documents (e.g. more files, or a .jsonl with one text per line)")
    progress(f"split: {len(train_docs)} train / {len(val_docs)} val documents; training BPE (vocab {vocab_size})")
    tokenizer_raw = (json.dumps(train_tokenizer(train_docs, vocab_size)) + "\n").encode()
    encoding = _encoding_from_json(json.loads(tokenizer_raw), name=f"autoresearch-{vocab_size}")
    common = {"prepare_version": PREPARE_VERSION, "source": source, "input_sha256": input_sha256,
              "vocab_size": encoding.n_vocab, "python": sys.version.split()[0],
              "tokenizer_sha256": hashlib.sha256(tokenizer_raw).hexdigest(), **(pinned.meta if pinned else {})}

    # Build beside the final folders and swap in at the end, so a crash leaves the old data intact.
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        split_meta = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            progress(f"tokenizing {split} ({len(docs)} documents)")
            split_meta[split] = _write_split(split, docs, encoding, tokenizer_raw, staging / split, common)
        top_meta = {**common, "counts": {s: {k: m[k] for k in ("num_documents", "num_bytes", "num_tokens")}
                                         for s, m in split_meta.items()},
                    "checksums": {f"{s}/tokens.bin": m["tokens_sha256"] for s, m in split_meta.items()}}
        (out_dir / "meta.json").unlink(missing_ok=True)  # invalidates the old data first
        for split in ("train", "val"):
            if (out_dir / split).exists():
                shutil.rmtree(out_dir / split)
            (staging / split).rename(out_dir / split)
            for path in (out_dir / split).iterdir():
                path.chmod(0o444)
        (out_dir / "meta.json").write_text(json.dumps(top_meta, indent=2) + "\n")
        (out_dir / "meta.json").chmod(0o444)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"prepared {out_dir} in {time.monotonic() - started:.1f} s: "
             f"{split_meta['train']['num_tokens']:,} train / {split_meta['val']['num_tokens']:,} val tokens")
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading prepared data (container side)

def load_tokens(split_dir: str | Path) -> np.ndarray:
    """The split's token stream as a read-only memmap (no tokenizing at training time)."""
    split_dir = Path(split_dir)
    meta = read_split_meta(split_dir)
    path = split_dir / "tokens.bin"
    if not path.exists():
        raise DataError(f"{path} is missing: run `autoresearch prepare` to rebuild the data")
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) != meta["num_tokens"]:
        raise DataError(f"{path} holds {len(tokens)} tokens, meta.json says {meta['num_tokens']}: "
                        "the data is damaged; run `autoresearch prepare` again")
    return tokens


PACKING_BUFFER_DOCS = 1000  # documents the best-fit packer chooses from (as upstream's dataloader)


class DocumentPacker:
    """Rows of `width` tokens, each starting at a document's BOS and filled with whole documents by best fit
    (as upstream's training dataloader): the longest buffered document that fits the room left goes in; when
    none fits, the shortest one is cropped to fill the row exactly (its tail is dropped). Documents are visited
    in a seeded random order per epoch; `epoch` counts completed passes."""

    def __init__(self, tokens: np.ndarray, bos: int, width: int, seed: int = 0) -> None:
        self.tokens, self.width = tokens, width
        starts = np.concatenate([np.flatnonzero(np.asarray(tokens[i:i + _BOS_SCAN_BLOCK]) == bos) + i
                                 for i in range(0, len(tokens), _BOS_SCAN_BLOCK)] or [np.empty(0, np.int64)])
        if len(starts) == 0:
            raise DataError("the train split holds no BOS token: prepare the data again")
        self.starts = starts.astype(np.int64)
        self.lengths = np.diff(np.append(self.starts, len(tokens)))
        self.buffer_docs = min(PACKING_BUFFER_DOCS, max(1, len(self.starts) // 4))  # small splits: still an epoch
        self.generator = np.random.default_rng(seed)
        self.epoch, self._order, self._cursor = 0, self.generator.permutation(len(self.starts)), 0
        self._buffer: list[tuple[int, int]] = []  # (length, document), sorted

    def _refill(self) -> None:
        while len(self._buffer) < self.buffer_docs:
            if self._cursor == len(self._order):
                self.epoch += 1
                self._order, self._cursor = self.generator.permutation(len(self.starts)), 0
            document = int(self._order[self._cursor])
            self._cursor += 1
            bisect.insort(self._buffer, (int(self.lengths[document]), document))

    def row(self) -> np.ndarray:
        """The next row, int64 (width,)."""
        pieces, room = [], self.width
        while room > 0:
            self._refill()
            fit = bisect.bisect_right(self._buffer, (room, len(self.starts))) - 1
            length, document = self._buffer.pop(max(fit, 0))  # fit < 0: none fits, crop the shortest
            take = min(length, room)
            start = int(self.starts[document])
            pieces.append(np.asarray(self.tokens[start:start + take], dtype=np.int64))
            room -= take
        return np.concatenate(pieces)


class TokenLoader:
    """Training batches (x, y) of shape (batch_size, seq_len) from a split's token file.

    When the split names a BOS token (every prepared split does), each row of seq_len + 1 tokens starts at a
    document's BOS and is packed with whole documents by best fit (DocumentPacker), like the eval's rows and
    upstream's dataloader. Otherwise the stream is cut into rows visited in a seeded random order per epoch.
    On CUDA, rows are staged in pinned memory and copied asynchronously."""

    def __init__(self, split_dir: str | Path, batch_size: int, seq_len: int, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.tokens = load_tokens(split_dir)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        self.num_rows = (len(self.tokens) - 1) // seq_len
        if self.num_rows < batch_size:
            raise DataError(f"the split has {len(self.tokens)} tokens, fewer than one batch of "
                            f"{batch_size}×{seq_len}: use a smaller batch or prepare more data")
        self.generator = np.random.default_rng(seed)
        self._epoch, self._order, self._cursor = 0, self.generator.permutation(self.num_rows), 0
        bos = read_split_meta(split_dir).get("bos_id")
        self.packer = (DocumentPacker(self.tokens, bos, seq_len + 1, seed)
                       if isinstance(bos, int) and not isinstance(bos, bool) else None)
        self._pinned = self.device.type == "cuda"

    @property
    def epoch(self) -> int:
        return self.packer.epoch if self.packer is not None else self._epoch

    def _stream_rows(self) -> np.ndarray:
        if self._cursor + self.batch_size > self.num_rows:
            self._epoch += 1
            self._order, self._cursor = self.generator.permutation(self.num_rows), 0
        starts = self._order[self._cursor:self._cursor + self.batch_size] * self.seq_len
        self._cursor += self.batch_size
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packer is not None:
            rows = np.stack([self.packer.row() for _ in range(self.batch_size)])
        else:
            rows = self._stream_rows()
        batch = torch.from_numpy(rows)
        if self._pinned:
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


def scoring_seq_len(preset: str | None = None, cuda: bool | None = None) -> int:
    """The sequence length the eval stage scores at (and export_checkpoint exports at): from the preset
    (default: $AUTORESEARCH_PRESET), with "auto", "tiny" or no preset following the device (default: whether
    CUDA is available). Raises ValueError for an unknown preset."""
    if preset is None:
        preset = os.environ.get("AUTORESEARCH_PRESET", "")
    preset = preset.strip()
    if cuda is None:
        cuda = torch.cuda.is_available()
    if preset in ("", "auto", "tiny"):
        preset = "gpu" if cuda else "cpu"
    if preset not in SCORING_SEQ_LENS:
        raise ValueError(f"AUTORESEARCH_PRESET={preset!r} is not a preset: use auto, gpu, cpu or tiny")
    return SCORING_SEQ_LENS[preset]


_BOS_SCAN_BLOCK = 1 << 24  # tokens compared per block while looking for document starts


def _bos_aligned_starts(tokens: np.ndarray, bos: int, seq_len: int, rows: int) -> list[int]:
    """Starts of up to `rows` rows of seq_len + 1 tokens, each at a BOS, in stream order, whose targets never
    overlap: a row takes whole following documents (each still opened by its BOS) and the tail of a document
    longer than the row's room is not scored, as upstream's evaluation crops it."""
    starts: list[int] = []
    cursor, scanned = 0, 0
    positions = np.empty(0, dtype=np.int64)
    while len(starts) < rows:
        found = int(np.searchsorted(positions, cursor))
        while found == len(positions) and scanned < len(tokens):  # read the next block of the stream
            block = np.flatnonzero(np.asarray(tokens[scanned:scanned + _BOS_SCAN_BLOCK]) == bos) + scanned
            positions, scanned = block, min(scanned + _BOS_SCAN_BLOCK, len(tokens))
            found = int(np.searchsorted(positions, cursor))
        if found == len(positions) or positions[found] + seq_len >= len(tokens):
            break
        start = int(positions[found])
        starts.append(start)
        cursor = start + seq_len  # the row's last token may be the next BOS: it starts the next row
    return starts


def eval_token_window(split_dir: str | Path, max_tokens: int = EVAL_TOKENS, seq_len: int = SEQ_LEN) -> np.ndarray:
    """The fixed rows of the val split that are scored, shape (rows, seq_len + 1) int64: inputs are [:, :-1],
    targets [:, 1:], about max_tokens targets in all. When the split's meta.json names a BOS token, every row
    starts at a document's BOS (column 0), as upstream's evaluation; otherwise rows are consecutive slices."""
    tokens = load_tokens(split_dir)
    bos = read_split_meta(split_dir).get("bos_id")
    wanted = max(max_tokens // seq_len, 1)
    if isinstance(bos, int) and not isinstance(bos, bool):
        starts = _bos_aligned_starts(tokens, bos, seq_len, wanted)
    else:
        starts = [row * seq_len for row in range(min(wanted, (len(tokens) - 1) // seq_len))]
    if not starts:
        raise DataError(f"the val split ({len(tokens)} tokens) has no document start followed by a row of "
                        f"{seq_len} tokens: prepare a bigger corpus")
    return np.stack([np.asarray(tokens[start:start + seq_len + 1], dtype=np.int64) for start in starts])


# ---------------------------------------------------------------------------------------------
# Evaluation: bits per byte

def row_pairs(tokens: np.ndarray | torch.Tensor, seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (rows, seq_len) int64: from rows of seq_len + 1 ids (2-D), or from a stream
    of rows × seq_len + 1 ids (1-D) cut into consecutive rows."""
    data = torch.as_tensor(np.asarray(tokens) if isinstance(tokens, np.memmap) else tokens, dtype=torch.int64)
    if data.dim() == 2:
        return data[:, :-1], data[:, 1:]
    rows = (len(data) - 1) // seq_len
    return data[:rows * seq_len].view(rows, seq_len), data[1:rows * seq_len + 1].view(rows, seq_len)


def evaluate_bpb(model: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray | torch.Tensor,
                 token_bytes: torch.Tensor, seq_len: int = SEQ_LEN, batch_size: int = EVAL_BATCH_SIZE,
                 device: str | torch.device = "cpu") -> float:
    """val_bpb = sum of target nats / (ln 2 × sum of target UTF-8 bytes); zero-byte (special) targets
    are excluded from both sums. `tokens` holds either a stream of rows × seq_len + 1 ids or rows of
    seq_len + 1 ids (eval_token_window's shape); `model` maps (B, T) int64 ids to (B, T, V) logits."""
    with torch.no_grad():
        return _evaluate_bpb(model, tokens, token_bytes, seq_len, batch_size, device)


def _evaluate_bpb(model: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray | torch.Tensor,
                  token_bytes: torch.Tensor, seq_len: int, batch_size: int, device: str | torch.device) -> float:
    inputs, targets = row_pairs(tokens, seq_len)
    rows = len(inputs)
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, rows, batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device)
        logits = model(x).float()
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        nbytes = token_bytes[y.reshape(-1)]
        total_nats += (nats * (nbytes > 0)).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
    if total_bytes.item() == 0:
        raise DataError("the evaluated tokens hold no bytes: the val split is empty or only special tokens")
    return float(total_nats.item() / (math.log(2) * total_bytes.item()))


# ---------------------------------------------------------------------------------------------
# Checkpoint format: a torch.export program, (B, T) int64 ids -> (B, T, V) logits, T = scoring_seq_len()

def export_checkpoint(model: torch.nn.Module, out_dir: str | Path, device: str | torch.device = "cpu",
                      seq_len: int | None = None) -> Path:
    """Export `model` (eval mode, fp32) with a dynamic batch dimension to out_dir/model.pt2, for inputs of
    seq_len tokens (default: scoring_seq_len(), the shape the eval stage will score at)."""
    announce_export_start()  # the harness's clock: training time ends here
    path = Path(out_dir) / CHECKPOINT_NAME
    example = torch.zeros(2, seq_len or scoring_seq_len(), dtype=torch.int64, device=device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


# torch.export.load trusts its archive: entries flagged `use_pickle`, custom/opaque-object constants, legacy
# `*.pt` payloads and a failed weights-only load of the sample inputs are unpickled, `data/aotinductor/` holds
# shared libraries, and `guards_code` strings are exec'd by `.module()`. A candidate's archive may hold only
# what export_checkpoint writes: raw tensor payloads, JSON, and graph nodes that call aten ops.
_PT2_FILES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
              "models/model.json", "data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
              "data/constants/model_constants_config.json"}
_PT2_PAYLOADS = {"data/weights/model_weights_config.json": re.compile(r"weight_[0-9]+"),
                 "data/constants/model_constants_config.json": re.compile(r"tensor_[0-9]+")}
# Weights, constants and JSON together, unpacked (a zip bomb or an absurd model is refused before loading).
MAX_CHECKPOINT_BYTES = 8 * 1024**3




def check_checkpoint_archive(path: str | Path | BinaryIO) -> None:
    """Raise UnsafeCheckpoint unless the .pt2 zip holds only export_checkpoint's plain entries (DataError when
    it is not such a zip at all)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            root = names[0].split("/", 1)[0] if names else ""
            if not root or len(set(names)) != len(names):
                raise UnsafeCheckpoint("the archive is empty or lists an entry twice")
            relative = set()
            for name in names:
                if not name.startswith(root + "/"):
                    raise UnsafeCheckpoint(f"entry {name!r} lies outside the archive root {root!r}")
                relative.add(name[len(root) + 1:])
            if (total := sum(info.file_size for info in archive.infolist())) > MAX_CHECKPOINT_BYTES:
                raise UnsafeCheckpoint(f"the archive unpacks to {total} bytes (cap {MAX_CHECKPOINT_BYTES})")
            configs = {name: json.loads(archive.read(f"{root}/{name}")) for name in _PT2_PAYLOADS}
            program = json.loads(archive.read(f"{root}/models/model.json"))
    except UnsafeCheckpoint:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise DataError(f"checkpoint {path} is not a loadable torch.export program ({type(exc).__name__}: "
                        f"{str(exc)[:200]}): save it with trainer.prepare.export_checkpoint") from None
    payloads: set[str] = set()
    for config_name, pattern in _PT2_PAYLOADS.items():
        entries = configs[config_name].get("config") if isinstance(configs[config_name], dict) else None
        if not isinstance(entries, dict):
            raise UnsafeCheckpoint(f"{config_name} has no config mapping")
        folder = config_name.rsplit("/", 1)[0]
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                raise UnsafeCheckpoint(f"{config_name} entry {fqn!r} is pickled (use_pickle), which runs code")
            path_name = meta.get("path_name")
            if not isinstance(path_name, str) or not pattern.fullmatch(path_name) \
                    or not isinstance(meta.get("tensor_meta"), dict):
                raise UnsafeCheckpoint(f"{config_name} entry {fqn!r} is not a plain tensor ({path_name!r}): "
                                       "custom and opaque objects are unpickled")
            payloads.add(f"{folder}/{path_name}")
    if unexpected := sorted(relative - _PT2_FILES - payloads):
        raise UnsafeCheckpoint(f"unexpected archive entries {unexpected[:5]} (pickled, compiled or legacy payloads)")
    if missing := sorted((_PT2_FILES | payloads) - relative):
        raise UnsafeCheckpoint(f"missing archive entries {missing[:5]}")
    check_program(program)  # allow-lists: pure ops, shape-expression grammar, no mutation, size caps


_PICKLE_LOADS = pickle.loads


@contextmanager
def _refuse_unpickling(refused: list[str]) -> Iterator[None]:
    """Within the block, pickle.load(s) and torch's object unpickler refuse, and torch.load runs weights-only;
    each refusal is appended to `refused` (torch may swallow the exception)."""
    originals = (pickle.loads, pickle.load, torch.load, torch._C._pickle_load_obj)
    torch_load = originals[2]

    def refuse(what: str) -> UnsafeCheckpoint:
        refused.append(what)
        return UnsafeCheckpoint(f"the archive asked for {what}, which can run code")

    def guarded_pickle(*_args: Any, **_kwargs: Any) -> Any:
        raise refuse("plain unpickling")

    def guarded_torch_load(*args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is False:
            raise refuse("torch.load(weights_only=False)")
        return torch_load(*args, weights_only=True, **kwargs)

    def guarded_object_load(*_args: Any, **_kwargs: Any) -> Any:
        raise refuse("a TorchScript custom object")

    pickle.loads, pickle.load, torch.load = guarded_pickle, guarded_pickle, guarded_torch_load
    torch._C._pickle_load_obj = guarded_object_load
    try:
        yield
    finally:
        pickle.loads, pickle.load, torch.load, torch._C._pickle_load_obj = originals


def load_checkpoint(path: str | Path, handle: BinaryIO | None = None) -> torch.export.ExportedProgram:
    """Load an exported program without running any of the candidate's Python code: the archive is checked
    entry by entry first, and the load itself runs with unpickling refused. `handle`: read the archive from
    this open file instead (`path` then only names it in messages)."""
    if handle is None and not Path(path).is_file():
        raise DataError(f"checkpoint {path} is missing: the train stage must write {CHECKPOINT_NAME}")
    refused: list[str] = []
    try:
        check_checkpoint_archive(path if handle is None else handle)
        if handle is not None:
            handle.seek(0)
        with _refuse_unpickling(refused):
            program = torch.export.load(str(path) if handle is None else handle)
    except UnsafeCheckpoint as exc:
        raise DataError(f"checkpoint {path} is refused as unsafe: {exc}; save it with "
                        "trainer.prepare.export_checkpoint") from None
    except DataError:
        raise
    except Exception as exc:  # torch raises many types for a damaged archive
        raise DataError(f"checkpoint {path} is not a loadable torch.export program ({type(exc).__name__}: "
                        f"{str(exc)[:200]}): save it with trainer.prepare.export_checkpoint") from None
    if refused:
        raise DataError(f"checkpoint {path} is refused as unsafe: the archive asked for {refused[0]}, which can "
                        "run code; save it with trainer.prepare.export_checkpoint")
    return program
