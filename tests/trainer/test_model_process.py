"""The scorer's side of the process boundary against a model process that dies, hangs, lies or keeps writing.

The model process is the untrusted half of the eval stage (trainer.inference). These tests replace it with
hostile stand-ins (small scripts speaking the same socket protocol) and check that the scorer never crashes,
never waits forever, and never scores what the process changed after it answered. The file boundary (its own
uid, no access to the val split) needs the sandbox: tests/redteam/test_redteam_model_process.py.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer import eval_stage, harness, model_process
from trainer.layout import DataError
from trainer.model_process import ModelProcess
from trainer.prepare import export_checkpoint

PROLOGUE = """
import json, mmap, os, socket, sys, time
import numpy as np
channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--socket-fd") + 1]))
message, fds, _, _ = socket.recv_fds(channel, 65536, 3)
init = json.loads(message)
rows, seq, vocab = init["max_rows"], init["seq_len"], init["vocab_size"]
logits = np.frombuffer(mmap.mmap(fds[2], rows * seq * vocab * 4), dtype=np.float32).reshape(rows, seq, vocab)
def say(payload):
    channel.send(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
"""


def _stand_in(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "hostile_model.py"
    script.write_text(PROLOGUE + textwrap.dedent(body))
    return [sys.executable, str(script)]


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"PK\x03\x04 stand-in checkpoint")
    return path


def test_scorer_keeps_the_logits_it_was_answered_with(tmp_path: Path) -> None:
    """Logits the process rewrites in shared memory after answering do not change a batch already returned."""
    command = _stand_in(tmp_path, """
        say({"ready": True, "num_params": 7})
        fill = 1.0
        while channel.recv(65536):
            logits[:] = fill
            say({"done": True})
            fill += 1.0
    """)
    with ModelProcess(None, command) as model:
        assert model.load(_checkpoint(tmp_path), 2, 4, 3) == 7
        first = model(torch.zeros(2, 4, dtype=torch.int64))
        second = model(torch.zeros(2, 4, dtype=torch.int64))
    assert torch.equal(first, torch.full((2, 4, 3), 1.0)) and torch.equal(second, torch.full((2, 4, 3), 2.0))


def test_silent_model_process_is_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that never answers ends in a DataError after the call's time limit, not a hung eval."""
    monkeypatch.setattr(model_process, "LOAD_SECONDS", 1.5)
    command = _stand_in(tmp_path, "time.sleep(60)\n")
    with ModelProcess(None, command) as model, pytest.raises(DataError, match="did not answer within 2 s"):
        model.load(_checkpoint(tmp_path), 2, 4, 3)


def test_garbage_answer_is_a_clean_error(tmp_path: Path) -> None:
    """Bytes that are not a reply (NUL, escapes, invalid UTF-8) give a printable one-line DataError."""
    command = _stand_in(tmp_path, 'say(b"\\x00\\x1b[31m\\xff not json")\ntime.sleep(5)\n')
    with ModelProcess(None, command) as model, pytest.raises(DataError) as caught:
        model.load(_checkpoint(tmp_path), 2, 4, 3)
    assert "not a reply" in str(caught.value) and str(caught.value).isprintable()


def test_hostile_error_text_is_cleaned_and_bounded(tmp_path: Path) -> None:
    """An error message from the process reaches the scorer as bounded printable text."""
    command = _stand_in(tmp_path, 'say({"error": "\\u001b]0;pwned\\u0007" + "x" * 50000})\ntime.sleep(5)\n')
    with ModelProcess(None, command) as model, pytest.raises(DataError) as caught:
        model.load(_checkpoint(tmp_path), 2, 4, 3)
    assert str(caught.value).isprintable() and len(str(caught.value)) <= model_process.REASON_CHARS


def test_dead_model_process_is_reported_with_its_exit(tmp_path: Path) -> None:
    """A process that exits in the middle of scoring gives a DataError naming how it ended."""
    command = _stand_in(tmp_path, """
        say({"ready": True, "num_params": 1})
        channel.recv(65536)
        os._exit(13)
    """)
    with ModelProcess(None, command) as model:
        model.load(_checkpoint(tmp_path), 2, 4, 3)
        with pytest.raises(DataError, match=r"exited while a forward pass on 2 rows \(exit status 13"):
            model(torch.zeros(2, 4, dtype=torch.int64))


def test_model_process_gets_none_of_the_stage_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No AUTORESEARCH_* setting (eval tokens, preset, uids) reaches the model process."""
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "4096")
    command = _stand_in(tmp_path, 'say({"error": ",".join(sorted(os.environ))})\ntime.sleep(5)\n')
    with ModelProcess(None, command) as model, pytest.raises(DataError) as caught:
        model.load(_checkpoint(tmp_path), 2, 4, 3)
    assert "PATH" in str(caught.value) and "AUTORESEARCH" not in str(caught.value)


def test_eval_scores_nothing_when_the_model_process_dies(prepared_data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole eval stage writes an `invalid` result with the reason when its model process dies mid-scoring."""
    from tests.trainer.test_trainer_harness import _TokenModel

    export_checkpoint(_TokenModel(512), tmp_path)
    monkeypatch.setattr(model_process, "MODEL_COMMAND", tuple(_stand_in(tmp_path, """
        say({"ready": True, "num_params": 1})
        channel.recv(65536)
        os.kill(os.getpid(), 9)
    """)))
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", str(8 * 1024))
    out = tmp_path / "eval"
    code = harness.main(["eval", "--checkpoint", str(tmp_path / "model.pt2"), "--data", str(prepared_data / "val"),
                         "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert code == 0 and result["status"] == "invalid" and result["val_bpb"] is None
    assert "killed by signal 9" in result["error"]


def test_malformed_identity_setting_stops_the_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTORESEARCH_PRIVSEP that is not two distinct non-root uids stops eval with exit 2 before anything runs."""
    monkeypatch.setenv("AUTORESEARCH_PRIVSEP", "0:1001")
    code = eval_stage.run_eval(tmp_path / "model.pt2", tmp_path, tmp_path / "out")
    assert code == harness.EXIT_USAGE and not (tmp_path / "out").exists()


def test_real_model_process_scores_like_the_program_in_process(prepared_data: Path, tmp_path: Path) -> None:
    """Logits through the model process equal the exported program's own, bit for bit on CPU."""
    from tests.trainer.test_trainer_harness import _TokenModel
    from trainer.inference import load_program

    export_checkpoint(_TokenModel(512), tmp_path, seq_len=16)
    tokens = torch.randint(0, 512, (3, 16))
    module, _ = load_program(str(tmp_path / "model.pt2"), torch.device("cpu"))
    with torch.no_grad():
        expected = module(tokens).float()
    with ModelProcess(None) as model:
        assert model.load(tmp_path / "model.pt2", 4, 16, 512) > 0
        got = model(tokens)
    assert torch.equal(got, expected) and math.isfinite(float(got.sum()))
