"""The stage plan: which modules each subgraph owns and its named, typed inputs and outputs.

A pure function of the spec (no torch). Placement follows Automodel's auto-split (m3-architecture.md
§5): stage 0 owns the embedding and every multimodal module's consumer (the splice), layers are
spread evenly with the remainder on the earliest stages, and the last stage owns the final norm and
lm_head. The vision tower is its own subgraph so it can run once per image. MTP is its own subgraph
(Automodel forbids MTP under PP; here it is a separate graph that *uses* the embedding and lm_head
owned by the text stages — the use is declared in `shared_uses`, and the ONNX file carries a copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from m3export.errors import SpecError
from m3export.spec.models import M3Spec

Dim = str | int
Kind = Literal["vision", "text", "mtp"]


@dataclass(frozen=True)
class KindTraits:
    """What the code needs to know of a subgraph kind, as data (not `kind ==` branches)."""

    spec_sections: tuple[str, ...]  # spec sections the exported graph depends on (its cache key)
    ignores: tuple[str, ...] = ()  # fields of those sections it does not depend on
    main: bool = True  # part of the main model's forward (MTP is a draft head beside it)
    per_media: bool = False  # runs once per medium (the prompt's images, its videos), not on the prompt


KINDS: dict[str, KindTraits] = {
    "vision": KindTraits(("vision", "multimodal"), per_media=True),
    # A text stage sees whether MTP exists only through its plan (the extra final_hidden_states output).
    "text": KindTraits(("text", "multimodal"), ignores=("text.num_mtp_modules",)),
    "mtp": KindTraits(("text",), main=False),
}


@dataclass(frozen=True)
class TensorSig:
    """A named graph input or output. Symbolic dims are strings (`batch`, `seq`, ...)."""

    name: str
    dtype: Literal["int64", "float32", "bfloat16", "float16"]
    dims: tuple[Dim, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class SubgraphPlan:
    """One exported subgraph."""

    name: str
    kind: Kind
    modules: tuple[str, ...]
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    layers: tuple[int, ...] = ()
    shared_uses: tuple[tuple[str, str], ...] = field(default=())  # (module, owning subgraph)

    @property
    def cache_inputs(self) -> tuple[TensorSig, ...]:
        """The `past.*` inputs (KV cache of the layers this subgraph owns), in graph order."""
        return tuple(t for t in self.inputs if t.name.startswith("past."))

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """input name -> {axis: symbolic dim name}, as `export_onnx` takes them."""
        return {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in self.inputs}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SubgraphPlan:
        """The plan `to_json` wrote (other keys of a manifest entry are ignored)."""

        def sigs(items: Any) -> tuple[TensorSig, ...]:
            return tuple(TensorSig(t["name"], t["dtype"], tuple(t["dims"])) for t in items)

        return cls(
            name=data["name"],
            kind=data["kind"],
            modules=tuple(data["modules"]),
            inputs=sigs(data["inputs"]),
            outputs=sigs(data["outputs"]),
            layers=tuple(data["layers"]),
            shared_uses=tuple((m, o) for m, o in data["shared_uses"]),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "modules": list(self.modules),
            "layers": list(self.layers),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "shared_uses": [list(u) for u in self.shared_uses],
        }


def stage_layer_ranges(spec: M3Spec) -> list[tuple[int, int]]:
    """[start, end) per text stage: explicit ranges, or an even split with the remainder first (§5)."""
    n = spec.text.num_hidden_layers
    if spec.pipeline.layer_ranges is not None:
        return [tuple(r) for r in spec.pipeline.layer_ranges]  # type: ignore[misc]
    k = spec.pipeline.num_text_stages
    base, rem = divmod(n, k)
    ranges, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < rem else 0)
        ranges.append((start, end))
        start = end
    return ranges


HIDDEN_PREFIX = "hidden_states."


def boundary_name(layer: int) -> str:
    """The graph name of the residual stream entering decoder layer `layer` (a stage boundary)."""
    return f"{HIDDEN_PREFIX}{layer}"


def boundary_sig(spec: M3Spec, layer: int) -> TensorSig:
    """`hidden_states.{layer}` [batch, seq, hidden]: output of the stage ending before `layer`, input of
    the stage starting at it. One name per boundary, so a middle stage's input and output never clash
    (an ONNX graph cannot hold two values of one name; the exporter would rename the output)."""
    return TensorSig(boundary_name(layer), spec.graph_dtype, ("batch", "seq", spec.text.hidden_size))


def cache_sigs(spec: M3Spec, layer: str, sparse: bool) -> tuple[list[TensorSig], list[TensorSig]]:
    """The cache inputs `past.{layer}.*` and outputs `present.{layer}.*` of one decoder layer (§2.3):
    post-RoPE key and raw value [batch, kv_heads, len, head_dim]; a sparse layer also the index key
    [batch, len, index_dim] (§2.4). Past holds `past_seq` positions, present `past_seq+seq`."""
    t = spec.text
    kv = (t.num_key_value_heads, t.head_dim)
    parts: list[tuple[str, tuple[int, ...]]] = [("key", kv), ("value", kv)]
    if sparse:
        assert t.sparse_attention_config is not None
        parts.append(("index_key", (t.sparse_attention_config.sparse_index_dim,)))

    def sig(prefix: str, name: str, dims: tuple[int, ...], length: str) -> TensorSig:
        lead: tuple[Dim, ...] = ("batch", dims[0], length) if len(dims) == 2 else ("batch", length)
        return TensorSig(f"{prefix}.{layer}.{name}", spec.graph_dtype, (*lead, dims[-1]))

    return (
        [sig("past", n, d, "past_seq") for n, d in parts],
        [sig("present", n, d, "past_seq+seq") for n, d in parts],
    )


def plan_subgraphs(spec: M3Spec) -> list[SubgraphPlan]:
    """Every subgraph of the build, in execution order: vision?, text_0..text_{N-1}, mtp?."""
    plans = [_vision_plan(spec)] if spec.is_vl else []
    ranges = stage_layer_ranges(spec)
    plans += [
        _text_plan(spec, i, start, end, last=i == len(ranges) - 1) for i, (start, end) in enumerate(ranges)
    ]
    if spec.text.num_mtp_modules:
        plans.append(_mtp_plan(spec, last_stage=f"text_{len(ranges) - 1}"))
    validate_plan(spec, plans)
    return plans


def _root(spec: M3Spec) -> str:
    return "language_model." if spec.is_vl else ""


def _ids(name: str) -> TensorSig:
    return TensorSig(name, "int64", ("batch", "seq"))


def _vision_plan(spec: M3Spec) -> SubgraphPlan:
    """pixel patches + host-computed RoPE cos/sin and segment ids -> merged features (§4)."""
    assert spec.vision is not None
    v, act = spec.vision, spec.graph_dtype
    rot = 3 * (2 * ((v.head_dim // 3) // 2))  # 3 axes x axis_dim/2 freqs, NeoX-duplicated (§4.3)
    return SubgraphPlan(
        name="vision",
        kind="vision",
        modules=("vision_tower.vision_model", "multi_modal_projector", "patch_merge_mlp"),
        inputs=(
            TensorSig("pixel_values", act, ("patches", v.patch_dim)),
            TensorSig("vision_cos", "float32", ("patches", rot)),
            TensorSig("vision_sin", "float32", ("patches", rot)),
            TensorSig("vision_segment_ids", "int64", ("patches",)),
        ),
        outputs=(TensorSig("image_features", act, ("image_tokens", spec.text.hidden_size)),),
    )


def _text_plan(spec: M3Spec, i: int, start: int, end: int, *, last: bool) -> SubgraphPlan:
    """Text stage i over layers [start, end): stage 0 embeds (and splices the vision features), the
    last one adds norm + lm_head; every stage takes and returns its layers' KV caches (§2.3, §5)."""
    t, act, root = spec.text, spec.graph_dtype, _root(spec)
    modules: list[str] = []
    inputs: list[TensorSig] = []
    if i == 0:
        modules.append(f"{root}model.embed_tokens")
        inputs.append(_ids("input_ids"))
        if spec.is_vl:
            inputs.append(TensorSig("image_features", act, ("image_tokens", t.hidden_size)))
            # The vision subgraph run on the prompt's videos (§4.6), spliced at video placeholders.
            inputs.append(TensorSig("video_features", act, ("video_tokens", t.hidden_size)))
    else:
        inputs.append(boundary_sig(spec, start))
    inputs.append(_ids("position_ids"))
    modules += [f"{root}model.layers.{j}" for j in range(start, end)]
    if last:
        modules += [f"{root}model.norm", f"{root}lm_head"]
        outputs = [TensorSig("logits", act, ("batch", "seq", t.vocab_size))]
        if t.num_mtp_modules:
            outputs.append(TensorSig("final_hidden_states", act, ("batch", "seq", t.hidden_size)))
    else:
        outputs = [boundary_sig(spec, end)]
    for j in range(start, end):
        past, present = cache_sigs(spec, str(j), t.is_sparse_layer(j))
        inputs += past
        outputs += present
    return SubgraphPlan(
        name=f"text_{i}",
        kind="text",
        modules=tuple(modules),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        layers=tuple(range(start, end)),
    )


