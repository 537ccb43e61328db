"""M3 vision-language model: text backbone + vision tower, projector and merger (m3-architecture.md §4.5).

The root children are exactly the §6.1 checkpoint roots, so the state dict is the released VL layout
(stacked experts aside, docs/design.md) and `checkpoint.save_checkpoint` / `load_checkpoint` need no
key mapping beyond the text model's:

    language_model.*          M3ForCausalLM (`language_model.model.*`, `language_model.lm_head.*`)
    vision_tower.vision_model.*, multi_modal_projector.*, patch_merge_mlp.*   from M3VisionTower

`forward` is the eager entry point and does the host-side work (grid validation, vision RoPE and
segment ids, placeholder counting); `vision_features` and `embed_and_splice` are the traceable parts
and take those host tensors as inputs, as the exported vision and stage-0 subgraphs do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from m3export.errors import InputError, SpecError
from m3export.model.checkpoint import load_checkpoint, resolve_pretrained
from m3export.model.init import init_weights, to_spec_dtypes
from m3export.model.moe import quantise_experts
from m3export.model.splice import count_placeholders, splice_features
from m3export.model.text import M3CausalLMOutput, M3ForCausalLM
from m3export.model.vision import M3VisionTower
from m3export.model.vision_inputs import GridLike, build_vision_inputs
from m3export.spec.models import M3Spec

# Vision init (§7 leaves it open): weights N(0, 1/fan_in) keep features O(1), like the N(0, 1) token
# embeddings they replace; LayerNorm weights 1 + N(0, 0.1²) and biases N(0, 0.1²) so that no tensor can
# hide behind a 0 or a 1 in a parity test.
VISION_NORM_STD = 0.1
VISION_BIAS_STD = 0.1


def _vl_spec(spec: M3Spec) -> M3Spec:
    if not spec.is_vl:
        raise SpecError(
            f"spec {spec.name!r} has no `vision` / `multimodal` section: not a VL variant (use M3ForCausalLM)"
        )
    return spec


@torch.no_grad()
def init_vision_weights(model: nn.Module, seed: int, prefixes: tuple[str, ...]) -> None:
    """Fill every parameter under `prefixes` from a generator seeded by (seed, parameter name)."""
    for name, p in model.named_parameters():
        if not name.startswith(prefixes):
            continue
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        noise = torch.randn(p.shape, generator=g)
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, nn.LayerNorm) and name.endswith(".weight"):
            p.copy_(1.0 + VISION_NORM_STD * noise)
        elif name.endswith(".bias"):
            p.copy_(VISION_BIAS_STD * noise)
        else:  # Linear [out, in] or Conv3d [out, C, T, P, P]: fan_in = every dim but the first
            p.copy_(noise * p[0].numel() ** -0.5)


class M3ForConditionalGeneration(nn.Module):
    """M3 VL: token embeddings with image / video features spliced in at placeholder ids, then the text model."""

    VISION_ROOTS = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")

    def __init__(self, spec: M3Spec) -> None:
        super().__init__()
        spec = _vl_spec(spec)
        assert spec.vision is not None and spec.multimodal is not None
        self.vision = spec.vision
        self.multimodal = spec.multimodal
        self.language_model = M3ForCausalLM(spec.text)
        tower = M3VisionTower.from_spec(spec)
        # The tower's three children sit at the root under their §6.1 names.
        self.vision_tower = tower.vision_tower
        self.multi_modal_projector = tower.multi_modal_projector
        self.patch_merge_mlp = tower.patch_merge_mlp

    @classmethod
    def from_config(
        cls, spec: M3Spec, device: str | torch.device | None = None, *, seed: int | None = None
    ) -> M3ForConditionalGeneration:
        """Build in the spec's dtype; random init from `seed`, else `spec.weights.random.seed`, else 0.
        The text weights equal `M3ForCausalLM.from_config(spec, seed=seed)`'s. On "meta" nothing is set."""
        device = torch.device(device or "cpu")
        with device:
            model = cls(spec)
        if device.type != "meta":
            if seed is None:
                seed = spec.weights.random.seed if spec.weights.random is not None else 0
            init_weights(model.language_model, seed)
            init_vision_weights(model, seed, cls.VISION_ROOTS)
        to_spec_dtypes(model, spec, random=device.type != "meta")
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | M3Spec,
        *,
        spec: M3Spec | None = None,
        device: str | torch.device | None = None,
    ) -> M3ForConditionalGeneration:
        """Load a VL HF-layout checkpoint directory (§6.1). `source` is the directory, or a spec whose
        `weights.checkpoint` names it; `spec` overrides the architecture read from config.json."""

        spec, path = resolve_pretrained(source, spec)
        model = cls.from_config(_vl_spec(spec), device="meta").to_empty(device=device or "cpu")
        load_checkpoint(model, path)
        quantise_experts(model, spec.export.precision)
        return model.eval()

    # ------------------------------------------------------------------------------ traceable parts

    def vision_features(
        self, pixel_values: Tensor, rope_cos: Tensor, rope_sin: Tensor, segment_ids: Tensor
    ) -> Tensor:
        """pixel_values [N, C·T·P·P] + host inputs (`build_vision_inputs`) -> text-space tokens [N / merge², H]."""
        features = self.vision_tower(pixel_values, rope_cos, rope_sin, segment_ids)
        return self.patch_merge_mlp(self.multi_modal_projector(features))

    def embed_and_splice(
        self,
        input_ids: Tensor,
        image_features: Tensor | None = None,
        video_features: Tensor | None = None,
    ) -> Tensor:
        """embed_tokens(input_ids) [B, S, H] with features written at the placeholder positions (§4.5)."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_features is not None:
            embeds = splice_features(embeds, input_ids, image_features, self.multimodal.image_token_index)
        if video_features is not None:
            embeds = splice_features(embeds, input_ids, video_features, self.multimodal.video_token_index)
        return embeds

    # ------------------------------------------------------------------------------ eager forward

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_grid_thw: GridLike | None = None,
        position_ids: Tensor | None = None,
        *,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: GridLike | None = None,
    ) -> M3CausalLMOutput:
        """input_ids [B, S] with one placeholder per merged vision token; pixel_values [N, C·T·P·P] and
        image_grid_thw [M, 3] for the images (and likewise for videos), in flattened batch-major order.
        Positions are plain 1-D (default arange(S)); MTP embeds the shifted input_ids as the text model does.
        """
        self._check_ids(input_ids)
        mm = self.multimodal
        image = self._media_features("image", input_ids, pixel_values, image_grid_thw, mm.image_token_index)
        video = self._media_features(
            "video", input_ids, pixel_values_videos, video_grid_thw, mm.video_token_index
        )
        embeds = self.embed_and_splice(input_ids, image, video)
        lm = self.language_model
        out = lm.model(inputs_embeds=embeds, position_ids=position_ids)
        hidden = out.hidden_states
        mtp = None
        if lm.model.text.num_mtp_modules:
            mtp = lm.model.mtp_logits(hidden, input_ids, lm.lm_head, position_ids)
        return M3CausalLMOutput(lm.lm_head(hidden), mtp, hidden, out.past_key_values)

    def _check_ids(self, input_ids: Tensor) -> None:
        vocab = self.language_model.model.text.vocab_size
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise InputError(
                f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {list(input_ids.shape)}"
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise InputError(
                f"input_ids must lie in [0, {vocab}) (vocab_size), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    def _media_features(
        self,
        kind: str,
        input_ids: Tensor,
        pixels: Tensor | None,
        grid_thw: GridLike | None,
        token_id: int,
    ) -> Tensor | None:
        """Host checks and inputs for one modality, then the tower; None when it has no pixels."""
        found = count_placeholders(input_ids, token_id)
        if pixels is None:
            if grid_thw is not None:
                raise InputError(f"{kind}_grid_thw given without {kind} pixel values")
            if found:
                raise InputError(
                    f"input_ids hold {found} {kind} placeholder(s) (id {token_id}) but no {kind} was given"
                )
            return None
        if grid_thw is None:
            raise InputError(f"{kind} pixel values given without {kind}_grid_thw")
        if pixels.ndim != 2 or pixels.shape[1] != self.vision.patch_dim:
            raise InputError(
                f"{kind} pixel values must be [num_patches, {self.vision.patch_dim}] "
                f"(C·T·P·P), got {list(pixels.shape)}"
            )
        vi = build_vision_inputs(grid_thw, self.vision, num_patches=pixels.shape[0])
        want = sum(vi.num_tokens)
        if found != want:
            raise InputError(
                f"input_ids hold {found} {kind} placeholder(s) (id {token_id}) but {kind}_grid_thw "
                f"{[list(g) for g in vi.grid_thw]} gives {want} features (t·h·w/{self.vision.spatial_merge_size**2} "
                f"per item); expand each {kind} placeholder to its feature count"
            )
        dev = pixels.device
        return self.vision_features(pixels, vi.rope_cos.to(dev), vi.rope_sin.to(dev), vi.segment_ids.to(dev))
