"""Eager PyTorch runner for a subgraph module with named inputs and outputs."""

from __future__ import annotations

import numpy as np
import torch


class TorchRunner:
    """Calls `module(*inputs)` in `input_names` order; the module returns a dict or a tuple matching
    `output_names`."""

    def __init__(
        self, module: torch.nn.Module, input_names: list[str], output_names: list[str], name: str = "torch"
    ) -> None:
        self.module = module
        self.input_names = input_names
        self.output_names = output_names
        self.name = name

    @torch.no_grad()
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}")
        outs = self.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names))
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        if isinstance(outs, dict):
            outs = tuple(outs[n] for n in self.output_names)
        return {
            n: o.detach().float().numpy() if o.is_floating_point() else o.numpy()
            for n, o in zip(self.output_names, outs, strict=True)
        }