def _mtp_plan(spec: M3Spec, last_stage: str) -> SubgraphPlan:
    """The MTP depths with their caches; they use the embedding of text_0 and the last stage's lm_head.
    mtp_input_ids[:, i] is the token after position i (input_ids shifted left by one, §3.2); the caller
    supplies it so that decoding can give the real next token at the last position."""
    t, act, root = spec.text, spec.graph_dtype, _root(spec)
    mtp_in = [
        TensorSig("final_hidden_states", act, ("batch", "seq", t.hidden_size)),
        _ids("mtp_input_ids"),
        _ids("position_ids"),
    ]
    if t.num_mtp_modules > 1:  # depth d >= 1 reads d tokens past the chunk (zeros when unknown)
        mtp_in.append(TensorSig("mtp_lookahead_ids", "int64", ("batch", t.num_mtp_modules - 1)))
    mtp_out = [
        TensorSig(f"mtp_logits.{d}", act, ("batch", "seq", t.vocab_size)) for d in range(t.num_mtp_modules)
    ]
    for d in range(t.num_mtp_modules):  # the MTP block is always MSA (§3.1)
        past, present = cache_sigs(spec, f"mtp.{d}", t.uses_sparse_attention)
        mtp_in += past
        mtp_out += present
    return SubgraphPlan(
        name="mtp",
        kind="mtp",
        modules=tuple(f"{root}model.mtp.layers.{d}" for d in range(t.num_mtp_modules)),
        inputs=tuple(mtp_in),
        outputs=tuple(mtp_out),
        shared_uses=((f"{root}model.embed_tokens", "text_0"), (f"{root}lm_head", last_stage)),
    )


