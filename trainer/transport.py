"""How a batch's input rows and logits travel between the scorer and the model process.

The scorer (trainer.model_process) owns the buffers: it allocates them, hands the model process
(trainer.inference) their file descriptors with the `init` message over the Unix socket (SCM_RIGHTS), writes
each batch's rows into the inputs buffer and, once the process answered, takes a private copy of the logits
before the next call. Three kinds, named in result.json's "transport":

- "memfd": host shared memory (memfd_create + mmap on both sides). The CPU path; on CUDA it is the old path,
  where every batch's fp32 logits go device -> host -> device (kept for comparison: AUTORESEARCH_EVAL_TRANSPORT).
- "device": device memory the scorer allocates with the CUDA driver's virtual memory API (cuMemCreate with a
  POSIX file descriptor handle, cuMemExportToShareableHandle); the model process imports the descriptor
  (cuMemImportFromShareableHandle, cuMemMap, cuMemSetAccess) and sees the same device pages. Nothing but the
  socket's control messages crosses the host. The descriptor travels by SCM_RIGHTS, which needs no ptrace
  rights between the two uids. Torch's own sharing of expandable segments does not: its importer
  (ExpandableSegment::fromShared in c10/cuda/CUDACachingAllocator.cpp, read for this) takes the exporter's
  descriptors with pidfd_open + pidfd_getfd(2), which needs PTRACE_MODE_ATTACH_REALCREDS over the exporter,
  i.e. the same uid or CAP_SYS_PTRACE: two uids do not have it. Torch's default CUDA tensor sharing
  (cudaIpcGetMemHandle, legacy CUDA IPC) was not checked for ptrace needs and is not used here.
  Needs the CUDA driver's Python bindings (`cuda.bindings.driver`, wheel cuda-bindings).
  UNVERIFIED ON HARDWARE: written from the driver API's documentation; no GPU has run it yet
  (tests/trainer/test_transport.py::test_device_transport_round_trip runs where CUDA exists).
- "pinned-host": the fallback when the device transport cannot be set up on CUDA: memfd buffers registered as
  page-locked with the CUDA runtime on both sides (best effort), so the copies run at PCIe speed. The eval
  stage warns and records the reason.

`host_bytes` counts the bytes a transport moved through host memory for calls (inputs written, logits read),
as the scorer sees them; the control messages are counted by trainer.model_process. On CUDA the memfd and
pinned-host logits cross PCIe twice (device -> host in the model process, host -> device in the scorer).
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Any

import numpy as np
import torch

from trainer.layout import DataError

KINDS = ("memfd", "pinned-host", "device")
INPUT_DTYPE, LOGIT_DTYPE = np.int64, np.float32


class TransportError(DataError):
    """A transport cannot be set up here (no CUDA, no driver bindings, the driver refused): try the next kind."""


def memfd(name: str, size: int) -> int:
    """An anonymous, close-on-exec, sealable host memory file of `size` bytes."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, max(size, 1))
    return fd


def shared_tensor(fd: int, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
    """A torch tensor of `shape` over the shared memory behind `fd` (both sides of the socket map it alike)."""
    count = math.prod(shape)
    buffer = mmap.mmap(fd, count * np.dtype(dtype).itemsize, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.from_numpy(np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape))


def _pin(tensor: torch.Tensor) -> str:
    """Register a host tensor's pages as page-locked with the CUDA runtime; '' or why it could not."""
    try:
        code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    except Exception as exc:  # no CUDA runtime here
        return f"{type(exc).__name__}: {exc}"
    return "" if int(code) == 0 else f"cudaHostRegister returned {int(code)}"


class HostTransport:
    """memfd (pin=False) or pinned-host (pin=True): the scorer's side of host shared-memory buffers."""

    def __init__(self, pin: bool = False) -> None:
        self.name = "pinned-host" if pin else "memfd"
        self.pin = pin
        self.host_bytes = 0
        self.note = ""
        self.inputs: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def allocate(self, max_rows: int, seq_len: int, vocab: int) -> tuple[list[int], dict[str, Any]]:
        """The descriptors to send with `init` (inputs, logits) and the init fields this transport adds."""
        fds = [memfd("inputs", max_rows * seq_len * 8), memfd("logits", max_rows * seq_len * vocab * 4)]
        self.inputs = shared_tensor(fds[0], (max_rows, seq_len), INPUT_DTYPE)
        self.logits = shared_tensor(fds[1], (max_rows, seq_len, vocab), LOGIT_DTYPE)
        if self.pin:
            self.note = _pin(self.inputs) or _pin(self.logits)
        return fds, {"transport": self.name}

    def put(self, tokens: torch.Tensor) -> None:
        assert self.inputs is not None, "allocate() first"
        rows = len(tokens)
        self.inputs[:rows].copy_(tokens)
        self.host_bytes += rows * self.inputs.shape[1] * 8

    def take(self, rows: int, device: torch.device) -> torch.Tensor:
        """A private copy of the first `rows` answers on `device`: later writes by the process do not reach it."""
        assert self.logits is not None, "allocate() first"
        answer = self.logits[:rows].to(device, copy=True)
        self.host_bytes += answer.numel() * 4
        return answer

    def close(self) -> None:
        self.inputs = self.logits = None


def _cuda_check(result: Any, call: str) -> Any:
    """The values of a cuda.bindings.driver call's (error, *values) result; TransportError on an error."""
    from cuda.bindings import driver

    error, *values = result if isinstance(result, tuple) else (result,)
    if error != driver.CUresult.CUDA_SUCCESS:
        raise TransportError(f"{call} failed: {error!r}")
    return values[0] if len(values) == 1 else tuple(values)


class _CudaArray:
    """A device pointer described by __cuda_array_interface__, for torch.as_tensor (which keeps it alive)."""

    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (pointer, False),
                                         "version": 2, "strides": None}


