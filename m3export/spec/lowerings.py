"""The MoE lowerings a spec may name for its ONNX Runtime graphs (`export.moe`).

The spec layer imports nothing above it, so the names live here: the built-in ones below, and every
lowering registered at run time (`m3export.ops.lowering.register_lowering`, e.g. from a plugin
package) declares its name here too, so a spec can select it once it is registered.
"""

from __future__ import annotations

# Built-in lowerings whose graphs ONNX Runtime runs (the `trt` lowering's plugin nodes it cannot).
_ORT_LOWERINGS: set[str] = {"ort", "portable"}


def declare_lowering(name: str) -> None:
    """Make `name` a valid `export.moe` (called when an ORT-runnable lowering is registered)."""
    _ORT_LOWERINGS.add(name)


def ort_lowering_names() -> list[str]:
    return sorted(_ORT_LOWERINGS)
