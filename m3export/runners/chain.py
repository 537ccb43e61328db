"""Run planned subgraphs in order with any runner, carrying the KV cache between calls.

One function serves the build's parity steps, `run` and `generate`: each subgraph is fed by name from
the given inputs, the cache and the outputs of earlier subgraphs. `present.*` outputs become the next
call's `past.*` inputs (key slot j holds position j, m3-architecture.md §2.3-2.4).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from m3export.errors import ArtifactError
from m3export.split.inputs import media_feed
from m3export.split.plan import KINDS, SubgraphPlan

Run = Callable[[SubgraphPlan, dict[str, np.ndarray]], dict[str, np.ndarray]]
Cache = dict[str, np.ndarray]  # "past.{layer}.{key|value|index_key}" -> array


@dataclass(frozen=True)
class ChainResult:
    """Every input and produced value, the feed each subgraph got, and the cache after this call."""

    values: dict[str, np.ndarray]
    feeds: dict[str, dict[str, np.ndarray]]
    cache: Cache


def empty_cache(plans: Sequence[SubgraphPlan], batch: int) -> Cache:
    """Zero-length `past.*` arrays (past_seq 0) for every cache input of `plans`."""
    cache: Cache = {}
    for plan in plans:
        for sig in plan.cache_inputs:
            sizes = {"batch": batch, "past_seq": 0}
            shape = [d if isinstance(d, int) else sizes[d] for d in sig.dims]
            cache[sig.name] = np.zeros(shape, np.float32)
    return cache


def cache_length(cache: Cache) -> int:
    """Number of cached positions (0 for an empty cache)."""
    return next((v.shape[2] for k, v in cache.items() if k.endswith(".key")), 0)


def truncate_cache(cache: Cache, length: int) -> Cache:
    """The cache of the first `length` positions (speculative decoding's rollback)."""
    return {k: v[:, :, :length] if v.ndim == 4 else v[:, :length] for k, v in cache.items()}


def shift_left(ids: np.ndarray) -> np.ndarray:
    """ids [B, S] shifted left by one, the tail filled with token 0: MTP's training-time next ids (§3.2)."""
    return np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)


def mtp_lookahead(plans: Sequence[SubgraphPlan]) -> int:
    """D - 1: how many tokens past a chunk the MTP subgraph's deeper depths read (0 without MTP)."""
    for plan in plans:
        for sig in plan.inputs:
            if sig.name == "mtp_lookahead_ids":
                assert isinstance(sig.dims[1], int)
                return sig.dims[1]
    return 0


VIDEO_INPUTS = {  # vision subgraph input -> the prompt's video input of the same role
    "pixel_values": "pixel_values_videos",
    "vision_cos": "video_cos",
    "vision_sin": "video_sin",
    "vision_segment_ids": "video_segment_ids",
}


