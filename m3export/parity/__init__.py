"""Parity metrics, reports and the gate."""

from m3export.parity.compare import OutputParity, ParityReport, compare_output, compare_outputs

__all__ = ["OutputParity", "ParityReport", "compare_output", "compare_outputs"]
