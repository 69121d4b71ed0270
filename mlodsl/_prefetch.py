"""Moving the next batch to the GPU while the current step runs.

With ``Program(device="cuda")`` each problem's :class:`~mlodsl._data.Batches`
gets a :class:`CudaStage`: when a batch is taken, the next one of the same pass
is drawn and copied to the device on a side stream, from page-locked memory,
so the copy overlaps the step's kernels (the pattern of NVIDIA's Apex
``data_prefetcher``). Taking it makes the compute stream wait for the copy and
tells the caching allocator that the compute stream uses the memory
(``record_stream``), so it is not reused while a kernel still reads it.
``Program(..., prefetch=False)`` turns it off; on a CPU there is nothing to move.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only


class CudaStage:
    """Starts a batch's copy to ``device`` on a side stream; :meth:`finish` hands it to the compute stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, batch: Any) -> Any:
        with torch.cuda.stream(self.stream):
            return tree_map_only(torch.Tensor, self._copy, batch)

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()  # a non_blocking copy from pageable memory would be synchronous
        return t.to(self.device, non_blocking=True)

    def finish(self, batch: Any) -> Any:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        leaves, _ = tree_flatten(batch)
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                t.record_stream(compute)
        return batch


def stage_for(device: torch.device | None, prefetch: bool) -> CudaStage | None:
    """The stage for a program's batches: a CUDA device and ``prefetch``, else none."""
    if not prefetch or device is None or device.type != "cuda":
        return None
    return CudaStage(device)
