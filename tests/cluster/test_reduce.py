"""The exact fixed-point sum (metaray/cluster/reduce.py), without Ray: order- and split-free to the bit, within
its stated bound of a float64 reference, and more accurate than the float32 sequential sum it replaced."""
from __future__ import annotations

import random

import pytest
import torch

from metaray.cluster.aggregate import aggregate
from metaray.cluster import reduce
from metaray.cluster.reduce import (blocks, coefficients, decode, decode_flat, encode, encode_into, encode_sum, exact_sum,
                                   exponents, max_abs, unflatten)


def grads(n: int, d: int = 2000, seed: int = 0, dtype=torch.float32, scale: float = 1.0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    # magnitudes spread over 6 decades within each tensor, and a second tensor 1e-3 smaller
    out = []
    for _ in range(n):
        w = torch.randn(d, generator=g, dtype=torch.float64) * 10 ** torch.empty(d, dtype=torch.float64).uniform_(-3, 3, generator=g)
        out.append({"w": (scale * w).to(dtype), "b": (1e-3 * scale * torch.randn(7, generator=g, dtype=torch.float64)).to(dtype)})
    return out


def add(acc: dict | None, q: dict) -> dict:
    """acc + q, int64 (the plain reference for what encode_into accumulates)."""
    return {k: v.clone() for k, v in q.items()} if acc is None else {k: acc[k] + q[k] for k in acc}


def split_sum(gs: list[dict], coefs: list[float], parts: list[list[int]], order: list[int]) -> dict:
    """What W actors compute: each sums its own tasks (in its own order), the partials meet in ``order``."""
    exps = exponents([max_abs(g) for g in gs], coefs)
    partials = []
    for idx in parts:
        acc = None
        for i in idx:
            acc = encode_into(acc, gs[i], coefs[i], exps)  # what each actor runs
        partials.append(acc)
    total = None
    for p in order:
        total = add(total, partials[p])
    return decode(total, exps, {k: v.dtype for k, v in gs[0].items()})


@pytest.mark.parametrize("rule", ["mean", "weighted"])
def test_any_split_and_order_gives_the_same_bits(rule):
    n = 13
    gs = grads(n)
    rng = random.Random(1)
    weights = [rng.uniform(0.1, 5.0) for _ in range(n)] if rule == "weighted" else None
    coefs = coefficients(rule, n, weights)
    ref = aggregate(gs, rule, weights)
    for trial in range(20):
        w = 1 + trial % 5
        idx = list(range(n))
        rng.shuffle(idx)
        cuts = sorted(rng.sample(range(1, n), w - 1)) if w > 1 else []  # uneven splits
        parts = [idx[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
        order = list(range(len(parts)))
        rng.shuffle(order)
        out = split_sum(gs, coefs, parts, order)
        for k in ref:
            assert torch.equal(out[k], ref[k]), (rule, trial, k)
    # the float sum it replaces does depend on the order: the property is not vacuous on this data
    seq = lambda order: sum((gs[i]["w"] * coefs[i] for i in order[1:]), gs[order[0]]["w"] * coefs[order[0]])
    assert not torch.equal(seq(list(range(n))), seq(list(reversed(range(n)))))


def test_chunked_encode_gives_the_bits_of_the_plain_one(monkeypatch):
    """encode_into and encode_sum (chunks through a small scratch buffer, all tasks per chunk) = the plain sum of
    encode(...) terms to the bit, and the chunked decode = the plain one, for chunk sizes that do and do not
    divide the tensor, a non-contiguous tensor and float64."""
    gs = grads(3, d=1000)
    gs[1]["w"] = torch.randn(2000, dtype=torch.float32)[::2]  # non-contiguous
    coefs = coefficients("mean", 3, None)
    exps = exponents([max_abs(g) for g in gs], coefs)
    plain = None
    for g, c in zip(gs, coefs):
        plain = add(plain, encode(g, c, exps))
    for chunk in (7, 256, 1000, 1 << 17):
        monkeypatch.setattr(reduce, "_CHUNK", chunk)
        acc = None
        for g, c in zip(gs, coefs):
            acc = encode_into(acc, g, c, exps)
        for k in plain:
            assert acc[k].dtype == torch.int64 and torch.equal(acc[k], plain[k]), (chunk, k)
        together = encode_sum(gs, coefs, exps)  # every task per chunk, the first one written, not added
        assert all(torch.equal(together[k], plain[k]) for k in plain), chunk
        onto = encode_sum(gs[1:], coefs[1:], exps, encode(gs[0], coefs[0], exps), add=True)
        assert all(torch.equal(onto[k], plain[k]) for k in plain), chunk
        partly = encode_sum(gs, coefs, exps, {}, add=True)  # a tensor missing from out starts from zero
        assert all(torch.equal(partly[k], plain[k]) for k in plain), chunk
        decoded = decode(plain, exps, {k: torch.float32 for k in plain})
        for k in plain:  # the one rounding, int64 -> float64 -> float32, as a whole-tensor conversion does it
            whole = plain[k].to(torch.float64).mul_(2.0 ** -exps[k]).to(torch.float32)
            assert torch.equal(decoded[k], whole), (chunk, k)
    with pytest.raises(ValueError, match="one coefficient per gradient"):
        encode_sum(gs, coefs[:2], exps)
    g64 = {k: v.double() for k, v in gs[0].items()}
    e64 = exponents([max_abs(g64)], [1.0])
    assert all(torch.equal(encode_into(None, g64, 1.0, e64)[k], encode(g64, 1.0, e64)[k]) for k in g64)


def test_sharded_by_coordinate_gives_the_same_bits():
    """What the actors run (collective.py): each of W workers flattens its int64 partial sum and cuts it into R
    coordinate blocks; block r of every partial is added and decoded on its own (``decode_flat``), and the
    blocks are concatenated. Blocks cross the boundary between the two tensors (each has its own exponent)."""
    n = 9
    gs = grads(n)
    coefs = coefficients("mean", n, None)
    ref = aggregate(gs, "mean", None)
    exps = exponents([max_abs(g) for g in gs], coefs)
    sizes = {k: v.numel() for k, v in gs[0].items()}
    for w in (1, 2, 3, 4):
        flats = []
        for idx in [list(range(n))[i::w] for i in range(w)]:
            acc = None
            for i in idx:
                acc = encode_into(acc, gs[i], coefs[i], exps)
            flats.append(torch.cat([acc[k].reshape(-1) for k in sizes]))
        for r in (1, 2, 3, 5, 7):
            parts = blocks(sum(sizes.values()), r)
            assert any(a < sizes["w"] < b for a, b in parts) or r == 1
            out = torch.cat([decode_flat(sum(f[a:b] for f in flats), a, sizes, exps, torch.float32) for a, b in parts])
            out = unflatten(out, {k: (v.shape, v.dtype) for k, v in gs[0].items()})
            for k in ref:
                assert torch.equal(out[k], ref[k]), (w, r, k)


@pytest.mark.parametrize("n", [2, 8, 64, 1000])
def test_error_within_the_bound_and_below_float32_sequential(n):
    gs = grads(n, d=500, seed=n)
    exact = sum(g["w"].double() for g in gs) / n  # float64 reference (float32 inputs, so exact to ~2^-53 relative)
    fixed = exact_sum(gs, coefficients("mean", n, None))["w"].double()
    # the bound of reduce.py's docstring, before the final rounding to float32
    m = max(float(g["w"].abs().max()) for g in gs) / n
    bound = n * n * m * 2.0 ** -61
    pre_round = exact_sum([{"w": g["w"].double()} for g in gs], coefficients("mean", n, None))["w"]
    assert float((pre_round - exact).abs().max()) <= bound + 2 ** -52 * float(exact.abs().max())
    # after rounding to float32: within half an ulp of float32 of the exact mean, everywhere
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    assert bool(((fixed - exact).abs() <= 0.5 * ulp + bound).all())
    seq = gs[0]["w"].clone()
    for g in gs[1:]:
        seq.add_(g["w"])
    seq_err = float(((seq / n).double() - exact).abs().max())
    fixed_err = float((fixed - exact).abs().max())
    assert fixed_err <= seq_err, (fixed_err, seq_err)
    if n >= 64:
        assert fixed_err < seq_err / 2  # measured: ~4x to 60x more accurate here


def test_extreme_magnitudes_zeros_and_float64():
    # tiny, huge and zero tensors in one step: each tensor has its own grid
    gs = [{"tiny": torch.full((3,), 1e-38 * (i + 1)), "huge": torch.full((3,), 1e37 * (i + 1)), "zero": torch.zeros(2)}
          for i in range(4)]
    out = exact_sum(gs, coefficients("mean", 4, None))
    torch.testing.assert_close(out["tiny"], torch.full((3,), 2.5e-38), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["huge"], torch.full((3,), 2.5e37), rtol=1e-6, atol=0)
    assert torch.equal(out["zero"], torch.zeros(2)) and out["zero"].dtype == torch.float32
    # float64 gradients of 1e-200: the capped grid still represents them to float64 precision
    g64 = [{"w": torch.tensor([1e-200 * (i + 1), -3e-201], dtype=torch.float64)} for i in range(3)]
    out = exact_sum(g64, [1.0, 1.0, 1.0])
    assert out["w"].dtype == torch.float64
    torch.testing.assert_close(out["w"], torch.tensor([6e-200, -9e-201], dtype=torch.float64), rtol=1e-14, atol=0)
    # the exponents keep every partial sum inside int64, even with the largest float32 values
    big = [{"w": torch.full((2,), torch.finfo(torch.float32).max)} for _ in range(5)]
    e = exponents([max_abs(g) for g in big], [1.0] * 5)
    q = sum(encode(g, 1.0, e)["w"].double() for g in big)
    assert float(q.max()) < 2.0 ** 62
    # the mean of five float32 maxima is the maximum (a float32 sequential sum would overflow to inf first)
    assert float(exact_sum(big, [0.2] * 5)["w"][0]) == float(torch.finfo(torch.float32).max)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="not finite"):
        exponents([{"w": float("inf")}], [1.0])
    with pytest.raises(ValueError, match="one max per task"):
        exponents([{"w": 1.0}], [1.0, 2.0])
    with pytest.raises(ValueError, match="linear rules"):
        coefficients("median", 3, None)


# ---- the order-free sum of squares (the outer update's clip norm) ------------------------------------------------


def _fsum_squares(tensors) -> float:
    """The correctly rounded Σ t² (math.fsum of float64 squares, exact for float32 t): the reference."""
    import math
    return math.fsum(v for t in tensors for v in t.detach().double().reshape(-1).square().tolist())


def test_square_sum_is_the_correctly_rounded_sum_for_any_threads_and_split():
    """square_sum's bits do not change with the thread count (Tensor.sum's can: docs/scaling.md); the ints of 7
    blocks (what W = 7 actors would each compute on their share, cut across the tensors) add to the value of
    the whole; and over 6 decades of magnitudes the result is fsum's to 2^-50 (its bound: n³ 2^-121 + 2^-53)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(1_500_000, generator=g) * 10 ** torch.empty(1_500_000).uniform_(-3, 3, generator=g)
    tensors = [big, torch.randn(7, 3, generator=g, dtype=torch.float32) * 1e-4, torch.zeros(0)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reduce.square_sum(tensors)
        torch.set_num_threads(2)
        two = reduce.square_sum(tensors)
    finally:
        torch.set_num_threads(before)
    assert one == two
    ref = _fsum_squares(tensors)
    assert abs(one - ref) <= 2.0 ** -50 * ref, (one, ref)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    n = flat.numel()
    e = reduce.square_sum_exponent(float(flat.abs().max()), n)
    parts = [reduce.square_sum_fixed([flat[a:b]], e, n) for a, b in blocks(n, 7)]
    assert reduce.square_sum_value(sum(parts), e, n) == one


def test_square_sum_edges():
    import math
    f32max = torch.finfo(torch.float32).max
    # the largest float32 squares: no int64 partial overflows, and the value is fsum's
    top = torch.full((1000,), f32max)
    assert reduce.square_sum([top]) == _fsum_squares([top])
    # one large value and 10^5 whose squares (2^-44) are below the coarse grid's step (~2^-44.4 here): one grid
    # would round each of them by up to half a step (their sum, 10^5 · 2^-44 ≈ 5.7e-9, visible next to 1.0); the
    # finer grid keeps them
    mixed = torch.cat([torch.tensor([1.0]), torch.full((100_000,), 2.0 ** -22)])
    ref = _fsum_squares([mixed])
    assert ref - 1.0 > 5e-9 and abs(reduce.square_sum([mixed]) - ref) <= 2.0 ** -52 * ref
    assert reduce.square_sum([torch.full((10,), 1e-3)]) == _fsum_squares([torch.full((10,), 1e-3)])
    # zeros, empty, float64 subnormal squares, non-finite
    assert reduce.square_sum([torch.zeros(5)]) == 0.0 and reduce.square_sum([]) == 0.0
    tiny64 = torch.tensor([1e-200, -3e-201], dtype=torch.float64)
    assert reduce.square_sum([tiny64]) == 0.0  # the float64 squares underflow to 0, as (t ** 2).sum() does
    assert math.isnan(reduce.square_sum([torch.tensor([1.0, float("nan")])]))
    assert reduce.square_sum([torch.tensor([1.0, float("-inf")])]) == math.inf
    huge64 = torch.tensor([1e200, 1.0], dtype=torch.float64)  # finite, but its square is not
    assert reduce.square_sum([huge64]) == math.inf
    with pytest.raises(ValueError, match="finite max"):
        reduce.square_sum_exponent(math.inf, 3)
    with pytest.raises(ValueError, match="overflow float64"):
        reduce.square_sum_exponent(1e200, 2)
