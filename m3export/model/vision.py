"""Vision side of M3: CLIP-style ViT with 3-D RoPE, per-patch projector and 2×2 patch merger (§4.2-§4.4).

Module paths give the released checkpoint keys of m3-architecture.md §6.1 relative to the VL root:

    vision_tower.vision_model.embeddings.patch_embedding.weight      M3VisionModel
    vision_tower.vision_model.pre_layrnorm.*
    vision_tower.vision_model.encoder.layers.{l}.*
    multi_modal_projector.linear_{1,2}.*                             M3Projector
    patch_merge_mlp.linear_{1,2}.*                                   M3PatchMerger

`M3VisionTower` holds the three under exactly those names, so its state dict is a slice of the VL
state dict. Every forward takes the host-computed tensors of `vision_inputs.build_vision_inputs`
(RoPE cos/sin, segment ids) as inputs and has no data-dependent Python control flow, so the tower
exports with a dynamic patch count N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3export.errors import SpecError
from m3export.spec.models import M3Spec, MultimodalSpec, VisionSpec


def apply_vision_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX rotate-half over the first cos.shape[-1] channels of x [..., N, head_dim]; the rest pass through.

    cos/sin are [N, R] (R = 3·axis_dim, §4.3). Computed in fp32, returned in x's dtype.
    """
    rot = cos.shape[-1]
    half = rot // 2
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:rot], xf[..., rot:]
    c1, c2, s1, s2 = cos[:, :half], cos[:, half:], sin[:, :half], sin[:, half:]
    # §4.3: y_j = x_j cos a_j − x_{j+R/2} sin a_j ; y_{j+R/2} = x_{j+R/2} cos a_j + x_j sin a_j
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, rest.float()), dim=-1).to(x.dtype)


class M3VisionEmbeddings(nn.Module):
    """Conv3d patch embedding, kernel = stride = (temporal, patch, patch), no bias (§4.2.1)."""

    def __init__(self, vision: VisionSpec) -> None:
        super().__init__()
        kernel = (vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        # Kept as a Conv3d so the parameter has the checkpoint's [hidden, C, T, P, P] layout.
        self.patch_embedding = nn.Conv3d(
            vision.num_channels, vision.hidden_size, kernel, stride=kernel, bias=False
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[N, C·T·P·P] rows in (c, t, y, x) order (§4.1) -> [N, hidden]."""
        w = self.patch_embedding.weight
        # A stride = kernel Conv3d over one patch is a matmul with the flattened kernel (Appendix A).
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1))


class M3VisionAttention(nn.Module):
    """Bidirectional MHA with 3-D RoPE on q and k; attention limited to the patch's own segment (§4.2.3)."""

    def __init__(self, vision: VisionSpec) -> None:
        super().__init__()
        d = vision.hidden_size
        self.num_heads = vision.num_attention_heads
        self.head_dim = vision.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor, mask: Tensor) -> Tensor:
        """x [N, hidden]; mask [N, N] bool (True = may attend)."""
        n = x.shape[0]
        # [1, heads, N, head_dim]: ONNX Attention (opset 23) takes 4-D q/k/v only.
        q, k, v = (
            p(x).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q = apply_vision_rope(q, rope_cos, rope_sin)
        k = apply_vision_rope(k, rope_cos, rope_sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(n, -1))


class M3VisionMLP(nn.Module):
    """fc2(GELU(fc1(x))), exact erf GELU (§4.2.3)."""

    def __init__(self, vision: VisionSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision.hidden_size, vision.intermediate_size)
        self.fc2 = nn.Linear(vision.intermediate_size, vision.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class M3VisionEncoderLayer(nn.Module):
    """CLIP pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)) (§4.2.3)."""

    def __init__(self, vision: VisionSpec) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.self_attn = M3VisionAttention(vision)
        self.layer_norm2 = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.mlp = M3VisionMLP(vision)

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), rope_cos, rope_sin, mask)
        return x + self.mlp(self.layer_norm2(x))


class M3VisionEncoder(nn.Module):
    def __init__(self, vision: VisionSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(M3VisionEncoderLayer(vision) for _ in range(vision.num_hidden_layers))

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, rope_cos, rope_sin, mask)
        return x


class M3VisionTransformer(nn.Module):
    """Patch embed -> pre_layrnorm -> encoder; no post-layernorm (§4.2.4, §10.11)."""

    def __init__(self, vision: VisionSpec) -> None:
        super().__init__()
        self.embeddings = M3VisionEmbeddings(vision)
        self.pre_layrnorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)  # sic, §4.2.2
        self.encoder = M3VisionEncoder(vision)

    def forward(
        self, pixel_values: Tensor, rope_cos: Tensor, rope_sin: Tensor, segment_ids: Tensor
    ) -> Tensor:
        """pixel_values [N, C·T·P·P], rope_cos/sin [N, R], segment_ids [N] -> [N, hidden]."""
        # Block-diagonal mask: each image / video segment attends only to itself (§4.2.5, §10.7).
        # Dense [N, N]: simple to export; a varlen attention plugin would avoid the N² memory.
        mask = segment_ids[:, None] == segment_ids[None, :]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(x, rope_cos, rope_sin, mask)


