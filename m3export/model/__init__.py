"""MiniMax M3 in plain PyTorch: text backbone, MoE, MSA, MTP, vision, checkpoint I/O. Imports torch only.

Files: attention.py (GQA + MSA selection), checkpoint.py / checkpoint_files.py / hf_keys.py / mxfp8.py
(HF safetensors layout: load, save, key mapping, MXFP8), factory.py (the model a spec describes),
init.py (deterministic random init), moe.py (dense MLP, shared expert, routed MoE block), mtp.py (MTP
depths), norm.py (Gemma RMSNorm), rope.py (text RoPE), splice.py (vision features into embeddings),
text.py (decoder layer, text model, causal LM), vision.py / vision_inputs.py (ViT, projector, merger,
host inputs), vl.py (the VL model).

`LAYER_TYPES` and `MOE_TYPE` are the module classes whose outputs parity localisation hooks
(m3export/parity/intermediates.py): imported, not spelled as strings, so a rename cannot silently
switch localisation off.
"""

from m3export.model.moe import SparseMoeBlock
from m3export.model.text import DecoderLayer
from m3export.model.vision import M3VisionEncoderLayer

LAYER_TYPES: tuple[type, ...] = (DecoderLayer, M3VisionEncoderLayer)
MOE_TYPE: type = SparseMoeBlock

__all__ = ["LAYER_TYPES", "MOE_TYPE", "DecoderLayer", "M3VisionEncoderLayer", "SparseMoeBlock"]
