"""The untrusted side of the eval stage: run the candidate's exported program on the batches it is handed.

    python3 -m trainer.inference --socket-fd N      (started by trainer.model_process, never by hand)

It holds no val data, no probe randomness and no out dir: under the sandbox it runs as its own uid, which
cannot enter the folder that holds the val split and result.json (trainer.privsep). It gets, over a Unix
SOCK_SEQPACKET socket, one `init` message carrying three file descriptors: a sealed copy of the checkpoint,
an int64 input buffer (max_rows, seq_len) and a float32 logits buffer (max_rows, seq_len, vocab), both shared
memory. Then, for each `{"rows": b}` it runs the program on the first b input rows and writes (b, seq_len,
vocab) logits, answering `{"done": true}` or `{"error": "..."}`. The socket closing ends it.
Everything it says is untrusted: the scorer bounds and cleans it, and judges the logits with its probe.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import socket
import sys
from typing import Any, BinaryIO

MAX_MESSAGE = 64 * 1024


def send(channel: socket.socket, payload: dict[str, Any]) -> None:
    channel.send(json.dumps(payload).encode()[:MAX_MESSAGE])


def shared_tensor(fd: int, shape: tuple[int, ...], dtype: Any) -> Any:
    """A torch tensor of `shape` over the shared memory behind `fd` (both sides of the socket map it alike)."""
    import numpy as np
    import torch

    count = math.prod(shape)
    buffer = mmap.mmap(fd, count * np.dtype(dtype).itemsize, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.from_numpy(np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape))


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:400]}"


def load_program(path: str, device: Any, handle: BinaryIO | None = None) -> tuple[Any, int]:
    """The checkpoint at `path` (or read from `handle`) as a callable module on `device` (a torch.device), and
    its parameter count."""
    from torch.export.passes import move_to_device_pass

    from trainer.prepare import DataError, load_checkpoint

    program = load_checkpoint(path, handle)
    num_params = sum(program.state_dict[name].numel() for name in program.graph_signature.parameters)
    if device.type != "cpu":
        # The graph records the device it was exported on (e.g. in tensor-metadata asserts), so moving the
        # module's weights alone is not enough: rewrite the whole program for the device.
        try:
            program = move_to_device_pass(program, device)
        except Exception as exc:  # a graph that cannot be moved is the candidate's problem
            raise DataError(f"the checkpoint cannot be moved to {device} ({_error(exc)}): export with "
                            "trainer.prepare.export_checkpoint") from None
    return program.module(), num_params


def serve(channel: socket.socket) -> int:
    message, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 3)
    if not message:
        return 0
    import numpy as np
    import torch

    from trainer.prepare import DataError

    init = json.loads(message)
    rows, seq_len, vocab = int(init["max_rows"]), int(init["seq_len"]), int(init["vocab_size"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        checkpoint_fd, inputs_fd, logits_fd = fds
        with os.fdopen(checkpoint_fd, "rb") as handle:
            model, num_params = load_program("model.pt2 (the scorer's sealed copy)", device, handle)
        inputs = shared_tensor(inputs_fd, (rows, seq_len), np.int64)
        logits = shared_tensor(logits_fd, (rows, seq_len, vocab), np.float32)
    except DataError as exc:
        send(channel, {"error": str(exc)})
        return 0
    except Exception as exc:  # a damaged or hostile archive: the scorer reports it, we stop
        send(channel, {"error": f"the checkpoint could not be loaded ({_error(exc)})"})
        return 0
    send(channel, {"ready": True, "num_params": num_params, "device": str(device)})
    with torch.no_grad():
        while True:
            message = channel.recv(MAX_MESSAGE)
            if not message:
                return 0
            count = int(json.loads(message)["rows"])
            batch = inputs[:count].to(device)
            try:
                out = model(batch)
            except Exception as exc:  # any failure of the candidate's graph on this shape
                send(channel, {"error": _error(exc)})
                continue
            expected = (count, seq_len, vocab)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                send(channel, {"error": f"the checkpoint returns logits of shape {shape}, expected {expected}",
                               "shape": list(shape) if isinstance(shape, tuple) else []})
                continue
            logits[:count].copy_(out.float())
            send(channel, {"done": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m trainer.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--socket-fd", type=int, required=True)
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.socket_fd)
    try:
        return serve(channel)
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the scorer is gone
    finally:
        channel.close()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip the interpreter's slow teardown of torch
