"""Compiler passes: small pure functions from graph to graph, one per file.

The pipeline is :data:`PIPELINE`; :func:`compiler.run_passes` runs the verifier
after each pass, so a failure says which pass broke what.
"""

from compiler.passes.check_dataflow import check_dataflow
from compiler.passes.close_uppers import close_uppers
from compiler.passes.infer_edges import infer_edges
from compiler.passes.infer_levels import infer_levels

PIPELINE = (close_uppers, infer_levels, infer_edges, check_dataflow)

__all__ = ["PIPELINE", "check_dataflow", "close_uppers", "infer_edges", "infer_levels"]
