"""Benchmarks: mlodsl against a hand-written PyTorch loop of the same algorithm and Betty 0.2.1.

``python bench/run.py`` writes the tables into ``bench/RESULTS.md``; see that
script's docstring for what is measured and how.
"""
