"""The `export` section of a spec: targets, MoE lowering, graph precision and TensorRT settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from m3export.spec.base import Strict, Tolerance
from m3export.spec.lowerings import ort_lowering_names


class TrtRange(Strict):
    """min <= opt <= max of one dynamic dimension in a TensorRT optimisation profile."""

    min: int = Field(ge=0)
    opt: int = Field(ge=0)
    max: int = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> TrtRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got min={self.min}, opt={self.opt}, max={self.max}")
        return self


class TrtProfilesSpec(Strict):
    """Shape ranges of the dynamic dims, one optimisation profile per engine. `patches` of the vision
    engine (run on images and on videos) follow max(image_tokens, video_tokens) x spatial_merge_size**2."""

    batch: TrtRange = TrtRange(min=1, opt=1, max=4)
    seq: TrtRange = TrtRange(min=1, opt=64, max=512)
    past_seq: TrtRange = TrtRange(min=0, opt=64, max=512)
    image_tokens: TrtRange = TrtRange(min=0, opt=16, max=256)
    video_tokens: TrtRange = TrtRange(min=0, opt=16, max=256)

    @model_validator(mode="after")
    def _positive(self) -> TrtProfilesSpec:
        for name in ("batch", "seq"):
            if getattr(self, name).min < 1:
                raise ValueError(f"export.trt.profiles.{name}.min must be >= 1")
        return self


class TrtTolerancesSpec(Strict):
    """GPU-only checks; an absent tolerance means that check is not run (as for `tolerances`)."""

    plugin: dict[Literal["fp32", "fp16", "bf16"], Tolerance] = Field(
        default_factory=dict, description="plugin vs eager m3::moe, per plugin I/O precision"
    )
    engine: Tolerance | None = Field(None, description="each engine vs its eager subgraph")


# TensorRT-RTX compute capabilities an engine may target without a GPU (`CURRENT` needs one and, with
# a plugin layer, aborts the process there; SM75 refuses fp32 GEMMs). docs/tensorrt.md.
RtxComputeCapability = Literal["SM80", "SM86", "SM89", "SM120", "SM121"]
RTX_DEFAULT_CAPABILITIES: tuple[RtxComputeCapability, ...] = ("SM80", "SM86", "SM89", "SM120")


class TrtSpec(Strict):
    """TensorRT engines (`targets: [onnx, trt]` for datacenter TensorRT, `trt_rtx` for TensorRT-RTX;
    both share this section). TensorRT networks are strongly typed: the engine computes in the ONNX
    graph's dtypes, so `precision` must be the spec dtype's (None: follow it)."""

    precision: Literal["fp32", "fp16", "bf16"] | None = None
    profiles: TrtProfilesSpec = TrtProfilesSpec()
    timing_cache: Path | None = Field(None, description="read and updated when given; else one per build")
    builder_optimization_level: int = Field(3, ge=0, le=5)
    workspace_gib: float | None = Field(None, gt=0)
    tf32: bool = Field(False, description="let fp32 GEMMs use TF32 (faster, ~1e-3 relative error)")
    tolerances: TrtTolerancesSpec = TrtTolerancesSpec()
    compute_capabilities: list[RtxComputeCapability] = Field(
        default_factory=lambda: list(RTX_DEFAULT_CAPABILITIES),
        min_length=1,
        description="TensorRT-RTX engines only: the GPU architectures each engine is built for "
        "(explicit, so that engines build on a machine without a GPU)",
    )


TRT_TARGETS = ("trt", "trt_rtx")

GraphDtype = Literal["float32", "bfloat16", "float16"]


# Bits per routed-expert weight of export.precision.experts (m3export/ops/quant.py has the format).
EXPERT_BITS = {"int8": 8, "int4": 4}


class PrecisionSpec(Strict):
    """The precision of the exported graphs and of their eager references, separate from the weights'
    storage dtype (`dtype`, what the checkpoint holds). Whatever `dtype` says, these stay in fp32 as
    M3's reference keeps them (m3-architecture.md §2.7, §7): the router weight and its sigmoid, the
    `e_score_correction_bias` (expert selection flips under low-precision scores), the RMSNorm and
    SwiGLU-OAI arithmetic (computed in fp32 and cast back; their weights are in `dtype`), RoPE's cos/sin,
    the MSA indexer scores (hard top-k block choices) and the attention softmax. A build in a reduced
    precision gates each graph against the eager model in the same precision (tight) and the whole
    pipeline against the fp32 eager model on the same weights (step `precision`: cosine, top-1)."""

    dtype: GraphDtype = Field("float32", description="graph activations and weights")
    experts: Literal["same", "int8", "int4"] = Field(
        "same", description="routed-expert weights: same as dtype, or weight-only int8 / int4"
    )
    block_size: int = Field(
        32, ge=16, le=256, description="quantisation block along the input dimension (int8 / int4)"
    )

    @model_validator(mode="after")
    def _block(self) -> PrecisionSpec:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"export.precision.block_size must be a power of two, got {self.block_size}")
        return self


class ExportSpec(Strict):
    targets: list[Literal["onnx", "trt", "trt_rtx"]] = ["onnx"]  # noqa: RUF012 (pydantic copies it)
    moe: str = Field(
        "ort", description="MoE lowering of the ONNX Runtime graphs: ort, portable, or a registered one"
    )
    opset: int = Field(23, ge=18, le=23)
    precision: PrecisionSpec = PrecisionSpec()
    trt: TrtSpec | None = Field(None, description="TensorRT settings; defaults when 'trt' is a target")

    @model_validator(mode="before")
    @classmethod
    def _trt_defaults(cls, data: object) -> object:
        targets = data.get("targets") if isinstance(data, dict) else None
        wants = isinstance(targets, list) and any(t in TRT_TARGETS for t in targets if isinstance(t, str))
        if isinstance(data, dict) and wants and data.get("trt") is None:
            data = {**data, "trt": {}}
        return data

    @property
    def trt_graphs(self) -> bool:
        """Whether the build makes TensorRT-flavoured graphs (for either TensorRT target)."""
        return any(t in TRT_TARGETS for t in self.targets)

    @model_validator(mode="after")
    def _known_lowering(self) -> ExportSpec:

        if self.moe not in ort_lowering_names():
            raise ValueError(
                f"export.moe {self.moe!r} is not an MoE lowering for ONNX Runtime; accepted values: "
                f"{', '.join(ort_lowering_names())} (others once registered with "
                "m3export.ops.lowering.register_lowering)"
            )
        return self

    @model_validator(mode="after")
    def _trt_target(self) -> ExportSpec:
        if self.trt is not None and not set(self.targets) & set(TRT_TARGETS):
            raise ValueError(
                "export.trt is given but neither 'trt' nor 'trt_rtx' is in export.targets; add one or "
                "drop export.trt"
            )
        return self
