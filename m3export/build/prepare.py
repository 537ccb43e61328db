"""The golden cases of a build, streamed through the stages one subgraph at a time.

A build never holds more than one subgraph's weights for its per-subgraph work, so the eager
references are chained stage by stage: each golden case carries its inputs and, as every subgraph is
processed in plan order, that subgraph's outputs (`CaseStream.advance`), both for the prompt forward
and chunk by chunk through the subgraph's own KV cache (a chunked prefill then DECODE_STEPS one-token
steps). Subgraph k+1 is fed from what subgraph k produced: small arrays, never a model. The same
streams, advanced with ONNX Runtime, give the chained ORT outputs of steps c and d.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from m3export.runners.chain import chunk_inputs, mtp_lookahead, run_chain
from m3export.spec import M3Spec
from m3export.split.inputs import GoldenCase, case_inputs, golden_cases, to_numpy
from m3export.split.plan import SubgraphPlan

Feeds = dict[str, dict[str, np.ndarray]]  # subgraph (or `vision:video`) -> input name -> array
Run = Callable[[SubgraphPlan, dict[str, np.ndarray]], dict[str, np.ndarray]]

# Decode parity (step d): the last DECODE_STEPS positions of each golden case are fed one at a time
# through the cache after a chunked prefill of the rest.
DECODE_STEPS = 3


@dataclass
class CaseStream:
    """One golden case through the stages processed so far: the prompt forward and the chunked run."""

    case: GoldenCase
    inputs: dict[str, np.ndarray]  # the case's own inputs: ids, positions, pixels and grids
    values: dict[str, np.ndarray]  # the inputs, then every processed subgraph's outputs
    chunks: list[dict[str, np.ndarray]]  # the same per chunk

    def advance(self, plan: SubgraphPlan, run: Run, hidden: int) -> tuple[Feeds, Feeds]:
        """Run `plan` on this case: the prompt forward, and the chunks one after the other through the
        subgraph's own cache. Returns the feeds it got (prompt, last chunk)."""
        res = run_chain([plan], self.values, run, hidden_size=hidden)
        self.values = res.values
        own = {s.name for s in plan.cache_inputs}
        cache: dict[str, np.ndarray] | None = None
        last: Feeds = {}
        for j, chunk in enumerate(self.chunks):
            step = run_chain([plan], chunk, run, cache, hidden_size=hidden)
            self.chunks[j] = step.values
            cache = {k: v for k, v in step.cache.items() if k in own}
            last = step.feeds
        return res.feeds, last

    def outputs(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The prompt forward's `names` (the last stage's outputs once every stage ran)."""
        return {n: self.values[n] for n in names}

    def chunked_outputs(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """`names` of the chunked run, concatenated over the sequence (equal to one prompt forward)."""
        return {n: np.concatenate([c[n] for c in self.chunks], axis=1) for n in names}


def case_streams(spec: M3Spec, plans: Sequence[SubgraphPlan]) -> tuple[list[GoldenCase], list[CaseStream]]:
    """The golden cases and a fresh stream of each (inputs only, nothing run yet)."""
    cases = golden_cases(spec)
    streams = []
    for i, c in enumerate(cases):
        arrays = {k: to_numpy(v) for k, v in case_inputs(spec, c, seed=1000 + i).items()}
        bounds = [c.seq - DECODE_STEPS + k for k in range(DECODE_STEPS)]
        # The prompt forward's MTP reads D - 1 zeros past the sequence (training semantics); sized from
        # every plan, since each stream advances one plan at a time.
        ahead = np.zeros((c.batch, mtp_lookahead(plans)), np.int64)
        values = {**arrays, "mtp_lookahead_ids": ahead}
        streams.append(CaseStream(c, arrays, values, chunk_inputs(plans, arrays, bounds)))
    return cases, streams


def full_eager_outputs(model: nn.Module, spec: M3Spec, inp: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reference outputs of the full eager model, named as the plan's final outputs."""
    with torch.no_grad():
        if spec.is_vl:
            out = model(
                inp["input_ids"],
                inp.get("pixel_values"),
                inp.get("image_grid_thw"),
                inp["position_ids"],
                pixel_values_videos=inp.get("pixel_values_videos"),
                video_grid_thw=inp.get("video_grid_thw"),
            )
        else:
            out = model(inp["input_ids"], position_ids=inp["position_ids"])
    ref = {"logits": out.logits}
    if spec.text.num_mtp_modules:
        ref["final_hidden_states"] = out.hidden_states
        for d, t in enumerate(out.mtp_per_depth_logits or []):
            ref[f"mtp_logits.{d}"] = t
    return ref


def final_names(spec: M3Spec) -> list[str]:
    """The outputs the full model's reference has: logits (and, with MTP, the MTP logits per depth and
    the final hidden states the last stage hands to MTP)."""
    names = ["logits"]
    if spec.text.num_mtp_modules:
        names += ["final_hidden_states", *(f"mtp_logits.{d}" for d in range(spec.text.num_mtp_modules))]
    return names
