"""`m3::moe` against an independent float64 numpy transcription of m3-architecture.md §2.5-2.6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import m3export.ops.moe  # noqa: F401  (registers torch.ops.m3.moe)

ALPHA, BETA, LIMIT, SCALE = 1.702, 1.0, 7.0, 2.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def reference_moe(x, w_router, bias, gate_up, down, k):  # type: ignore[no-untyped-def]
    """§2.6 in float64, one token at a time: sigmoid scores, top-k of (s + b), weights from the
    unbiased s renormalised over the chosen k times the scaling factor, SwiGLU-OAI experts."""
    x, w_router, bias, gate_up, down = (
        np.asarray(a, dtype=np.float64) for a in (x, w_router, bias, gate_up, down)
    )
    inter = down.shape[2]
    out = np.zeros_like(x)
    s = _sigmoid(x @ w_router.T)
    for t in range(x.shape[0]):
        chosen = np.argsort(-(s[t] + bias), kind="stable")[:k]
        weights = s[t, chosen] / s[t, chosen].sum() * SCALE
        for e, w in zip(chosen, weights, strict=True):
            h = gate_up[e] @ x[t]
            g = np.minimum(h[:inter], LIMIT)  # gate: upper clamp only
            u = np.clip(h[inter:], -LIMIT, LIMIT)
            out[t] += w * (down[e] @ (g * _sigmoid(ALPHA * g) * (u + BETA)))
    return out


def _case(tokens: int, hidden: int, inter: int, experts: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        # Inputs at scale 3 with weights at 0.5/sqrt(H): gate/up pre-activations reach well past ±7.
        "x": 3.0 * torch.randn(tokens, hidden, generator=g),
        "w_router": 0.1 * torch.randn(experts, hidden, generator=g),
        "bias": 0.3 * torch.randn(experts, generator=g),
        "gate_up": torch.randn(experts, 2 * inter, hidden, generator=g) * (2.0 / hidden**0.5),
        "down": torch.randn(experts, hidden, inter, generator=g) / inter**0.5,
    }


def _run_op(c: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    return torch.ops.m3.moe(
        c["x"], c["w_router"], c["bias"], c["gate_up"], c["down"], k, SCALE, ALPHA, BETA, LIMIT
    )


def _topk_sets(scores: torch.Tensor, k: int) -> list[frozenset[int]]:
    return [frozenset(r) for r in torch.topk(scores, k, dim=-1).indices.tolist()]


@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "k"), [(37, 32, 24, 8, 2), (50, 48, 16, 16, 4)]
)
def test_moe_op_matches_float64_reference(tokens: int, hidden: int, inter: int, experts: int, k: int) -> None:
    c = _case(tokens, hidden, inter, experts, seed=tokens)
    scores = torch.sigmoid(c["x"].double() @ c["w_router"].double().t())
    biased = scores + c["bias"].double()
    # The case must exercise what it claims to: the bias changes the selection for many tokens...
    changed = sum(a != b for a, b in zip(_topk_sets(scores, k), _topk_sets(biased, k), strict=True))
    assert changed >= tokens // 4, f"bias changed the selection of only {changed}/{tokens} tokens"
    # ...the top-k is not decided by a near-tie (fp32 vs fp64 would then legitimately differ)...
    top = torch.topk(biased, k + 1, dim=-1).values
    assert (top[:, k - 1] - top[:, k]).min() > 1e-4
    # ...and both SwiGLU clamps are active on many pre-activations.
    pre = torch.einsum("eoh,th->teo", c["gate_up"].double(), c["x"].double())
    assert (pre[..., :inter] > LIMIT).float().mean() > 0.05
    assert (pre[..., inter:].abs() > LIMIT).float().mean() > 0.05

    got = _run_op(c, k).double().numpy()
    want = reference_moe(c["x"], c["w_router"], c["bias"], c["gate_up"], c["down"], k)
    err = np.abs(got - want).max()
    assert err <= 1e-5 * np.abs(want).max(), f"max abs err {err:.3g} vs output scale {np.abs(want).max():.3g}"


def test_moe_op_reference_detects_dropped_bias() -> None:
    """The comparison above can fail: the same op without the correction bias is far from the reference."""
    c = _case(37, 32, 24, 8, seed=37)
    want = reference_moe(c["x"], c["w_router"], c["bias"], c["gate_up"], c["down"], 2)
    no_bias = dict(c, bias=torch.zeros_like(c["bias"]))
    err = np.abs(_run_op(no_bias, 2).double().numpy() - want).max()
    assert err > 1e-2 * np.abs(want).max()


def test_moe_op_bf16_close_to_reference() -> None:
    c = _case(29, 32, 24, 8, seed=3)
    bf = {k: (v if k in ("w_router", "bias") else v.bfloat16()) for k, v in c.items()}
    got = _run_op(bf, 2)
    assert got.dtype == torch.bfloat16
    want = reference_moe(
        bf["x"].float(), c["w_router"], c["bias"], bf["gate_up"].float(), bf["down"].float(), 2
    )
    err = np.abs(got.double().numpy() - want).max()
    assert err <= 2e-2 * np.abs(want).max()


def test_moe_op_fake_impl_and_opcheck() -> None:
    c = _case(11, 32, 24, 8, seed=5)
    args = (c["x"], c["w_router"], c["bias"], c["gate_up"], c["down"], 2, SCALE, ALPHA, BETA, LIMIT)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.ops.m3.moe(*fake_args)
        assert out.shape == (11, 32) and out.dtype == torch.float32
    torch.library.opcheck(torch.ops.m3.moe.default, args)
