"""The scorer's handle on the untrusted model process (trainer.inference): start it, load, call, close.

The scorer starts the process before it reads anything (so that it inherits nothing: it is a fresh
interpreter, under the model uid when trainer.privsep says so), then hands it a sealed copy of the validated
checkpoint and two buffers of a transport (trainer.transport: host shared memory, or device memory on CUDA).
A call copies a batch in, waits (bounded) for the answer and returns a private copy of the logits on the
caller's device: what the process writes into the buffer after it answered cannot change a result the scorer
already holds. `host_bytes` counts what the calls moved through host memory: the transport's inputs and logits
plus the control messages both ways. Whatever the process says is cleaned
and bounded here; a silent, dead or lying process makes the checkpoint unusable (DataError), never the
scorer crash. The process sees only the input rows it is given, never their last target token.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.inference import MAX_MESSAGE
from trainer.layout import DataError
from trainer.privsep import Identities
from trainer.transport import ScorerTransport, TransportError, memfd, scorer_transport

LOAD_SECONDS = 600.0    # load + move to the device: weights are capped at 8 GiB by trainer.checkpoint_check
CALL_SECONDS = 600.0    # one forward pass of one batch
EXIT_SECONDS = 5.0
REASON_CHARS = 400
# What the model process keeps of our environment: what Python, torch and the GPU need, nothing of ours.
MODEL_COMMAND = (sys.executable, "-m", "trainer.inference")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIXES = ("PATH", "PYTHON", "LD_LIBRARY_PATH", "HOME", "LANG", "LC_", "OMP_", "MKL_", "CUDA_", "NVIDIA_",
                "TORCH", "TRITON", "PYTORCH_")


def clean_reason(raw: object) -> str:
    """The model process's words, as one bounded line of printable text."""
    text = raw if isinstance(raw, str) else repr(raw)
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:REASON_CHARS]