class DeviceMapping:
    """One VMM allocation mapped into this process's address space on device `index`: `pointer`, `size`.
    Created by the scorer (`create`, which also exports a POSIX descriptor) or imported by the model process
    from that descriptor (`open`)."""

    def __init__(self, handle: Any, size: int, index: int) -> None:
        from cuda.bindings import driver

        self.handle, self.size, self.index = handle, size, index
        self.pointer = 0
        pointer = _cuda_check(driver.cuMemAddressReserve(size, 0, 0, 0), "cuMemAddressReserve")
        try:
            _cuda_check(driver.cuMemMap(pointer, size, 0, handle, 0), "cuMemMap")
            access = driver.CUmemAccessDesc()
            access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = index
            access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            _cuda_check(driver.cuMemSetAccess(pointer, size, [access], 1), "cuMemSetAccess")
        except TransportError:
            driver.cuMemAddressFree(pointer, size)
            raise
        self.pointer = int(pointer)
        self._reserved = pointer

    @staticmethod
    def _prepare(index: int) -> Any:
        """The driver module, with torch's primary context on device `index` current on this thread."""
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            raise TransportError(f"the CUDA driver's Python bindings are missing ({exc}): install cuda-bindings") from None
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{index}")  # makes the primary context current for the driver calls below
        _cuda_check(driver.cuInit(0), "cuInit")
        return driver

    @classmethod
    def create(cls, nbytes: int, index: int) -> tuple[DeviceMapping, int]:
        """A fresh allocation of at least `nbytes` and a POSIX descriptor that exports it (the caller closes it)."""
        driver = cls._prepare(index)
        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        posix = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        prop.requestedHandleTypes = posix
        granularity = int(_cuda_check(driver.cuMemGetAllocationGranularity(
            prop, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
            "cuMemGetAllocationGranularity"))
        size = max(granularity, -(-nbytes // granularity) * granularity)
        handle = _cuda_check(driver.cuMemCreate(size, prop, 0), "cuMemCreate")
        try:
            fd = int(_cuda_check(driver.cuMemExportToShareableHandle(handle, posix, 0), "cuMemExportToShareableHandle"))
            return cls(handle, size, index), fd
        except TransportError:
            driver.cuMemRelease(handle)
            raise

    @classmethod
    def open(cls, fd: int, size: int, index: int) -> DeviceMapping:
        """Map the allocation behind a descriptor received from the scorer (the descriptor stays the caller's)."""
        driver = cls._prepare(index)
        posix = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        handle = _cuda_check(driver.cuMemImportFromShareableHandle(fd, posix), "cuMemImportFromShareableHandle")
        try:
            return cls(handle, size, index)
        except TransportError:
            driver.cuMemRelease(handle)
            raise

    def tensor(self, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
        """A torch tensor over this mapping (shape and dtype must fit in `size`)."""
        needed = math.prod(shape) * np.dtype(dtype).itemsize
        if needed > self.size:
            raise TransportError(f"a device buffer of {self.size} bytes cannot hold {shape} {np.dtype(dtype)}")
        array = _CudaArray(self.pointer, shape, np.dtype(dtype).str)
        return torch.as_tensor(array, device=f"cuda:{self.index}")

    def close(self) -> None:
        """Unmap and release (the physical memory goes when both processes released it)."""
        if not self.pointer:
            return
        from cuda.bindings import driver

        torch.cuda.synchronize(self.index)
        driver.cuMemUnmap(self._reserved, self.size)
        driver.cuMemAddressFree(self._reserved, self.size)
        driver.cuMemRelease(self.handle)
        self.pointer = 0


class DeviceTransport:
    """The scorer's side of the device transport: inputs and logits in device memory shared with the model
    process; only control messages cross the host. Unverified on hardware (see the module docstring)."""

    name = "device"

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise TransportError(f"the device transport needs a CUDA device, the scorer runs on {device}")
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.host_bytes = 0
        self.note = ""
        self._mappings: list[DeviceMapping] = []
        self.inputs: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def allocate(self, max_rows: int, seq_len: int, vocab: int) -> tuple[list[int], dict[str, Any]]:
        fds: list[int] = []
        try:
            for nbytes in (max_rows * seq_len * 8, max_rows * seq_len * vocab * 4):
                mapping, fd = DeviceMapping.create(nbytes, self.index)
                self._mappings.append(mapping)
                fds.append(fd)
            self.inputs = self._mappings[0].tensor((max_rows, seq_len), INPUT_DTYPE)
            self.logits = self._mappings[1].tensor((max_rows, seq_len, vocab), LOGIT_DTYPE)
        except Exception:
            for fd in fds:
                os.close(fd)
            self.close()
            raise
        return fds, {"transport": self.name, "sizes": [m.size for m in self._mappings], "device_index": self.index}

    def put(self, tokens: torch.Tensor) -> None:
        assert self.inputs is not None, "allocate() first"
        self.inputs[:len(tokens)].copy_(tokens)
        torch.cuda.current_stream(self.index).synchronize()  # the rows are in place before the process reads them

    def take(self, rows: int, device: torch.device) -> torch.Tensor:
        assert self.logits is not None, "allocate() first"
        return self.logits[:rows].to(device, copy=True)  # on the device: the process synchronized before answering

    def close(self) -> None:
        self.inputs = self.logits = None
        for mapping in self._mappings:
            mapping.close()
        self._mappings = []


ScorerTransport = HostTransport | DeviceTransport


def scorer_transport(kind: str, device: torch.device) -> ScorerTransport:
    """A fresh scorer-side transport of `kind` (one of KINDS); TransportError when it cannot exist here."""
    if kind == "memfd":
        return HostTransport(pin=False)
    if kind == "pinned-host":
        if device.type != "cuda":
            raise TransportError("pinned host memory is for a CUDA scorer; on CPU use memfd")
        return HostTransport(pin=True)
    if kind == "device":
        return DeviceTransport(device)
    raise TransportError(f"unknown transport {kind!r}: use one of {', '.join(KINDS)}")


class ModelBuffers:
    """The model process's side: `inputs` (rows, seq_len) int64 and `logits` (rows, seq_len, vocab) float32
    where the scorer put them (host shared memory or device memory)."""

    def __init__(self, init: dict[str, Any], fds: list[int], device: torch.device) -> None:
        rows, seq_len, vocab = int(init["max_rows"]), int(init["seq_len"]), int(init["vocab_size"])
        kind = init.get("transport", "memfd")
        self.kind = kind
        self._mappings: list[DeviceMapping] = []
        if len(fds) != 2:
            raise TransportError(f"the {kind} transport needs 2 descriptors, got {len(fds)}")
        if kind in ("memfd", "pinned-host"):
            self.inputs = shared_tensor(fds[0], (rows, seq_len), INPUT_DTYPE)
            self.logits = shared_tensor(fds[1], (rows, seq_len, vocab), LOGIT_DTYPE)
            if kind == "pinned-host" and device.type == "cuda":
                _pin(self.inputs)
                _pin(self.logits)
        elif kind == "device":
            if device.type != "cuda":
                raise TransportError("the device transport was offered, but the model process sees no CUDA device")
            index = device.index if device.index is not None else torch.cuda.current_device()
            sizes = [int(size) for size in init["sizes"]]
            try:
                self._mappings = [DeviceMapping.open(fd, size, index) for fd, size in zip(fds, sizes, strict=True)]
                self.inputs = self._mappings[0].tensor((rows, seq_len), INPUT_DTYPE)
                self.logits = self._mappings[1].tensor((rows, seq_len, vocab), LOGIT_DTYPE)
            except Exception:
                self.close()
                raise
            for fd in fds:  # the imported handles hold the memory now
                os.close(fd)
        else:
            raise TransportError(f"unknown transport {str(kind)[:40]!r}")

    def ready(self) -> None:
        """Before answering: the logits written on the device are visible to the scorer."""
        if self.kind == "device":
            torch.cuda.synchronize()

    def close(self) -> None:
        for mapping in self._mappings:
            mapping.close()
        self._mappings = []
