"""Accuracy checks shared by the tests: relative error against a float64 oracle, judged against stock's error."""

import torch

# Round-off of one operation in each dtype; bf16 stores truncate under the Triton interpreter, which doubles it.
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """max |out - ref| / max(max |ref|, floor): NaN or inf in `out` counts as an infinite error."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).abs().max() / ref64.abs().max().clamp_min(floor)).item()


def assert_accurate(
    out: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    ulps: float = 4,
    floor: float = 1e-30,
    what: str = "",
):
    """`out` is at most twice as far from the float64 `ref` as `baseline` (the stock eager result in the same
    dtype), plus a few units of round-off of out's dtype. Without a baseline, only the round-off bound applies.

    Errors are relative to max |ref|, or to `floor` where the reference is smaller: a quantity that is zero in exact
    arithmetic (a top-1 router's gradient under normalisation, say) is only round-off noise in any dtype."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref, floor)
    bound = ulps * EPS[out.dtype]
    if baseline is not None:
        bound += 2 * rel_err(baseline, ref, floor)
    assert err <= bound, f"{what}: relative error {err:.3g} exceeds {bound:.3g} ({out.dtype})"
