"""Greedy decoding through a chain of subgraph runners and their KV cache, with optional MTP speculative
decoding: one library function for `m3export generate`, build step e and `check`.

Plain decoding: one prefill of the prompt through vision? + text stages, then one one-token call per
new token; `present.*` outputs become the next call's `past.*` inputs.

MTP speculative decoding (m3-architecture.md §3.4): the MTP subgraph at position i combines the main
model's final hidden state h_i with the embedding of the token after i and predicts the token after
that. Each round drafts one token from the last committed position, then verifies [last token, draft]
with one forward of the main stages: the main model's own greedy token is always committed, and the
draft's successor too when the draft was right. On a rejection the main cache is cut back to the
committed positions; the MTP cache only ever holds committed positions, so it never rolls back.
Output is therefore the plain greedy output. One draft per round: the MXFP8 release has one MTP layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3export.errors import InputError
from m3export.runners.chain import Cache, run_chain, truncate_cache
from m3export.spec import M3Spec
from m3export.split.plan import KINDS, SubgraphPlan

OnToken = Callable[[int], None]


@dataclass
class GenerateResult:
    """Generated token ids (EOS included when produced) and decoding statistics."""

    tokens: list[int]
    prompt_len: int
    stop_reason: str  # "eos" | "max_new_tokens" | "max_length"
    main_forwards: int  # calls of the main stages, prefill included
    drafted: int = 0
    accepted: int = 0
    backend: str = ""
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # the prompt's forward (every chunk of it), first token included

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first per second of decoding (None with a single token)."""
        rest = self.seconds - self.prefill_seconds
        return (len(self.tokens) - 1) / rest if len(self.tokens) > 1 and rest > 0 else None

    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.main_forwards, 1)


class _Decoder:
    """Runs the main stages (and MTP) through their caches; holds the position bookkeeping."""

    def __init__(self, spec: M3Spec, plans: Sequence[SubgraphPlan], run: Callable[..., Any]) -> None:
        self.hidden = spec.text.hidden_size
        self.main = [p for p in plans if KINDS[p.kind].main]
        self.mtp = next((p for p in plans if not KINDS[p.kind].main), None)
        self.run = run
        self.cache: Cache | None = None  # main stages
        self.mtp_cache: Cache | None = None
        self.forwards = 0

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the main stages on new positions; returns its values, extends the cache."""
        res = run_chain(self.main, inputs, self.run, self.cache, hidden_size=self.hidden)
        self.cache = res.cache
        self.forwards += 1
        return res.values

    def prefill(self, prompt: dict[str, np.ndarray], chunk: int | None) -> dict[str, np.ndarray]:
        """The prompt's forward; with `chunk`, in calls of at most `chunk` tokens through the cache
        (chunked prefill: each call's memory follows its chunk, not the prompt). Returns the last
        call's logits and the final hidden states of every prompt position (MTP drafts from them)."""
        seq = int(prompt["input_ids"].shape[1])
        if chunk is None or seq <= chunk:
            return self.forward(prompt)
        if set(prompt) - {"input_ids", "position_ids"}:
            raise InputError("--prefill-chunk takes text-only prompts (images and video prefill in one call)")
        hidden: list[np.ndarray] = []
        for a in range(0, seq, chunk):
            values = self.forward({k: v[:, a : a + chunk] for k, v in prompt.items()})
            hidden.append(values["final_hidden_states"])
        return {**values, "final_hidden_states": np.concatenate(hidden, axis=1)}

    def draft(self, hidden: np.ndarray, next_ids: np.ndarray, positions: np.ndarray) -> int:
        """MTP depth 0 on committed positions: the arg-max token after next_ids[-1]."""
        assert self.mtp is not None
        feed = {
            "input_ids": next_ids[None, :],
            "final_hidden_states": hidden[None],
            "mtp_input_ids": next_ids[None, :],
            "position_ids": positions[None, :],
        }
        res = run_chain([self.mtp], feed, self.run, self.mtp_cache, hidden_size=self.hidden)
        self.mtp_cache = res.cache
        return int(res.values["mtp_logits.0"][0, -1].argmax())


def generate_tokens(
    spec: M3Spec,
    plans: Sequence[SubgraphPlan],
    run: Callable[..., Any],
    prompt: dict[str, np.ndarray],
    max_new_tokens: int,
    *,
    mtp: bool = False,
    on_token: OnToken | None = None,
    prefill_chunk: int | None = None,
) -> GenerateResult:
    """Greedy decoding of one prompt (batch 1: input_ids, position_ids and optional vision inputs);
    the prompt prefilled in chunks of `prefill_chunk` tokens when given."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise InputError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    prompt_len = int(prompt["input_ids"].shape[1])
    limit = spec.text.max_position_embeddings
    if prompt_len > limit:
        raise InputError(
            f"the prompt has {prompt_len} tokens (images expanded); the spec's maximum length "
            f"(text.max_position_embeddings) is {limit}"
        )
    if mtp and all(KINDS[p.kind].main for p in plans):
        raise InputError("--mtp needs an MTP subgraph, but this build has none (text.num_mtp_modules is 0)")
    dec = _Decoder(spec, plans, run)
    eos = spec.text.eos_token_id
    tokens: list[int] = []

    def commit(tok: int) -> str | None:
        tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if eos is not None and tok == eos:
            return "eos"
        if len(tokens) >= max_new_tokens:
            return "max_new_tokens"
        if prompt_len + len(tokens) >= limit:
            return "max_length"
        return None

    start = time.perf_counter()
    values = dec.prefill(prompt, prefill_chunk)
    stop = commit(int(values["logits"][0, -1].argmax()))
    prefill_seconds = time.perf_counter() - start
    pos = prompt_len  # the position of the last committed token, not yet in the main cache
    drafted = accepted = 0
    if mtp:  # MTP positions pending: every prompt position, each with the token after it
        hid = values["final_hidden_states"][0]
        nxt = np.append(prompt["input_ids"][0, 1:], tokens[-1])
        at = np.arange(prompt_len)
    while stop is None:
        if not mtp:
            values = dec.forward(_step([tokens[-1]], pos))
            pos += 1
            stop = commit(int(values["logits"][0, -1].argmax()))
            continue
        draft = dec.draft(hid, nxt, at)
        values = dec.forward(_step([tokens[-1], draft], pos))
        drafted += 1
        greedy = values["logits"][0].argmax(-1)
        stop = commit(int(greedy[0]))
        accepted += int(greedy[0]) == draft
        if int(greedy[0]) == draft and stop is None:
            stop = commit(int(greedy[1]))
            hid, nxt, at = values["final_hidden_states"][0], np.array(tokens[-2:]), np.arange(pos, pos + 2)
            pos += 2
        else:  # keep position pos only: the draft's cache entries are dropped
            assert dec.cache is not None
            dec.cache = truncate_cache(dec.cache, pos + 1)
            hid, nxt, at = (
                values["final_hidden_states"][0, :1],
                np.array(tokens[-1:]),
                np.arange(pos, pos + 1),
            )
            pos += 1
    result = GenerateResult(tokens, prompt_len, stop, dec.forwards, drafted, accepted)
    result.prefill_seconds = prefill_seconds
    return result


def _step(ids: list[int], pos: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array([ids], np.int64),
        "position_ids": np.arange(pos, pos + len(ids), dtype=np.int64)[None, :],
    }
