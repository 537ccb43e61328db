"""Eager PyTorch runner for a subgraph module with named inputs and outputs."""

from __future__ import annotations

import numpy as np
import torch


class TorchRunner:
    """Calls `module(**inputs)`; the module returns a dict or a tuple matching `output_names`."""

    def __init__(self, module: torch.nn.Module, output_names: list[str], name: str = "torch") -> None:
        self.module = module
        self.output_names = output_names
        self.name = name

    @torch.no_grad()
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        if isinstance(outs, dict):
            outs = tuple(outs[n] for n in self.output_names)
        return {
            n: o.detach().float().numpy() if o.is_floating_point() else o.numpy()
            for n, o in zip(self.output_names, outs, strict=True)
        }
