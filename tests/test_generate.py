"""Greedy generation through the KV cache: ORT == eager torch == transformers' generate, and MTP
speculative decoding == plain greedy (m3-architecture.md §2.3-2.4, §3.4). CPU, tiny spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clihelp import run_cli
from PIL import Image

from m3export.model.checkpoint import save_checkpoint
from m3export.model.init import make_mtp_agree
from m3export.model.text import M3ForCausalLM
from m3export.model.vl import M3ForConditionalGeneration
from m3export.runners.decode import generate_tokens
from m3export.runners.torch_runner import TorchRunner
from m3export.runtime.generate import generate_artifacts
from m3export.runtime.prompt import prepare_prompt
from m3export.spec import M3Spec
from m3export.split.plan import plan_subgraphs
from m3export.split.subgraphs import build_stage

NEW = 48
# 30 prompt tokens + 48 new: decode queries reach position 77 and see 10 blocks of 8, of which MSA
# keeps 2 per KV group (tiny spec: block 8, top-2), so decode drops blocks from the first step on.
TEXT = ",".join(str(3 + (37 * i) % 900) for i in range(30))


def _prompt(spec: M3Spec, tmp_path: Path, with_image: bool) -> tuple[str, list[Path]]:
    if not with_image:
        return TEXT, []
    assert spec.multimodal is not None
    rng = np.random.default_rng(1)
    path = tmp_path / "img.png"
    Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8)).save(path)
    ids = TEXT.split(",")
    return ",".join([*ids[:5], str(spec.multimodal.image_token_index), *ids[5:24]]), [path]


@pytest.fixture(scope="module")
def hf_model(tiny_spec: M3Spec, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """transformers' model on the build's weights (the spec's random seed), eager attention."""
    transformers = pytest.importorskip("transformers")
    path = save_checkpoint(
        M3ForConditionalGeneration.from_config(tiny_spec), tiny_spec, tmp_path_factory.mktemp("hf")
    )
    model = transformers.MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def _hf_generate(hf: Any, spec: M3Spec, ids: str, images: list[Path]) -> list[int]:
    prompt = prepare_prompt(spec, [int(t) for t in ids.split(",")], images)
    expanded, px = prompt.ids, prompt.images
    kwargs = {} if px is None else {"pixel_values": px.pixel_values, "image_grid_thw": px.grid_thw}
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([expanded]),
            **kwargs,
            max_new_tokens=NEW,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=spec.text.eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(expanded) :].tolist()


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_greedy_ort_torch_transformers_agree(
    tiny_build: Path, tiny_spec: M3Spec, hf_model: Any, tmp_path: Path, with_image: bool
) -> None:
    ids, images = _prompt(tiny_spec, tmp_path, with_image)
    streamed: list[int] = []
    ort = generate_artifacts(tiny_build, "ort", ids, images, NEW, on_token=streamed.append)
    eager = generate_artifacts(tiny_build, "torch", ids, images, NEW)
    hf = _hf_generate(hf_model, tiny_spec, ids, images)
    print(f"{'image' if with_image else 'text'}: prompt {ort.prompt_len}, ort {ort.tokens}")
    assert streamed == ort.tokens
    assert ort.tokens == eager.tokens == hf
    assert len(ort.tokens) == NEW or ort.stop_reason == "eos"
    assert ort.main_forwards == len(ort.tokens)  # one prefill, then one call per token
    assert len(set(ort.tokens)) > 5  # not a degenerate repetition that any bug would also produce


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_mtp_speculative_equals_plain(
    tiny_build: Path, tiny_spec: M3Spec, tmp_path: Path, with_image: bool
) -> None:
    ids, images = _prompt(tiny_spec, tmp_path, with_image)
    plain = generate_artifacts(tiny_build, "ort", ids, images, NEW)
    spec = generate_artifacts(tiny_build, "ort", ids, images, NEW, mtp=True)
    print(f"MTP acceptance {spec.accepted}/{spec.drafted}, {spec.tokens_per_forward:.2f} tokens/forward")
    assert spec.tokens == plain.tokens
    assert spec.drafted > 0 and spec.acceptance_rate is not None


