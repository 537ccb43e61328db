"""`m3export generate`: greedy decoding of one prompt through a verified build (m3export/runners/decode.py
does the decoding; this module loads the build, prepares the prompt and opens the backend)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from m3export.artifacts.verify import verify_artifacts
from m3export.runners.decode import GenerateResult, OnToken, generate_tokens
from m3export.runners.registry import get_backend, open_runners
from m3export.runtime.prompt import prepare_inputs
from m3export.spec.memory import require_memory, resident_memory_bytes


def generate_artifacts(
    artifacts: str | os.PathLike,
    backend: str,
    input_ids: str,
    images: Sequence[str | os.PathLike] = (),
    max_new_tokens: int = 32,
    *,
    mtp: bool = False,
    on_token: OnToken | None = None,
    videos: Sequence[str | os.PathLike] = (),
    key: bytes | None = None,
    prefill_chunk: int | None = None,
) -> GenerateResult:
    """The `generate` command: verify the build, prepare the prompt as `run` does, decode greedily."""
    get_backend(backend)
    arts = verify_artifacts(artifacts, key=key)
    inp, _ = prepare_inputs(arts.spec, input_ids, images, videos)
    total = min(int(inp["input_ids"].shape[1]) + max_new_tokens, arts.spec.text.max_position_embeddings)
    require_memory(resident_memory_bytes(arts.spec, total), f"generate up to {total} tokens")
    runners = open_runners(backend, arts.subgraphs, arts.build_info())
    start = time.perf_counter()
    result = generate_tokens(
        arts.spec,
        arts.plans,
        lambda plan, feed: runners[plan.name].infer(feed),
        {k: v.numpy() for k, v in inp.items()},
        max_new_tokens,
        mtp=mtp,
        on_token=on_token,
        prefill_chunk=prefill_chunk,
    )
    result.backend, result.seconds = backend, time.perf_counter() - start
    return result
