"""The runner interface shared by the torch, ONNX Runtime and TensorRT backends (Polygraphy-style)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    """Runs one subgraph: named numpy inputs in, named numpy outputs out."""

    name: str

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