def _vision_feeds(values: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The vision subgraph's feed for the prompt's images and for its videos, where present."""
    feeds = {}
    if "pixel_values" in values:
        feeds["image"] = {n: values[n] for n in VIDEO_INPUTS}
    if "pixel_values_videos" in values:
        feeds["video"] = {n: values[v] for n, v in VIDEO_INPUTS.items()}
    return feeds


class ChainError(ArtifactError):
    """A subgraph's graph does not produce exactly its planned outputs (or lacks a planned input):
    the chain refuses to go on rather than forward a stale value."""


def checked_outputs(plan: SubgraphPlan, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`outputs` if they are exactly the plan's outputs; ChainError naming the difference otherwise."""
    want = plan.output_names
    missing = [n for n in want if n not in outputs]
    unplanned = sorted(set(outputs) - set(want))
    if missing or unplanned:
        raise ChainError(
            f"subgraph {plan.name}: its graph produced {sorted(outputs)}, the plan declares {want} "
            f"(missing {missing}, unplanned {unplanned}); rebuild the artifacts"
        )
    return outputs


def run_chain(
    plans: Sequence[SubgraphPlan],
    inputs: dict[str, np.ndarray],
    run: Run,
    cache: Cache | None = None,
    *,
    hidden_size: int,
) -> ChainResult:
    """Run `plans` in order on `inputs` (input_ids, position_ids, vision inputs, optional
    mtp_input_ids). Without a cache the chain starts from past_seq 0. The vision subgraph runs on the
    images (`pixel_values`, ...) and on the videos (`pixel_values_videos`, `video_cos`, ...) when
    given; stage 0 gets [0, H] features for what is absent. Without `mtp_input_ids`, MTP gets
    shift_left(input_ids) (a prompt forward, training semantics)."""
    ids = inputs["input_ids"]
    values = dict(inputs)
    values.update(cache if cache is not None else empty_cache(plans, ids.shape[0]))
    values.setdefault("mtp_input_ids", shift_left(ids))
    values.setdefault("mtp_lookahead_ids", np.zeros((ids.shape[0], mtp_lookahead(plans)), np.int64))
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for plan in plans:
        if KINDS[plan.kind].per_media:  # the vision subgraph: once for the images, once for the videos (§4.6)
            for media, feed in _vision_feeds(values).items():
                name = media_feed(plan.name, media)
                feeds[name] = feed
                values[f"{media}_features"] = checked_outputs(plan, run(plan, feed))["image_features"]
            for media in ("image", "video"):
                values.setdefault(f"{media}_features", np.zeros((0, hidden_size), np.float32))
            continue
        missing = [n for n in plan.input_names if n not in values]
        if missing:
            raise ChainError(
                f"subgraph {plan.name}: planned inputs {missing} are produced by no earlier subgraph"
            )
        feed = {n: values[n] for n in plan.input_names}
        feeds[plan.name] = feed
        values.update(checked_outputs(plan, run(plan, feed)))
    new_cache = {"past." + k[len("present.") :]: v for k, v in values.items() if k.startswith("present.")}
    return ChainResult(values, feeds, new_cache)


def chunk_inputs(
    plans: Sequence[SubgraphPlan], inputs: dict[str, np.ndarray], bounds: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """A prompt's inputs as chunks [0, b0), [b0, b1), ..., [b_last, S): ids and positions sliced, MTP's
    next ids (the prompt's shift_left(input_ids)) sliced with the tokens deeper depths read past each
    chunk, and the vision inputs with the first chunk (which must hold every placeholder)."""
    ids = inputs["input_ids"]
    seq = ids.shape[1]
    edges = [0, *bounds, seq]
    assert all(a < b for a, b in itertools.pairwise(edges)), edges
    next_ids = inputs.get("mtp_input_ids", shift_left(ids))
    ahead = mtp_lookahead(plans)
    padded = np.concatenate([next_ids, np.zeros((ids.shape[0], ahead), np.int64)], axis=1)
    per_seq = {"input_ids", "position_ids"}
    chunks = []
    for i, (a, b) in enumerate(itertools.pairwise(edges)):
        chunk = {k: v[:, a:b] for k, v in inputs.items() if k in per_seq}
        chunk["mtp_input_ids"] = next_ids[:, a:b]
        chunk["mtp_lookahead_ids"] = padded[:, b : b + ahead]  # deeper MTP depths read past the chunk
        if i == 0:
            chunk.update({k: v for k, v in inputs.items() if k not in per_seq and k != "mtp_input_ids"})
        chunks.append(chunk)
    return chunks


def run_chunks(
    plans: Sequence[SubgraphPlan],
    inputs: dict[str, np.ndarray],
    run: Run,
    bounds: Sequence[int],
    *,
    hidden_size: int,
    outputs: Sequence[str],
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Run a prompt as chunks (`chunk_inputs`) through the cache (chunked prefill then decode steps);
    returns `outputs` concatenated over the sequence and the last chunk's feeds. The result equals one
    prompt forward."""
    cache: Cache | None = None
    parts: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for chunk in chunk_inputs(plans, inputs, bounds):
        result = run_chain(plans, chunk, run, cache, hidden_size=hidden_size)
        cache, feeds = result.cache, result.feeds
        for n in outputs:
            parts[n].append(result.values[n])
    return {n: np.concatenate(p, axis=1) for n, p in parts.items()}, feeds