def validate_plan(spec: M3Spec, plans: list[SubgraphPlan]) -> None:
    """Contiguous, complete, non-overlapping layers; every module owned once; shared uses resolve."""
    n = spec.text.num_hidden_layers
    layers = [j for p in plans if p.kind == "text" for j in p.layers]
    if layers != list(range(n)):
        raise SpecError(f"pipeline: text stages must cover layers 0..{n - 1} once, in order; got {layers}")
    owned: dict[str, str] = {}
    for p in plans:
        for m in p.modules:
            if m in owned:
                raise SpecError(f"pipeline: module {m} owned by both {owned[m]} and {p.name}")
            owned[m] = p.name
    for p in plans:
        for module, owner in p.shared_uses:
            if owned.get(module) != owner:
                raise SpecError(f"pipeline: {p.name} uses {module} from {owner}, which does not own it")
    for p in plans:  # graph I/O names are unique within a graph (the plan owns them, §5)
        names = p.input_names + p.output_names
        clash = sorted({n for n in names if names.count(n) > 1})
        assert not clash, f"{p.name}: I/O names {clash} are used twice"


def get_pipeline_stage_metas(
    spec: M3Spec, is_first: bool, is_last: bool, microbatch_size: int, seq_len: int
) -> tuple[tuple[TensorSig, ...], tuple[TensorSig, ...]]:
    """Input/output metadata of one text stage with concrete sizes (Automodel's contract, §5)."""
    plans = [p for p in plan_subgraphs(spec) if p.kind == "text"]
    plan = plans[0] if is_first else plans[-1] if is_last else plans[min(1, len(plans) - 1)]
    sizes = {"batch": microbatch_size, "seq": seq_len}

    def concrete(sigs: tuple[TensorSig, ...]) -> tuple[TensorSig, ...]:
        # Automodel's stage metadata calls every stage boundary `hidden_states` (§5).
        return tuple(
            TensorSig(
                "hidden_states" if s.name.startswith(HIDDEN_PREFIX) else s.name,
                s.dtype,
                tuple(sizes.get(d, d) if isinstance(d, str) else d for d in s.dims),
            )
            for s in sigs
            if s.name in ("input_ids", "logits") or s.name.startswith(HIDDEN_PREFIX)
        )

    return concrete(plan.inputs), concrete(plan.outputs)
