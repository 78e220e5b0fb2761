"""The untrusted side of the eval stage: run the candidate's exported program on the batches it is handed.

    python3 -m trainer.inference --socket-fd N      (started by trainer.model_process, never by hand)

It holds no val data, no probe randomness and no out dir: under the sandbox it runs as its own uid, which
cannot enter the folder that holds the val split and result.json (trainer.privsep). It gets, over a Unix
SOCK_SEQPACKET socket, an `init` message carrying three file descriptors: a sealed copy of the checkpoint,
an int64 input buffer (max_rows, seq_len) and a float32 logits buffer (max_rows, seq_len, vocab), of the
transport `init` names (trainer.transport: host shared memory by default, device memory on CUDA). A transport
it cannot set up is answered `{"transport_error": "..."}`, and it waits for another `init`. Then, for each
`{"rows": b}` it runs the program on the first b input rows and writes (b, seq_len, vocab) float32 logits,
answering `{"done": true}` or `{"error": "..."}`. The socket closing ends it.
On CUDA the program runs as the run trained (train.py): TF32 matmuls and bf16 autocast; the logits are
written as float32 whatever the program computed them in (bf16 logits would be too coarse for the probe).
Everything it says is untrusted: the scorer bounds and cleans it, and judges the logits with its probe.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from typing import Any, BinaryIO

MAX_MESSAGE = 64 * 1024
MAX_INITS = 4  # transports offered before the scorer gives up (it offers at most the three kinds)


def send(channel: socket.socket, payload: dict[str, Any]) -> None:
    channel.send(json.dumps(payload).encode()[:MAX_MESSAGE])


def forward_context(device: Any) -> Any:
    """The precision the program runs at on `device`: bf16 autocast on CUDA (as train.py trains), fp32 on CPU."""
    import torch

    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16)


def without_dtype_asserts(module: Any) -> Any:
    """`module` (an exported program's graph module) without its `_assert_tensor_metadata` nodes: they pin the
    fp32 dtypes of export time and would refuse the bf16 activations of autocast. They only check; dropping
    them changes no value (and this process is the candidate's own side: nothing it skips protects the scorer)."""
    import torch

    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default \
                and not node.users:
            graph.erase_node(node)
    module.recompile()
    return module


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
        return without_dtype_asserts(program.module()), num_params
    return program.module(), num_params


def _attach(channel: socket.socket, device: Any) -> tuple[Any, dict[str, Any], int] | None:
    """The buffers, the init message and the checkpoint's descriptor, from the first `init` whose transport
    can be set up here (each other one is answered with `transport_error`); None when the socket closed."""
    from trainer.transport import ModelBuffers, TransportError

    for _ in range(MAX_INITS):
        message, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 3)
        if not message:
            return None
        init = json.loads(message)
        try:
            return ModelBuffers(init, fds[1:], device), init, fds[0]
        except (TransportError, ImportError, RuntimeError) as exc:
            for fd in fds:
                os.close(fd)
            send(channel, {"transport_error": _error(exc)})
    return None


def serve(channel: socket.socket) -> int:
    import torch

    from trainer.prepare import DataError

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attached = _attach(channel, device)
    if attached is None:
        return 0
    buffers, init, checkpoint_fd = attached
    seq_len, vocab = int(init["seq_len"]), int(init["vocab_size"])
    inputs, logits = buffers.inputs, buffers.logits
    try:
        with os.fdopen(checkpoint_fd, "rb") as handle:
            model, num_params = load_program("model.pt2 (the scorer's sealed copy)", device, handle)
    except DataError as exc:
        send(channel, {"error": str(exc)})
        return 0
    except Exception as exc:  # a damaged or hostile archive: the scorer reports it, we stop
        send(channel, {"error": f"the checkpoint could not be loaded ({_error(exc)})"})
        return 0
    send(channel, {"ready": True, "num_params": num_params, "device": str(device), "transport": buffers.kind})
    with torch.no_grad(), forward_context(device):
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
            buffers.ready()
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
