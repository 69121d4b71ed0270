"""Shared data and measurement for the examples: scikit-learn's bundled 8×8 digits.

Every example trains on ``sklearn.datasets.load_digits`` (1797 greyscale 8×8
images of the digits 0–9, shipped inside scikit-learn: nothing is downloaded).
This module prepares it the ways the examples need, always from a seed, so a
run is reproducible:

- :func:`split`: a balanced test set (50 images per class), a balanced meta
  set (10 per class, the "100 clean images" of Meta-Weight-Net), the rest for
  training (114–123 per class);
- :func:`long_tail`: keep ``n_max · IF^(-c/9)`` training images of class c
  (geometric interpolation from the head class 0 to the tail class 9);
- :func:`label_noise`: resample a fraction of the labels uniformly over the
  10 classes (a resampled label may equal the true one);
- :func:`shift`: deterministic domain shifts (rotation, inversion, blur,
  noise) for the domain-adaptation example;
- :func:`loader` (a seeded DataLoader), :func:`mlp`, :func:`accuracy`;
- :func:`measure`: wall time (``time.perf_counter``) and peak memory of one
  run, and :func:`mean_std` / :func:`markdown` for the tables.

Peak memory is the growth of the process's resident set: the kernel's
high-water mark is reset before the run (``/proc/self/clear_refs``), then
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the run minus the resident
set before it. (``tracemalloc`` would miss it: PyTorch allocates tensors
outside Python's allocator.) Where the reset is not allowed the number is the
plain ``ru_maxrss`` delta, which only counts growth past the earlier peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

Data = tuple[torch.Tensor, torch.Tensor]   # images (N, 64) in [0, 1], labels (N,)
CLASSES = 10
T = TypeVar("T")


class Split(NamedTuple):
    train: Data
    meta: Data
    test: Data


@lru_cache(maxsize=1)
def load() -> Data:
    """All 1797 digits: images scaled to [0, 1] as (N, 64) float32, labels (N,) int64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def per_class(labels: torch.Tensor, counts: Sequence[int], g: torch.Generator) -> list[torch.Tensor]:
    """For each class c, ``counts[c]`` random indices of ``labels == c`` (and the rest, last)."""
    taken, rest = [], []
    for c, n in enumerate(counts):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        taken.append(idx[:n])
        rest.append(idx[n:])
    return [torch.cat(taken), torch.cat(rest)]


def split(seed: int, test_per_class: int = 50, meta_per_class: int = 10, data: Data | None = None) -> Split:
    """Balanced test and meta sets; every other image is training data."""
    x, y = load() if data is None else data
    g = torch.Generator().manual_seed(seed)
    test, rest = per_class(y, [test_per_class] * CLASSES, g)
    meta, train = per_class(y[rest], [meta_per_class] * CLASSES, g)
    meta, train = rest[meta], rest[train]
    return Split(train=(x[train], y[train]), meta=(x[meta], y[meta]), test=(x[test], y[test]))


def long_tail_counts(available: Sequence[int], factor: float) -> list[int]:
    """``n_max · factor^(-c/9)`` images for class c, n_max the smallest class size available."""
    n_max = min(available)
    return [max(1, round(n_max * factor ** (-c / (CLASSES - 1)))) for c in range(CLASSES)]


def long_tail(data: Data, factor: float, seed: int) -> Data:
    """Subsample ``data`` to a long tail with imbalance factor ``factor`` (head 0 … tail 9)."""
    x, y = data
    counts = long_tail_counts(torch.bincount(y, minlength=CLASSES).tolist(), factor)
    keep, _ = per_class(y, counts, torch.Generator().manual_seed(seed))
    return x[keep], y[keep]


def label_noise(data: Data, rate: float, seed: int) -> Data:
    """Resample a ``rate`` fraction of the labels uniformly over the classes."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < rate
    noisy = y.clone()
    noisy[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=g)
    return x, noisy


def class_counts(data: Data) -> list[int]:
    return torch.bincount(data[1], minlength=CLASSES).tolist()


# -- domain shifts --------------------------------------------------------------------
def _images(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 8, 8)


def rotate(x: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    return torch.rot90(_images(x), quarter_turns, dims=(2, 3)).reshape(len(x), 64)


def blur(x: torch.Tensor) -> torch.Tensor:
    """A 3×3 binomial blur ([1, 2, 1] ⊗ [1, 2, 1] / 16), zero padded."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16.0).reshape(1, 1, 3, 3)
    return F.conv2d(_images(x), kernel, padding=1).reshape(len(x), 64)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def noise(x: torch.Tensor, std: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "rot90": lambda x: rotate(x, 1),
    "rot180": lambda x: rotate(x, 2),
    "rot270": lambda x: rotate(x, 3),
    "invert": invert,
    "blur": blur,
    "noise": noise,
}


def shift(x: torch.Tensor, *kinds: str) -> torch.Tensor:
    """Apply the named shifts in order, e.g. ``shift(x, "rot90", "blur")``."""
    for kind in kinds:
        x = SHIFTS[kind](x)
    return x


def jitter(x: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """Augmentation: each image translated by a random offset in [-pixels, pixels]², zero filled."""
    imgs = F.pad(_images(x), (pixels,) * 4)
    n, size = len(x), 8
    dx = torch.randint(0, 2 * pixels + 1, (n,))
    dy = torch.randint(0, 2 * pixels + 1, (n,))
    rows = (dy[:, None] + torch.arange(size)[None, :])[:, :, None].expand(n, size, size)
    cols = (dx[:, None] + torch.arange(size)[None, :])[:, None, :].expand(n, size, size)
    out = imgs[torch.arange(n)[:, None, None], 0, rows, cols]
    return out.reshape(n, 64)


# -- loaders, models, accuracy ----------------------------------------------------------
def loader(data: Data, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A DataLoader over ``(x, y)`` whose shuffling is seeded."""
    dataset = TensorDataset(*data)
    return DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def mlp(hidden: int = 128, inputs: int = 64, outputs: int = CLASSES) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class Jittered:
    """Batches of ``loader`` with their images translated by :func:`jitter` (fresh offsets each pass).

    Augmenting the batch, not inside the loss, keeps every re-evaluation of a
    loss on that batch (finite differences, unrolled replays) consistent.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        for x, *rest in self.loader:
            yield (jitter(x), *rest)


@torch.no_grad()
def accuracy(net: Callable[[torch.Tensor], torch.Tensor], data: Data) -> float:
    x, y = data
    return float((net(x).argmax(1) == y).float().mean())


# -- measurement and tables ----------------------------------------------------------------
class Measured(NamedTuple):
    value: Any
    seconds: float
    peak_mib: float


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)     # give freed heap back, so reuse shows as growth
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                            # reset VmHWM, which ru_maxrss reports
    except OSError:
        pass


def measure(fn: Callable[[], T]) -> Measured:
    """Run ``fn()``; its result, wall seconds and peak resident-memory growth in MiB."""
    _reset_peak()
    before = _rss_kib()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Measured(value, seconds, max(0, peak - before) / 1024)


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"92.4 ± 0.8"`` (sample std; a single value prints alone)."""
    m = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def cost_cells(peaks: Sequence[float], seconds: Sequence[float]) -> list[str]:
    """The two cost columns every results table ends with: mean peak MiB and mean seconds."""
    return [f"{statistics.fmean(peaks):.1f}", f"{statistics.fmean(seconds):.1f}"]


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads (tiny models run fastest on one), then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seeded(seed: int) -> None:
    """Seed torch's global generator (module initialisation, dropout, augmentation)."""
    torch.manual_seed(seed)
