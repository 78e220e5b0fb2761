"""trainer.transport: what the scorer's calls move through host memory, and the choice between transports.

The memfd path runs here for real. The CUDA device transport needs a GPU and the driver's Python bindings: its
round trip below runs wherever both exist and is skipped elsewhere with the reason (it has not run on hardware
in this project yet). The child-side refusal of a transport is exercised with a scorer-side stand-in that
offers host memory under the device transport's name (the edge of the world: no CUDA here).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import model_process, transport
from trainer.eval_stage import TRANSPORT_ENV, transport_order
from trainer.model_process import ModelProcess
from trainer.prepare import export_checkpoint

CUDA_READY = torch.cuda.is_available() and importlib.util.find_spec("cuda") is not None \
    and importlib.util.find_spec("cuda.bindings") is not None
NO_CUDA_REASON = ("the device transport needs a CUDA GPU and cuda-bindings (cuda.bindings.driver): "
                  f"cuda available={torch.cuda.is_available()}; it is unverified until this test runs on one")

ECHO = """
import json, mmap, socket, sys
import numpy as np
channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--socket-fd") + 1]))
message, fds, _, _ = socket.recv_fds(channel, 65536, 3)
init = json.loads(message)
channel.send(json.dumps({"ready": True, "num_params": 1}).encode())
while channel.recv(65536):
    channel.send(json.dumps({"done": True}).encode())
"""


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"PK\x03\x04 stand-in checkpoint")
    return path


def test_memfd_host_bytes_are_inputs_logits_and_control_messages(tmp_path: Path) -> None:
    """The memfd counter equals, per call, rows*T int64 inputs + rows*T*V fp32 logits + request + reply bytes."""
    script = tmp_path / "echo.py"
    script.write_text(textwrap.dedent(ECHO))
    seq_len, vocab = 8, 5
    reply = len(json.dumps({"done": True}).encode())
    with ModelProcess(None, [sys.executable, str(script)]) as model:
        model.load(_checkpoint(tmp_path), 4, seq_len, vocab)
        assert model.host_bytes == 0 and model.transport == "memfd"
        expected = 0
        for rows in (4, 1, 3):
            model(torch.zeros(rows, seq_len, dtype=torch.int64))
            expected += rows * seq_len * 8 + rows * seq_len * vocab * 4 + len(json.dumps({"rows": rows})) + reply
            assert model.host_bytes == expected


class _HostClaimingDevice(transport.HostTransport):
    """Host buffers offered under the device transport's name: what a CPU-only model process must refuse."""

    name = "device"

    def allocate(self, max_rows: int, seq_len: int, vocab: int) -> tuple[list[int], dict[str, Any]]:
        fds, _ = super().allocate(max_rows, seq_len, vocab)
        return fds, {"transport": "device", "sizes": [max_rows * seq_len * 8, max_rows * seq_len * vocab * 4]}


def test_model_process_refuses_a_transport_it_cannot_map_and_the_next_one_is_used(
        prepared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model process without CUDA answers the device offer with transport_error; the scorer falls back to the
    next transport, notes why, and scores through it."""
    from tests.trainer.test_trainer_harness import _TokenModel

    real = model_process.scorer_transport
    monkeypatch.setattr(model_process, "scorer_transport",
                        lambda kind, device: _HostClaimingDevice() if kind == "device" else real(kind, device))
    export_checkpoint(_TokenModel(512), tmp_path, seq_len=16)
    with ModelProcess(None) as model:
        assert model.load(tmp_path / "model.pt2", 2, 16, 512, ("device", "memfd")) > 0
        assert model.transport == "memfd"
        assert model.transport_notes and "no CUDA device" in model.transport_notes[0]
        assert model(torch.zeros(2, 16, dtype=torch.int64)).shape == (2, 16, 512)


def test_transports_a_scorer_cannot_have_are_refused_before_anything_is_sent() -> None:
    """On a CPU scorer the device and pinned-host transports raise TransportError with the reason."""
    for kind in ("device", "pinned-host", "carrier-pigeon"):
        with pytest.raises(transport.TransportError):
            transport.scorer_transport(kind, torch.device("cpu"))


def test_transport_order_prefers_device_memory_on_cuda_and_accepts_a_forced_kind() -> None:
    """CUDA offers device then pinned-host, CPU offers memfd; the setting forces one and refuses an unknown one."""
    assert transport_order(torch.device("cuda"), {}) == ("device", "pinned-host")
    assert transport_order(torch.device("cpu"), {}) == ("memfd",)
    assert transport_order(torch.device("cuda"), {TRANSPORT_ENV: "memfd"}) == ("memfd",)
    with pytest.raises(ValueError, match=TRANSPORT_ENV):
        transport_order(torch.device("cpu"), {TRANSPORT_ENV: "shm"})


def test_eval_result_names_its_transport_and_host_bytes_per_token(prepared_data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """result.json says which transport scored and how many host bytes per scored token it moved (memfd here:
    two calls per batch, each 8 + 4 V bytes per position, plus well under a byte per token of control messages)."""
    from tests.trainer.test_trainer_harness import _TokenModel
    from trainer import harness

    export_checkpoint(_TokenModel(512), tmp_path)
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", str(8 * 1024))
    out = tmp_path / "eval"
    assert harness.main(["eval", "--checkpoint", str(tmp_path / "model.pt2"), "--data", str(prepared_data / "val"),
                         "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["transport"] == "memfd" and result["transport_note"] == ""
    per_call = 8 + 4 * 512
    assert 2 * per_call < result["host_bytes_per_token"] < 2 * per_call + 1


@pytest.mark.skipif(not CUDA_READY, reason=NO_CUDA_REASON)
def test_device_transport_round_trip(prepared_data: Path, tmp_path: Path) -> None:
    """Through device memory the logits equal the program's own and only control messages cross the host."""
    from tests.trainer.test_trainer_harness import _TokenModel
    from trainer.inference import load_program

    device = torch.device("cuda")
    export_checkpoint(_TokenModel(512), tmp_path, seq_len=16)
    tokens = torch.randint(0, 512, (3, 16), device=device)
    module, _ = load_program(str(tmp_path / "model.pt2"), device)
    with torch.no_grad():
        expected = module(tokens).float()
    with ModelProcess(None) as model:
        model.load(tmp_path / "model.pt2", 4, 16, 512, ("device",), device)
        assert model.transport == "device", model.transport_notes
        got = model(tokens)
        assert got.device.type == "cuda" and torch.allclose(got, expected, atol=1e-2)
        assert model.host_bytes < 100  # one request, one reply


def test_a_process_that_refuses_every_transport_is_a_clean_error(tmp_path: Path) -> None:
    """A model process that answers every offer with transport_error (hostile text included) ends the load with a
    DataError naming each refusal, cleaned and bounded; the scorer offers each kind once and never hangs."""
    from trainer.layout import DataError

    script = tmp_path / "refuser.py"
    script.write_text(textwrap.dedent("""
        import json, os, socket, sys
        channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--socket-fd") + 1]))
        while True:
            message, fds, _, _ = socket.recv_fds(channel, 65536, 3)
            if not message:
                break
            for fd in fds:
                os.close(fd)
            channel.send(json.dumps({"transport_error": "no\\x1b[2J" + "x" * 5000}).encode())
    """))
    with ModelProcess(None, [sys.executable, str(script)]) as model, pytest.raises(DataError) as caught:
        model.load(_checkpoint(tmp_path), 2, 4, 3, ("memfd", "memfd"))
    text = str(caught.value)
    assert text.startswith("no transport") and text.count("memfd: no?[2J") == 2 and len(text) < 1000
