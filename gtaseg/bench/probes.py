"""What one call of a training step costs, measured from outside the step: wall time, forward
units, host syncs, peak memory, and the memory a training state holds between steps.

The benches (`gtaseg bench`, tests/test_bench.py) run a step under these probes; none of them
changes what the step computes. Forward units come from hooks on the networks, host syncs from a
TorchDispatchMode that sees every aten op, so both are counted, not assumed.
"""

from __future__ import annotations

import resource
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gtaseg.methods.state import TrainState, unwrap


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` (None: unchanged) for the block, then restored, so
    in-process callers (tests) get their setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ROLES = ("teacher", "assistant", "student")  # the networks a state may hold


def timed_ms(device: torch.device, fn: Callable[..., Any], *args: Any) -> float:
    """Wall time of fn(*args) in ms; on CUDA between events, after draining queued work."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - start) * 1000.0
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn(*args)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def count_units(state: TrainState, run: Callable[[], Any], unit: int) -> dict[str, float]:
    """Forward-equivalent units of `run()` per network, and their total.

    A forward of n images counts n / unit; a backward through that forward's output counts
    2 n / unit (a tensor hook on the output fires only when the gradient really flows).
    """
    counts = dict.fromkeys(ROLES, 0.0)
    handles = []
    for role in ROLES:
        net = getattr(state, role)
        if net is None:
            continue

        def hook(module, args, output, role=role):
            n = args[0].shape[0] / unit
            counts[role] += n
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(
                    lambda grad, n=n, role=role: counts.__setitem__(role, counts[role] + 2 * n)
                )

        handles.append(unwrap(net).register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {**counts, "total": sum(counts.values())}


_DATA_DEPENDENT = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::_unique",
    "aten::unique",
}
_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class HostSyncCounter(TorchDispatchMode):
    """Records ops that make the host wait for the device when tensors live on an accelerator:
    reading a value back (.item(), float(), indexing with a 0-dim tensor), data-dependent output
    sizes (nonzero, unique, boolean-mask indexing) and blocking copies between host and device.
    Values drawn from a CPU torch.Generator are host data from the start and are not counted.
    Works on CPU too, so tests can check a step for syncs without a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._host_draws: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if kwargs.get("generator") is not None and isinstance(out, torch.Tensor):
            self._host_draws[id(out)] = weakref.ref(out)
        elif self._syncs(name, args, kwargs):
            self.ops.append(name)
        return out

    def _syncs(self, name: str, args: tuple, kwargs: dict) -> bool:
        if name == "aten::_local_scalar_dense":
            ref = self._host_draws.get(id(args[0]))
            return ref is None or ref() is not args[0]
        if name in _DATA_DEPENDENT:
            return True
        if name in _INDEXING:
            return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if name in ("aten::_to_copy", "aten::copy_"):
            src, dst = (
                (args[0].device, kwargs.get("device"))
                if name == "aten::_to_copy"
                else (args[1].device, args[0].device)
            )
            blocking = not kwargs.get("non_blocking", len(args) > 2 and args[2])
            return dst is not None and src != dst and "cpu" in (src.type, dst.type) and blocking
        return False


def count_host_syncs(run: Callable[[], Any]) -> list[str]:
    """The host-sync ops (see HostSyncCounter) of `run()`, in call order."""
    counter = HostSyncCounter()
    with counter:
        run()
    return counter.ops


class _RssSampler(threading.Thread):
    """Samples this process's resident set size every millisecond until stopped."""

    def __init__(self, process: Any) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.peak = process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)


def peak_memory_mb(device: torch.device, run: Callable[[], Any]) -> tuple[float, str]:
    """(MiB that `run()` needs above what was held before it, how it was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, (
            "torch.cuda.max_memory_allocated above the allocation before the steps"
        )
    try:
        import psutil
    except ImportError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        return rise / 1024, "rise of ru_maxrss (process high-water mark: 0 unless a new peak)"
    sampler = _RssSampler(psutil.Process())
    start = sampler.peak
    sampler.start()
    run()
    sampler.done.set()
    sampler.join()
    return (sampler.peak - start) / 2**20, (
        "psutil RSS sampled every 1 ms, peak above the RSS before the steps (a lower bound: the "
        "allocator keeps memory freed by earlier steps)"
    )


def state_megabytes(state: TrainState) -> float:
    """MiB held between steps: the networks' parameters and buffers, the optimisers' state."""
    tensors: dict[int, torch.Tensor] = {}
    for role in ROLES:
        net = getattr(state, role)
        if net is not None:
            for t in (*net.parameters(), *net.buffers()):
                tensors[t.data_ptr()] = t
    for opt in (state.opt_student, state.opt_assistant):
        for per_param in opt.state.values() if opt is not None else ():
            for t in per_param.values():
                if isinstance(t, torch.Tensor):
                    tensors[t.data_ptr()] = t
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