def _sealed_copy(path: Path) -> int:
    """A read-only, sealed in-memory copy of `path` (what the scorer validated is what the process loads)."""
    fd = memfd("checkpoint", path.stat().st_size)
    with open(path, "rb") as source, os.fdopen(os.dup(fd), "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE  # type: ignore[attr-defined]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)  # type: ignore[attr-defined]
    return fd


class ModelProcess:
    """The candidate's program behind a process boundary; call it like the module: logits = model(tokens)."""

    def __init__(self, identities: Identities | None, command: Sequence[str] | None = None) -> None:
        """Start the model process (`command`, default MODEL_COMMAND, plus `--socket-fd N`), under the model uid
        when `identities` say so."""
        command = MODEL_COMMAND if command is None else command
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIXES)}
        # The model process imports this very `trainer` package, wherever the scorer found it (cwd is /).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(PACKAGE_ROOT), env.get("PYTHONPATH", ""))))
        model_id = {} if identities is None else identities.model_popen()
        self._channel = ours
        self._process = subprocess.Popen(
            [*command, "--socket-fd", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, cwd="/", stdin=subprocess.DEVNULL, start_new_session=True,
            **model_id)  # type: ignore[call-overload]
        theirs.close()
        self._transport: ScorerTransport | None = None
        self._shape = (0, 0)
        self._control_bytes = 0
        self.device = ""
        self.calls = 0
        self.transport_notes: list[str] = []

    @property
    def transport(self) -> str:
        """The transport the process loaded with ('' before load)."""
        return self._transport.name if self._transport is not None else ""

    @property
    def host_bytes(self) -> int:
        """Bytes the calls so far moved through host memory: inputs and logits (the transport's count) and
        the control messages both ways. Loading (checkpoint, init) is not counted."""
        data = self._transport.host_bytes if self._transport is not None else 0
        return data + self._control_bytes

    def load(self, checkpoint: Path, max_rows: int, seq_len: int, vocab_size: int,
             transports: Sequence[str] = ("memfd",), device: torch.device | None = None) -> int:
        """Hand the checkpoint and the buffers of the first transport in `transports` that both sides can set up
        (each one refused is noted in `transport_notes`); the parameter count the process reports."""
        device = torch.device("cpu") if device is None else device
        for kind in transports:
            try:
                transport = scorer_transport(kind, device)
                reply = self._offer(transport, checkpoint, max_rows, seq_len, vocab_size)
            except TransportError as exc:
                self.transport_notes.append(f"{kind}: {clean_reason(str(exc))}")
                continue
            if "transport_error" in reply:
                transport.close()
                self.transport_notes.append(f"{kind}: {clean_reason(reply['transport_error'])}")
                continue
            if "error" in reply:
                transport.close()
                raise DataError(clean_reason(reply["error"]))
            self._transport, self._shape = transport, (max_rows, seq_len)
            self._control_bytes = 0  # the count is of calls: loading is not in it
            self.device = clean_reason(reply.get("device", ""))[:40]
            if transport.note:
                self.transport_notes.append(f"{kind}: {clean_reason(transport.note)}")
            params = reply.get("num_params")
            return params if isinstance(params, int) and 0 <= params < 10**13 else 0
        raise DataError(f"no transport between the scorer and the model process could be set up "
                        f"({'; '.join(self.transport_notes)})")

    def _offer(self, transport: ScorerTransport, checkpoint: Path, max_rows: int, seq_len: int,
               vocab_size: int) -> dict[str, Any]:
        """Send `init` with a sealed copy of the checkpoint and the transport's descriptors; the reply."""
        buffer_fds, fields = transport.allocate(max_rows, seq_len, vocab_size)
        fds = [_sealed_copy(checkpoint), *buffer_fds]
        try:
            init = {"max_rows": max_rows, "seq_len": seq_len, "vocab_size": vocab_size, **fields}
            socket.send_fds(self._channel, [json.dumps(init).encode()], fds)
        except BaseException:
            transport.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return self._receive(LOAD_SECONDS, "loading the checkpoint")

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        transport = self._transport
        assert transport is not None, "load() first"
        rows, seq_len = tokens.shape
        if rows > self._shape[0] or seq_len != self._shape[1]:
            raise ValueError(f"batch of shape {tuple(tokens.shape)} does not fit the shared buffer {self._shape}")
        transport.put(tokens)
        request = json.dumps({"rows": rows}).encode()
        self._channel.send(request)
        self._control_bytes += len(request)
        self.calls += 1
        reply = self._receive(CALL_SECONDS, f"a forward pass on {rows} rows")
        if "error" in reply:
            raise ModelCallError(clean_reason(reply["error"]), reply.get("shape"))
        return transport.take(rows, tokens.device)

    def _receive(self, seconds: float, doing: str) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DataError(f"the model process did not answer within {seconds:.0f} s while {doing}")
            ready, _, _ = select.select([self._channel], [], [], min(left, 1.0))
            if ready:
                break
            if self._process.poll() is not None:
                break
        try:
            message = self._channel.recv(MAX_MESSAGE)
        except OSError:
            message = b""
        if not message:
            raise DataError(f"the model process exited while {doing} ({self._exit_text()})")
        self._control_bytes += len(message)
        try:
            reply = json.loads(message)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise DataError(f"the model process answered {clean_reason(message[:80])!r} while {doing}, not a reply")
        return reply

    def _exit_text(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(EXIT_SECONDS)
        code = self._process.returncode
        if code is None:
            return "it closed its socket but still runs"
        if code < 0:
            return f"killed by signal {-code}{' (out of memory?)' if code == -9 else ''}"
        return f"exit status {code}"

    def close(self) -> None:
        """Close the socket (the process exits on it); the container's end takes a process that does not."""
        self._channel.close()
        if self._transport is not None:
            self._transport.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(EXIT_SECONDS)
        if self._process.returncode is None:
            with contextlib.suppress(PermissionError, ProcessLookupError):  # another uid: not ours to kill
                os.killpg(self._process.pid, 9)

    def __enter__(self) -> ModelProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelCallError(Exception):
    """The model process could not run the program on a batch (its message is cleaned); `shape` as it said."""

    def __init__(self, reason: str, shape: object = None) -> None:
        super().__init__(reason)
        self.shape = tuple(int(s) for s in shape[:8] if isinstance(s, int)) if isinstance(shape, list) else None
