"""Benchmarks of the pipeline and the server against the origin's approach.

Run ``python -m benchmarks`` (all, writes ``benchmarks/RESULTS.md``), ``--quick`` for a
smoke run in seconds, ``--only NAME[,NAME]`` for some. See ``benchmarks/__main__.py``.
"""