class M3VisionModel(nn.Module):
    """Holds the ViT at `vision_model`, the checkpoint's `vision_tower.vision_model.*` (§6.1)."""

    def __init__(self, vision: VisionSpec) -> None:
        super().__init__()
        self.vision_model = M3VisionTransformer(vision)

    def forward(
        self, pixel_values: Tensor, rope_cos: Tensor, rope_sin: Tensor, segment_ids: Tensor
    ) -> Tensor:
        return self.vision_model(pixel_values, rope_cos, rope_sin, segment_ids)


class M3Projector(nn.Module):
    """Per-patch GELU MLP, vision hidden -> text hidden, applied before merging (§4.4.1)."""

    def __init__(self, vision_hidden_size: int, projector_hidden_size: int, text_hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, projector_hidden_size)
        self.linear_2 = nn.Linear(projector_hidden_size, text_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class M3PatchMerger(nn.Module):
    """Concatenate each merge window of merge² consecutive rows (§4.1 order), then a GELU MLP (§4.4.2)."""

    def __init__(self, text_hidden_size: int, projector_hidden_size: int, merge_size: int) -> None:
        super().__init__()
        self.window = merge_size**2
        self.linear_1 = nn.Linear(self.window * text_hidden_size, projector_hidden_size)
        self.linear_2 = nn.Linear(projector_hidden_size, text_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, text_hidden] -> [N / merge², text_hidden]."""
        x = x.reshape(-1, self.window * x.shape[-1])
        return self.linear_2(F.gelu(self.linear_1(x)))


class M3VisionTower(nn.Module):
    """ViT + projector + merger under their §6.1 names: pixels -> text-space tokens [N / merge², text_hidden]."""

    def __init__(self, vision: VisionSpec, multimodal: MultimodalSpec, text_hidden_size: int) -> None:
        super().__init__()
        ph = multimodal.projector_hidden_size
        self.vision_tower = M3VisionModel(vision)
        self.multi_modal_projector = M3Projector(vision.hidden_size, ph, text_hidden_size)
        self.patch_merge_mlp = M3PatchMerger(text_hidden_size, ph, vision.spatial_merge_size)

    @classmethod
    def from_spec(cls, spec: M3Spec) -> M3VisionTower:
        if spec.vision is None or spec.multimodal is None:
            raise SpecError(f"spec {spec.name!r} has no `vision` / `multimodal` section: not a VL variant")
        return cls(spec.vision, spec.multimodal, spec.text.hidden_size)

    def forward(
        self, pixel_values: Tensor, rope_cos: Tensor, rope_sin: Tensor, segment_ids: Tensor
    ) -> Tensor:
        """Inputs as `M3VisionTransformer.forward`; N must be a multiple of merge² (whole windows)."""
        features = self.vision_tower(pixel_values, rope_cos, rope_sin, segment_ids)
        return self.patch_merge_mlp(self.multi_modal_projector(features))
