"""`m3export run`: one prompt through a built artifact directory, chained subgraph by subgraph.

The spec is recreated from the manifest's canonical copy, the prompt is prepared as
`m3export model forward` prepares it (token ids parsed, images preprocessed, one placeholder per
image expanded to its feature tokens), the host vision inputs and position ids are computed, and
the planned subgraphs run in plan order, each fed by name from the inputs and earlier outputs:

- backend `ort`:   one `OrtRunner` per subgraph ONNX file `<name>/<name>.onnx` of the artifacts;
- backend `torch`: the eager model the spec describes (its random seed or checkpoint), cut into the
                   same stage wrappers (`split.subgraphs.build_stage`), one `TorchRunner` each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from m3export.artifacts import read_manifest
from m3export.errors import ArtifactError, InputError
from m3export.memory import require_memory, runtime_memory_bytes
from m3export.spec import M3Spec
from m3export.split.plan import SubgraphPlan

Backend = Literal["ort", "torch", "trt"]
BACKENDS: tuple[str, ...] = ("ort", "torch", "trt")


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


@dataclass(frozen=True)
class Artifacts:
    """A built artifact directory: its manifest, the spec it was built from and the plans it holds."""

    root: Path
    manifest: dict[str, Any]
    spec: M3Spec
    plans: list[SubgraphPlan]
    verified: Any = None  # m3export.integrity.VerifiedArtifacts: the files as hashed (pinned)


def load_artifacts(root: str | os.PathLike, key: bytes | None = None) -> Artifacts:
    """Verify the artifact directory as `check` does (seal, sha256 of every file, paths; ArtifactError,
    exit 3), then recreate the spec from the manifest and the plans the build exported."""
    from m3export.integrity import verify_artifacts
    from m3export.split.plan import plan_subgraphs

    root = Path(root)
    verified = verify_artifacts(root, key=key)  # also checks the manifest's structure and its spec
    manifest = read_manifest(root)
    plans = plan_subgraphs(verified.spec)  # verify_artifacts refused an incomplete build
    return Artifacts(root, manifest, verified.spec, plans, verified)


def prepare_inputs(
    spec: M3Spec,
    input_ids: str,
    images: Sequence[str | os.PathLike] = (),
    videos: Sequence[str | os.PathLike] = (),
) -> tuple[dict[str, Tensor], int]:
    """Graph inputs of one prompt (batch 1): input_ids, position_ids and the vision inputs of its images
    (`pixel_values`, `vision_cos`, ...) and videos (`pixel_values_videos`, `video_cos`, ...).

    Ids, images and videos are handled as `m3export model forward` handles them (same parser,
    preprocessing and placeholder expansion).
    """
    from m3export.forward import parse_token_ids, prepare_prompt
    from m3export.model.vision_inputs import build_vision_inputs

    prompt = prepare_prompt(spec, parse_token_ids(input_ids), images, videos)
    inp: dict[str, Tensor] = {}
    for px, prefix, names in (
        (prompt.images, "image", ("pixel_values", "vision_cos", "vision_sin", "vision_segment_ids")),
        (prompt.videos, "video", ("pixel_values_videos", "video_cos", "video_sin", "video_segment_ids")),
    ):
        token = getattr(spec.multimodal, f"{prefix}_token_index", None)
        if px is None:
            if token is not None and token in prompt.ids:
                raise InputError(
                    f"--input-ids hold the {prefix} token id {token} but no --{prefix} was given"
                )
            continue
        assert spec.vision is not None
        vi = build_vision_inputs(px.grid_thw, spec.vision, num_patches=px.pixel_values.shape[0])
        values = (px.pixel_values.to(getattr(torch, spec.dtype)), vi.rope_cos, vi.rope_sin, vi.segment_ids)
        inp.update(zip(names, values, strict=True))
    if not prompt.ids:
        raise InputError("--input-ids is empty")
    inp["input_ids"] = torch.tensor([prompt.ids], dtype=torch.int64)
    inp["position_ids"] = torch.arange(len(prompt.ids), dtype=torch.int64)[None, :]
    return inp, len(images)


def make_runners(arts: Artifacts, backend: str) -> dict[str, Any]:
    """One runner per built subgraph: ORT on the ONNX files, or torch on the eager stage wrappers."""
    if backend == "ort":
        from m3export.runners.ort_runner import require_onnxruntime

        require_onnxruntime(arts.manifest["runtime"]["onnxruntime"], arts.manifest["moe_lowering"])
        subs = {s.name: s for s in arts.verified.subgraphs}
        return {p.name: subs[p.name].ort_runner() for p in arts.plans}
    if backend == "trt":
        from m3export.runners.trt_runner import TrtRunner
        from m3export.trt.engine import tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason is not None:
            raise InputError(f"--backend trt: TensorRT is not available ({reason}); use --backend ort")
        return {p.name: TrtRunner.from_manifest(arts.root, arts.manifest, p.name) for p in arts.plans}
    if backend == "torch":
        from m3export.forward import load_model
        from m3export.runners.torch_runner import TorchRunner
        from m3export.split.subgraphs import build_stage

        spec = arts.spec
        model = load_model(spec).eval()
        return {
            p.name: TorchRunner(build_stage(model, p), p.input_names, p.output_names, f"torch:{p.name}")
            for p in arts.plans
        }
    raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def run_chain(
    arts: Artifacts, runners: dict[str, Any], inp: dict[str, Tensor], num_images: int, backend: str
) -> RunResult:
    """Run the built subgraphs in plan order (vision skipped without images)."""
    from m3export.runners.chain import run_chain

    if num_images and not any(p.kind == "vision" for p in arts.plans):
        raise ArtifactError(f"{arts.root}: the build has no vision subgraph, so it cannot take --image")
    feed = {k: v.numpy() for k, v in inp.items()}
    values = run_chain(
        arts.plans,
        feed,
        lambda plan, f: runners[plan.name].infer(f),
        hidden_size=arts.spec.text.hidden_size,
    ).values
    logits = np.asarray(values["logits"], dtype=np.float32)
    return RunResult(logits, num_images, backend, values)


def run_artifacts(
    artifacts: str | os.PathLike,
    backend: str,
    input_ids: str,
    images: Sequence[str | os.PathLike] = (),
    logits_out: str | os.PathLike | None = None,
    videos: Sequence[str | os.PathLike] = (),
    key: bytes | None = None,
) -> RunResult:
    """The `run` command: load the artifacts, prepare the prompt, run the chain, optionally save logits."""
    from dataclasses import replace

    from m3export.forward import _check_logits_path, save_logits

    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    arts = load_artifacts(artifacts, key)
    out = _check_logits_path(Path(logits_out)) if logits_out is not None else None  # fail before running
    inp, n_images = prepare_inputs(arts.spec, input_ids, images, videos)
    seq = int(inp["input_ids"].shape[1])
    require_memory(runtime_memory_bytes(arts.spec, seq), f"run of a {seq}-token prompt")
    result = run_chain(arts, make_runners(arts, backend), inp, n_images, backend)
    if out is None:
        return result
    return replace(result, logits_path=save_logits(torch.from_numpy(result.logits), out))
