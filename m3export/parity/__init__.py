"""Parity metrics, intermediates and reports.

Files: compare.py (metrics and `ParityReport` against a spec `Tolerance`), intermediates.py (per-layer
outputs and expert choices of a graph vs eager: routing agreement, divergence localisation),
report.py (check's JSON / JUnit / Markdown / PNG renderings, the build's table), hf_oracle.py
(transformers' greedy generation as an oracle).
"""

from m3export.parity.compare import OutputParity, ParityReport, compare_output, compare_outputs

__all__ = ["OutputParity", "ParityReport", "compare_output", "compare_outputs"]
