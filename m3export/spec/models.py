"""Pydantic models describing one MiniMax M3 variant (its `export` section: spec/export.py).

Field names follow the HF `config.json` of the released checkpoint (m3-architecture.md §1.2-1.5) so
that `spec from-hf` is a plain mapping. Every model is frozen and rejects unknown keys. This module
imports no torch: the spec layer sits below everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from m3export.spec.base import Strict, Tolerance
from m3export.spec.defaults import default_tolerances
from m3export.spec.export import ExportSpec, GraphDtype


def _schedule_check(name: str, values: list[int], num_layers: int) -> None:
    if len(values) != num_layers:
        raise ValueError(
            f"{name} has {len(values)} entries but num_hidden_layers is {num_layers}; "
            "give one 0/1 entry per decoder layer"
        )
    bad = [v for v in values if v not in (0, 1)]
    if bad:
        raise ValueError(f"{name} entries must be 0 or 1, got {bad[0]!r}")


class SparseAttentionSpec(Strict):
    """MSA block-sparse attention (m3-architecture.md §1.3, §2.4)."""

    use_sparse_attention: bool = True
    sparse_block_size: int = Field(gt=0, le=1 << 16, description="key tokens per block")
    sparse_topk_blocks: int = Field(
        gt=0, le=1 << 16, description="blocks kept per (index head, query), incl. forced"
    )
    sparse_num_index_heads: int = Field(gt=0, le=4096, description="indexer query heads; must equal KV heads")
    sparse_index_dim: int = Field(gt=0, le=4096, description="indexer head width")
    sparse_score_type: Literal["max"] = "max"
    sparse_init_block: int = Field(0, ge=0, description="sink blocks 0..n-1 always kept (M3: 0)")
    sparse_local_block: int = Field(1, ge=0, description="blocks ending at the query's own always kept")
    sparse_attention_freq: list[int] = Field(description="per layer: 1 = MSA, 0 = full attention")
    sparse_disable_index_value: list[int] = Field(
        description="per layer; must be 1 on every sparse layer (selection-only indexer)"
    )

    @model_validator(mode="after")
    def _check(self) -> SparseAttentionSpec:
        if self.sparse_init_block + min(self.sparse_local_block, 1) > self.sparse_topk_blocks:
            raise ValueError(
                "sparse_init_block + forced local block exceeds sparse_topk_blocks "
                f"({self.sparse_init_block} + 1 > {self.sparse_topk_blocks})"
            )
        return self


class TextSpec(Strict):
    """Text backbone (`text_config`, m3-architecture.md §1.2)."""

    # Upper bounds are sanity limits (10-100x M3's real values): a typo such as 10**9 is refused here
    # instead of exhausting memory later; what a machine can really build is checked from the sizes.
    hidden_size: int = Field(gt=0, le=1 << 16)
    intermediate_size: int = Field(gt=0, le=1 << 18, description="width of one routed expert")
    dense_intermediate_size: int = Field(gt=0, le=1 << 18)
    shared_intermediate_size: int = Field(gt=0, le=1 << 18, description="width of one shared expert")
    num_hidden_layers: int = Field(gt=0, le=4096)
    num_attention_heads: int = Field(gt=0, le=4096)
    num_key_value_heads: int = Field(gt=0, le=4096)
    head_dim: int = Field(gt=0, le=4096)
    vocab_size: int = Field(gt=0, le=1 << 24)
    max_position_embeddings: int = Field(gt=0, le=1 << 24)  # the splice counts in fp32 (model/splice.py)
    rms_norm_eps: float = Field(1e-6, gt=0)
    use_gemma_norm: Literal[True] = True
    attention_output_gate: Literal[False] = False
    rope_theta: float = Field(gt=0)
    rotary_dim: int = Field(gt=0)
    hidden_act: Literal["swigluoai"] = "swigluoai"
    use_qk_norm: Literal[True] = True
    qk_norm_type: Literal["per_head"] = "per_head"
    tie_word_embeddings: Literal[False] = False
    num_local_experts: int = Field(gt=0, le=1 << 14)
    num_experts_per_tok: int = Field(gt=0, le=1024)
    n_shared_experts: Literal[1] = 1
    scoring_func: Literal["sigmoid"] = "sigmoid"
    use_routing_bias: Literal[True] = True
    routed_scaling_factor: float = Field(2.0, gt=0)
    moe_layer_freq: list[int]
    swiglu_alpha: float = 1.702
    swiglu_beta: float = 1.0
    swiglu_limit: float = Field(7.0, gt=0)
    sparse_attention_config: SparseAttentionSpec | None = None
    num_mtp_modules: int = Field(
        0, ge=0, le=64, description="physical MTP depths (m3-architecture.md §3, §10.1)"
    )
    bos_token_id: int | None = Field(None, ge=0)
    eos_token_id: int | None = Field(None, ge=0)
    pad_token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> TextSpec:
        n = self.num_hidden_layers
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and <= head_dim ({self.head_dim})")
        _schedule_check("moe_layer_freq", self.moe_layer_freq, n)
        sa = self.sparse_attention_config
        if sa is not None:
            _schedule_check("sparse_attention_config.sparse_attention_freq", sa.sparse_attention_freq, n)
            _schedule_check(
                "sparse_attention_config.sparse_disable_index_value", sa.sparse_disable_index_value, n
            )
            for i, (f, d) in enumerate(
                zip(sa.sparse_attention_freq, sa.sparse_disable_index_value, strict=True)
            ):
                if f and not d:
                    raise ValueError(
                        f"sparse_attention_config.sparse_disable_index_value[{i}] must be 1 on sparse layer {i}: "
                        "M3 uses a selection-only indexer (m3-architecture.md §1.1)"
                    )
            if sa.sparse_num_index_heads != self.num_key_value_heads:
                raise ValueError(
                    f"sparse_attention_config.sparse_num_index_heads ({sa.sparse_num_index_heads}) must equal "
                    f"num_key_value_heads ({self.num_key_value_heads}): one block selection per KV group"
                )
            if self.rotary_dim > sa.sparse_index_dim:
                raise ValueError(
                    f"rotary_dim ({self.rotary_dim}) must be <= sparse_attention_config.sparse_index_dim "
                    f"({sa.sparse_index_dim}): the indexer uses the same partial RoPE"
                )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and tok >= self.vocab_size:
                raise ValueError(f"{name} ({tok}) must be < vocab_size ({self.vocab_size})")
        return self

    @property
    def partial_rotary_factor(self) -> float:
        return self.rotary_dim / self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layer_freq[layer])

    def is_sparse_layer(self, layer: int) -> bool:
        sa = self.sparse_attention_config
        return bool(sa is not None and sa.use_sparse_attention and sa.sparse_attention_freq[layer])

    @property
    def uses_sparse_attention(self) -> bool:
        sa = self.sparse_attention_config
        return sa is not None and sa.use_sparse_attention


class VisionSpec(Strict):
    """Vision tower (`vision_config`, m3-architecture.md §1.4, §4)."""

    hidden_size: int = Field(gt=0, le=1 << 16)
    num_attention_heads: int = Field(gt=0, le=4096)
    num_hidden_layers: int = Field(gt=0, le=1024)
    intermediate_size: int = Field(gt=0, le=1 << 18)
    patch_size: int = Field(14, gt=0, le=1024)
    num_channels: Literal[3] = 3
    temporal_patch_size: int = Field(2, gt=0, le=64)
    spatial_merge_size: int = Field(2, gt=0, le=64)
    rope_theta: float = Field(10000.0, gt=0)
    hidden_act: Literal["gelu"] = "gelu"
    layer_norm_eps: float = Field(1e-5, gt=0)
    vision_segment_max_frames: int = Field(4, gt=0, description="max temporal patches per attention segment")
    image_size: int = Field(2016, gt=0, description="nominal; unused in compute")

    @model_validator(mode="after")
    def _check(self) -> VisionSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("vision head_dim (hidden_size / num_attention_heads) must be even")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.temporal_patch_size * self.patch_size**2


class MultimodalSpec(Strict):
    """Top-level VL fields (`MiniMaxM3VLConfig`, m3-architecture.md §1.5)."""

    image_token_index: int = Field(ge=0)
    video_token_index: int = Field(ge=0)
    projector_hidden_size: int = Field(
        gt=0, le=1 << 18, description="intermediate width of projector and merger"
    )
    projector_hidden_act: Literal["gelu"] = "gelu"
    multimodal_projector_bias: Literal[True] = True
    patch_merge_bias: Literal[True] = True
    vision_feature_layer: Literal[-1] = -1
    vision_feature_select_strategy: Literal["full"] = "full"


class RandomWeights(Strict):
    seed: int = Field(ge=0)


class WeightsSpec(Strict):
    """Exactly one of `random: {seed: N}` or `checkpoint: PATH` (an HF-format directory)."""

    random: RandomWeights | None = None
    checkpoint: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> WeightsSpec:
        if (self.random is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of `random: {seed: N}` or `checkpoint: PATH`")
        return self


class TolerancesSpec(Strict):
    """Tolerances per parity step. A step the spec omits gets the documented default for the spec's
    dtype (m3export/spec/defaults.py, each with its reason): every step always runs."""

    reference: Tolerance = Field(description="m3export eager vs transformers (fp32)")
    split: Tolerance = Field(description="full eager model vs chained eager subgraphs")
    onnx: Tolerance = Field(description="each subgraph: eager vs ONNX Runtime (also gates `routing`)")
    end_to_end: Tolerance = Field(description="chained ONNX subgraphs vs full eager model")
    decode: Tolerance = Field(description="KV-cache decode vs full recompute")
    generate: Tolerance = Field(
        description="greedy token ids: ORT vs eager torch vs transformers, MTP speculative vs plain"
    )
    precision: Tolerance | None = Field(
        None,
        description="graphs in a reduced export.precision.dtype (chained ORT, and the eager model in "
        "that dtype) vs the fp32 eager model on the same weights; needed when the dtype is not float32",
    )


class PipelineSpec(Strict):
    """How the text layers are split into stages (m3-architecture.md §5)."""

    num_text_stages: int = Field(1, gt=0)
    layer_ranges: list[tuple[int, int]] | None = Field(
        None, description="explicit [start, end) layer ranges per stage; overrides num_text_stages"
    )
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        description="the most memory a build may hold at once. A build holds one subgraph's weights at a "
        "time; the steps that need the whole model resident (split against the full model, generate, "
        "the transformers oracle) run only when their estimate fits. Default: what the machine has",
    )


class M3Spec(Strict):
    """One MiniMax M3 variant: model dims, weights source, pipeline, export knobs and tolerances."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100, description="used for artifacts/<name>/"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the weights' storage dtype (a checkpoint's torch_dtype; random weights are rounded "
        "to it). The graphs' precision is export.precision.dtype",
    )
    text: TextSpec
    vision: VisionSpec | None = None
    multimodal: MultimodalSpec | None = None
    weights: WeightsSpec
    pipeline: PipelineSpec = PipelineSpec()
    export: ExportSpec = ExportSpec()
    tolerances: TolerancesSpec

    @model_validator(mode="before")
    @classmethod
    def _default_tolerances(cls, data: object) -> object:
        """Steps the spec omits get the defaults for its dtype (their reasons say where they come from)."""
        if not isinstance(data, dict):
            return data

        given = data.get("tolerances")
        if given is not None and not isinstance(given, dict):
            return data  # let validation name the bad value
        export = data.get("export")
        precision = export.get("precision") if isinstance(export, dict) else None
        dtype = precision.get("dtype", "float32") if isinstance(precision, dict) else "float32"
        experts = precision.get("experts", "same") if isinstance(precision, dict) else "same"
        defaults = default_tolerances(
            dtype if isinstance(dtype, str) else "float32", experts if isinstance(experts, str) else "same"
        )
        return {**data, "tolerances": {**defaults, **(given or {})}}

    @model_validator(mode="after")
    def _check(self) -> M3Spec:
        p = self.export.precision
        if self.reduced_precision and self.tolerances.precision is None:
            raise ValueError(
                f"tolerances.precision is required with export.precision dtype {p.dtype!r}, experts "
                f"{p.experts!r}: the bounds of the reduced-precision pipeline against the fp32 model"
            )
        if p.experts != "same":
            for name in ("hidden_size", "intermediate_size"):
                if getattr(self.text, name) % p.block_size:
                    raise ValueError(
                        f"export.precision.block_size {p.block_size} must divide text.{name} "
                        f"({getattr(self.text, name)}): the experts are quantised in blocks along their inputs"
                    )
        if (self.vision is None) != (self.multimodal is None):
            raise ValueError("vision and multimodal must be given together (a VL model) or both omitted")
        if self.multimodal is not None:
            mm = self.multimodal
            for name in ("image_token_index", "video_token_index"):
                tok = getattr(mm, name)
                if tok >= self.text.vocab_size:
                    raise ValueError(
                        f"multimodal.{name} ({tok}) must be < text.vocab_size ({self.text.vocab_size})"
                    )
            if mm.image_token_index == mm.video_token_index:
                raise ValueError("multimodal.image_token_index and video_token_index must differ")
        n = self.text.num_hidden_layers
        ranges = self.pipeline.layer_ranges
        if ranges is not None:
            expect = 0
            for i, (start, end) in enumerate(ranges):
                if start != expect or end <= start:
                    raise ValueError(
                        f"pipeline.layer_ranges[{i}] = [{start}, {end}) must start at {expect} and be non-empty: "
                        "ranges must be contiguous, complete and non-overlapping"
                    )
                expect = end
            if expect != n:
                raise ValueError(f"pipeline.layer_ranges end at layer {expect}, but the model has {n} layers")
        elif self.pipeline.num_text_stages > n:
            raise ValueError(
                f"pipeline.num_text_stages ({self.pipeline.num_text_stages}) must be <= num_hidden_layers ({n})"
            )
        return self

    @property
    def is_vl(self) -> bool:
        return self.vision is not None

    @property
    def reduced_precision(self) -> bool:
        """Whether the graphs compute in less than fp32 (a dtype or quantised experts): the build then
        also gates them against the fp32 model on the same weights (step `precision`)."""
        p = self.export.precision
        return p.dtype != "float32" or p.experts != "same"

    @property
    def graph_dtype(self) -> GraphDtype:
        """The dtype the eager model, the graphs and their activations are in (export.precision.dtype)."""
        return self.export.precision.dtype
