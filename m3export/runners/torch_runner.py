"""Eager PyTorch runner for a subgraph module with named inputs and outputs.

Arrays between runners are float32 whatever the graph precision (numpy has no bfloat16): a runner casts
each floating input to the dtype its module or graph declares and returns floating outputs as float32
(exact both ways for values a float16 / bfloat16 graph produced).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class TorchRunner:
    """Calls `module(*inputs)` in `input_names` order; the module returns a dict or a tuple matching
    `output_names`. `input_dtypes`: the torch dtype each floating input is cast to (else as given)."""

    def __init__(
        self,
        module: torch.nn.Module,
        input_names: list[str],
        output_names: list[str],
        name: str = "torch",
        input_dtypes: dict[str, torch.dtype] | None = None,
    ) -> None:
        self.module = module
        self.input_names = input_names
        self.output_names = output_names
        self.name = name
        self.input_dtypes = input_dtypes or {}

    @classmethod
    def for_plan(cls, module: torch.nn.Module, plan: Any) -> TorchRunner:
        """A runner of a subgraph plan's stage wrapper, its inputs cast to the plan's signature."""
        return cls(module, plan.input_names, plan.output_names, f"torch:{plan.name}", plan_dtypes(plan))

    def _tensor(self, name: str, value: np.ndarray) -> torch.Tensor:
        return to_tensor(value, self.input_dtypes.get(name))

    @torch.no_grad()
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}")
        outs = self.module(*(self._tensor(n, feed[n]) for n in self.input_names))
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        if isinstance(outs, dict):
            outs = tuple(outs[n] for n in self.output_names)
        return {
            n: o.detach().float().numpy() if o.is_floating_point() else o.numpy()
            for n, o in zip(self.output_names, outs, strict=True)
        }


def plan_dtypes(plan: Any) -> dict[str, torch.dtype]:
    """The torch dtype of each floating input of a subgraph plan."""
    return {s.name: getattr(torch, s.dtype) for s in plan.inputs if s.dtype != "int64"}


def to_tensor(value: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
    """A feed array as a tensor, a floating one cast to `dtype` when given."""
    t = torch.from_numpy(np.ascontiguousarray(value))
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
