"""The eager model a spec describes: VL or text-only, random weights or its checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from m3export.model.text import M3ForCausalLM
from m3export.model.vl import M3ForConditionalGeneration
from m3export.spec import M3Spec


def load_model(spec: M3Spec) -> nn.Module:
    """`M3ForConditionalGeneration` for a VL spec, else `M3ForCausalLM`; from the spec's checkpoint when
    it names one, else the deterministic random init of its seed (m3export/model/init.py)."""

    cls = M3ForConditionalGeneration if spec.is_vl else M3ForCausalLM
    if spec.weights.checkpoint is not None:
        return cls.from_pretrained(spec)
    return cls.from_config(spec)


class Weights:
    """The tensors of a model built on the meta device, materialised module by module from where the
    spec says they come from: its checkpoint (validated once against the whole model, then read one
    tensor at a time, MXFP8 dequantised per tensor) or its random init (each tensor drawn from a
    generator seeded by (seed, its name), so any subset has the values the whole model would).

    `materialise(modules)` allocates and fills the meta tensors under those module paths (the stage
    plan's, e.g. `language_model.model.layers.3`); `release(modules)` returns them to the meta device,
    freeing their memory. Never more than what is materialised is resident.

    Tensors are filled in fp32 (random weights rounded to the storage `dtype`), then cast to the graph
    precision (export.precision.dtype, the fp32-kept router and bias excepted: model/moe.py; routed
    experts quantised and dequantised with export.precision.experts int8 / int4); with
    `fp32=True` they stay fp32 (the reference a reduced-precision build is compared against) until
    `to_graph_dtype` casts them in place, one tensor at a time.
    """

    def __init__(self, spec: M3Spec) -> None:
        from m3export.model.checkpoint import CheckpointSource

        self.spec = spec
        self.model = empty_model(spec)
        self.vl = spec.is_vl
        self.checkpoint = (
            CheckpointSource(self.model, spec.weights.checkpoint) if spec.weights.checkpoint else None
        )

    def materialise(self, modules: Sequence[str], fp32: bool = False) -> None:
        todo = [m for m in dict.fromkeys(modules) if _is_meta(self.model.get_submodule(m))]
        if not todo:
            return
        for m in todo:
            self.model.get_submodule(m).to_empty(device="cpu").float()
        if self.checkpoint is not None:
            self.checkpoint.fill(todo)
        else:
            from m3export.model.init import round_to_storage

            self._init(todo)
            for m in todo:
                round_to_storage(self.model.get_submodule(m), self.spec)
        if not fp32:
            self.to_graph_dtype(todo)

    def to_graph_dtype(self, modules: Sequence[str]) -> None:
        """Materialised modules in the graph precision (a no-op for a float32 build): cast to
        export.precision.dtype, the routed experts then quantised as export.precision.experts says."""
        from m3export.model.init import to_graph_precision

        for m in dict.fromkeys(modules):
            to_graph_precision(self.model.get_submodule(m), self.spec)

    def release(self, modules: Sequence[str]) -> None:
        for m in dict.fromkeys(modules):
            self.model.get_submodule(m).to("meta")

    def materialised_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values() if not t.is_meta)

    def _init(self, modules: list[str]) -> None:
        from m3export.model.init import init_weights
        from m3export.model.vl import M3ForConditionalGeneration, init_vision_weights

        seed = self.spec.weights.random.seed if self.spec.weights.random is not None else 0
        root = "language_model." if self.vl else ""
        text = tuple(m.removeprefix(root) for m in modules if m.startswith(root) or not self.vl)
        lm = getattr(self.model, "language_model", self.model)
        if text:
            init_weights(lm, seed, only=text)
        roots = M3ForConditionalGeneration.VISION_ROOTS
        vision = tuple(m + "." for m in modules if self.vl and (m + ".").startswith(roots))
        if vision:
            init_vision_weights(self.model, seed, vision)


def empty_model(spec: M3Spec) -> nn.Module:
    """The model a spec describes on the meta device (no memory), in the spec's dtype."""
    from m3export.model.text import M3ForCausalLM
    from m3export.model.vl import M3ForConditionalGeneration

    cls = M3ForConditionalGeneration if spec.is_vl else M3ForCausalLM
    return cls.from_config(spec, device="meta").eval()


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])
