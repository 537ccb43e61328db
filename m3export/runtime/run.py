"""`m3export run`: one prompt through a verified build, chained subgraph by subgraph.

The build is verified as `check` verifies it (m3export/artifacts/verify.py), the prompt prepared as
every command prepares it (m3export/runtime/prompt.py), and the subgraphs run in plan order with the
chosen backend (m3export/runners/registry.py: `ort`, `torch`, `trt`), each fed by name from the
inputs and earlier outputs (m3export/runners/chain.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from m3export.artifacts.verify import VerifiedArtifacts, verify_artifacts
from m3export.errors import ArtifactError
from m3export.runners.base import Runner
from m3export.runners.chain import run_chain
from m3export.runners.registry import get_backend, open_runners
from m3export.runtime.outputs import check_logits_path, save_logits
from m3export.runtime.prompt import prepare_inputs
from m3export.spec.memory import require_memory, resident_memory_bytes


@dataclass(frozen=True)
class RunResult:
    """logits [1, S, V] float32 (S counts every expanded image token) and every produced value."""

    logits: np.ndarray
    num_images: int
    backend: str
    values: dict[str, np.ndarray]
    logits_path: Path | None = None

    @property
    def top1_last(self) -> int:
        return int(self.logits[0, -1].argmax())


def run_prompt(
    arts: VerifiedArtifacts,
    runners: dict[str, Runner],
    inp: dict[str, torch.Tensor],
    num_images: int,
    backend: str,
) -> RunResult:
    """Run the built subgraphs in plan order on a prepared prompt (vision skipped without images)."""
    if num_images and not any(p.kind == "vision" for p in arts.plans):
        raise ArtifactError(f"{arts.root}: the build has no vision subgraph, so it cannot take --image")
    feed = {k: v.numpy() for k, v in inp.items()}
    values = run_chain(
        arts.plans, feed, lambda plan, f: runners[plan.name].infer(f), hidden_size=arts.spec.text.hidden_size
    ).values
    return RunResult(np.asarray(values["logits"], dtype=np.float32), num_images, backend, values)


def run_artifacts(
    artifacts: str | os.PathLike,
    backend: str,
    input_ids: str,
    images: Sequence[str | os.PathLike] = (),
    logits_out: str | os.PathLike | None = None,
    videos: Sequence[str | os.PathLike] = (),
    key: bytes | None = None,
) -> RunResult:
    """The `run` command: verify the build, prepare the prompt, run the chain, optionally save logits."""
    get_backend(backend)
    arts = verify_artifacts(artifacts, key=key)
    out = check_logits_path(Path(logits_out)) if logits_out is not None else None  # fail before running
    inp, n_images = prepare_inputs(arts.spec, input_ids, images, videos)
    seq = int(inp["input_ids"].shape[1])
    require_memory(resident_memory_bytes(arts.spec, seq), f"run of a {seq}-token prompt")
    runners = open_runners(backend, arts.subgraphs, arts.build_info())
    result = run_prompt(arts, runners, inp, n_images, backend)
    if out is None:
        return result
    return replace(result, logits_path=save_logits(torch.from_numpy(result.logits), out))