def test_mtp_with_an_agreeing_head_accepts_every_draft(tiny_text_spec: M3Spec) -> None:
    model = M3ForCausalLM.from_config(tiny_text_spec, seed=5)
    make_mtp_agree(model)
    plans = plan_subgraphs(tiny_text_spec)
    runners = {p.name: TorchRunner.for_plan(build_stage(model, p), p) for p in plans}

    def run(plan: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return runners[plan.name].infer(feed)

    prompt = {"input_ids": np.array([[5, 9, 77, 300, 12]]), "position_ids": np.arange(5)[None]}
    plain = generate_tokens(tiny_text_spec, plans, run, prompt, 24)
    spec = generate_tokens(tiny_text_spec, plans, run, prompt, 24, mtp=True)
    assert spec.tokens == plain.tokens
    assert spec.acceptance_rate == 1.0
    assert spec.main_forwards == 1 + (len(spec.tokens) - 1 + 1) // 2  # 2 tokens per verify forward


def test_generate_cli_streams_tokens(tiny_build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", str(tiny_build), "--input-ids", TEXT, "--max-new-tokens", "5", "--mtp"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert len(stdout.split()) == 5 and all(t.isdigit() for t in stdout.split())
    assert "MTP acceptance" in stderr and "main forwards" in stderr


def test_chunked_prefill_of_a_long_prompt_generates_the_one_call_tokens(
    tiny_build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 4000-token prompt (MSA drops all but 2 blocks of 8 per query) prefilled in chunks of 1000
    through the cache, with MTP drafting from every prompt position: the same tokens as one call;
    stderr reports the prefill time and the decode rate (issue #15)."""
    ids = ",".join(str(3 + (i * 7919) % 1000) for i in range(4000))
    base = ["generate", str(tiny_build), "--input-ids", ids, "--max-new-tokens", "6", "--mtp"]
    code, whole, err_whole = run_cli(base, capsys)
    assert code == 0, err_whole
    code, chunked, err = run_cli([*base, "--prefill-chunk", "1000"], capsys)
    assert code == 0, err
    assert chunked.split() == whole.split() and len(whole.split()) == 6
    assert "prefill of 4000 tokens" in err and "tokens/s" in err
    code, _, err = run_cli([*base, "--prefill-chunk", "0"], capsys)
    assert code == 2 and "--prefill-chunk must be >= 1" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--backend", "cuda"], "--backend must be one of"),
        (["--input-ids", "5,99999"], "outside the vocabulary"),
    ],
)
def test_generate_bad_input_is_one_line(
    tiny_build: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = ["generate", str(tiny_build), "--input-ids", "5,6,7"]
    code, _, stderr = run_cli(base + args, capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr


def test_prompt_longer_than_the_spec_maximum(tiny_text_spec: M3Spec) -> None:
    from m3export.errors import InputError

    limit = tiny_text_spec.text.max_position_embeddings
    prompt = {"input_ids": np.zeros((1, limit + 1), np.int64), "position_ids": np.arange(limit + 1)[None]}
    with pytest.raises(InputError, match="maximum length"):
        generate_tokens(tiny_text_spec, plan_subgraphs(tiny_text_spec), lambda p, f: {}, prompt, 4)


# ------------------------------------------------------------------ placeholder ids (issue #11 item 10)


def test_a_placeholder_id_as_a_decode_token_is_embedded_like_transformers(
    tiny_build: Path, tiny_spec: M3Spec, hf_model: Any
) -> None:
    """A token equal to the image (or video) placeholder id fed after the prompt, with no pixels, is
    embedded as an ordinary token, as transformers does (its splice runs only when pixels are given);
    the ORT chain's decode step must give transformers' logits, not crash."""
    from m3export.artifacts.verify import verify_artifacts
    from m3export.runners.chain import run_chain
    from m3export.runners.registry import open_runners
    from m3export.runtime.prompt import prepare_inputs

    assert tiny_spec.multimodal is not None
    arts = verify_artifacts(tiny_build)
    runners = open_runners("ort", arts.subgraphs, arts.build_info())
    inp, _ = prepare_inputs(tiny_spec, TEXT)
    prompt = {k: v.numpy() for k, v in inp.items()}
    run = lambda plan, feed: runners[plan.name].infer(feed)  # noqa: E731
    first = run_chain(arts.plans, prompt, run, hidden_size=tiny_spec.text.hidden_size)
    seq = prompt["input_ids"].shape[1]
    for token in (tiny_spec.multimodal.image_token_index, tiny_spec.multimodal.video_token_index):
        step = {"input_ids": np.array([[token]]), "position_ids": np.array([[seq]])}
        got = run_chain(arts.plans, step, run, first.cache, hidden_size=tiny_spec.text.hidden_size)
        ids = torch.cat([inp["input_ids"], torch.tensor([[token]])], dim=1)
        with torch.no_grad():
            want = hf_model(input_ids=ids).logits[0, -1].numpy()
        np.testing.assert_allclose(got.values["logits"][0, -1], want, atol=2e-5)


def test_mtp_drafting_the_placeholder_id_matches_plain_greedy(tiny_build: Path, tiny_spec: M3Spec) -> None:
    """The red-team prompt drafted the image placeholder id and crashed in ScatterND; every draft
    forced to the placeholder id must still give exactly the plain greedy tokens."""
    from m3export.artifacts.verify import verify_artifacts
    from m3export.runners.registry import open_runners
    from m3export.runtime.prompt import prepare_inputs

    assert tiny_spec.multimodal is not None
    image_id = tiny_spec.multimodal.image_token_index
    arts = verify_artifacts(tiny_build)
    runners = open_runners("ort", arts.subgraphs, arts.build_info())

    def run(plan: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = runners[plan.name].infer(feed)
        if plan.kind == "mtp":  # every draft is the placeholder id
            out["mtp_logits.0"] = (
                np.where(np.arange(out["mtp_logits.0"].shape[-1]) == image_id, 1e9, 0.0)[None, None]
                .repeat(out["mtp_logits.0"].shape[1], 1)
                .astype(np.float32)
            )
        return out

    inp, _ = prepare_inputs(tiny_spec, "456,889,536,269")
    prompt = {k: v.numpy() for k, v in inp.items()}
    plain = generate_tokens(arts.spec, arts.plans, run, prompt, 32)
    spec_dec = generate_tokens(arts.spec, arts.plans, run, prompt, 32, mtp=True)
    assert spec_dec.drafted > 0 and spec_dec.tokens == plain.tokens


def test_red_team_prompt_generates_with_mtp(tiny_build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        ["generate", str(tiny_build), "--input-ids", "456,889,536,269", "--mtp", "--max-new-tokens", "32"],
        capsys,
    )
    assert code == 0 and "Traceback" not in err, err
    assert len(out.split()) == 32
