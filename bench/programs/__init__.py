"""The benchmark programs, each built three ways (``hand``, ``mlodsl``, ``betty``).

Every module exposes ``build(side, method, sizes, seed, dtype) -> Runner`` (see
``bench.common``). ``SINGLE_PATH`` lists the single-path programs in table
order; ``ladder`` is the DAG whose number of paths doubles with each level.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SINGLE_PATH = ("mwn", "darts", "trilevel")


def load(name: str) -> ModuleType:
    return importlib.import_module(f"bench.programs.{name}")
