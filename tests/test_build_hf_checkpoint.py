"""`build` on a checkpoint written by transformers (random weights): the gate passes, and the chained
ORT subgraphs reproduce transformers' own logits for a text + image prompt (MSA dropping blocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from test_vl_parity import _hf_load, _randomise_hf

from m3export.build.driver import build
from m3export.parity import compare_outputs
from m3export.runtime.prompt import prepare_inputs
from m3export.runtime.run import run_artifacts
from m3export.spec import M3Spec, dump_spec, from_hf_config, parse_spec, to_hf_config


def test_build_on_transformers_checkpoint_matches_transformers(tiny_spec: M3Spec, tmp_path: Path) -> None:
    cfg = {k: v for k, v in to_hf_config(tiny_spec).items() if k != "architectures"}
    hf = transformers.MiniMaxM3SparseForConditionalGeneration(transformers.MiniMaxM3VLConfig(**cfg)).eval()
    _randomise_hf(hf, seed=5)
    ckpt = tmp_path / "hf-ckpt"
    hf.save_pretrained(ckpt)
    hf, _ = _hf_load(ckpt)

    # The spec comes from transformers' config.json (`spec from-hf`); pipeline and tolerances from tiny.
    data = dump_spec(from_hf_config(ckpt, name="hf-tiny"))
    data["pipeline"] = dump_spec(tiny_spec)["pipeline"]
    data["tolerances"] = dump_spec(tiny_spec)["tolerances"]
    spec = parse_spec(data)
    assert spec.weights.checkpoint == ckpt and spec.text.num_mtp_modules == 0  # transformers writes no MTP

    result = build(spec, tmp_path / "out")
    assert result.passed, result.failed_subjects()

    assert spec.multimodal is not None
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((70, 120, 3)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    ids = ",".join(map(str, [*range(3, 20), spec.multimodal.image_token_index, *range(30, 60)]))
    ort = run_artifacts(result.out_dir, "ort", ids, [tmp_path / "img.png"])
    inp, _ = prepare_inputs(spec, ids, [tmp_path / "img.png"])
    assert inp["input_ids"].shape[1] > 2 * 2 * 8  # MSA (top-2 blocks of 8) drops blocks at this length

    # transformers' own forward on the same preprocessed pixels (grid from the same preprocessing).
    from m3export.runtime.media import preprocess_images

    px = preprocess_images([tmp_path / "img.png"], spec.vision)
    with torch.no_grad():
        ref = hf(
            input_ids=inp["input_ids"],
            pixel_values=px.pixel_values,
            image_grid_thw=torch.as_tensor(px.grid_thw),
        )
    tol = spec.tolerances.end_to_end
    assert tol is not None
    rep = compare_outputs(
        "end_to_end",
        "transformers",
        "image",
        {"logits": ort.logits},
        {"logits": ref.logits.numpy()},
        tol,
        {"logits": "logits"},
    )
    assert rep.passed, rep.failures()
    print(f"ORT vs transformers: max abs {rep.outputs[0].max_abs:.3g}")
    assert rep.outputs[0].max_abs > 0  # a real comparison of two independent implementations
