"""The server optimizers against torch.optim on the same gradients."""

import numpy as np
import pytest
import torch

from stalwart.optim import build_optimizer


@pytest.mark.parametrize("name, hyper", [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("adam", {"lr": 1e-3}),
    ("adam", {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 1e-2, "eps": 1e-6}),
])
def test_matches_torch(name, hyper):
    rng = np.random.default_rng(0)
    size = 1000
    start = rng.standard_normal(size).astype(np.float32)
    ours = start.copy()
    opt = build_optimizer(name, size, **hyper)
    ref = torch.nn.Parameter(torch.from_numpy(start.copy()))
    ref_opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]([ref], **hyper)
    for _ in range(20):
        grad = rng.standard_normal(size).astype(np.float32)
        kept = grad.copy()
        opt.step(ours, grad)
        assert np.array_equal(grad, kept)  # the gradient is not modified
        ref.grad = torch.from_numpy(grad.copy())
        ref_opt.step()
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_state_round_trips():
    opt = build_optimizer("adam", 10, lr=0.1)
    params = np.ones(10, dtype=np.float32)
    opt.step(params, np.ones(10, dtype=np.float32))
    other = build_optimizer("adam", 10, lr=0.1)
    other.load_state_dict(opt.state_dict())
    a, b = params.copy(), params.copy()
    opt.step(a, np.full(10, 0.5, dtype=np.float32))
    other.step(b, np.full(10, 0.5, dtype=np.float32))
    np.testing.assert_array_equal(a, b)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer("lamb", 10, lr=0.1)


def test_axpy_updates_in_place_and_falls_back_where_blas_cannot():
    from stalwart.optim import axpy
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64).astype(np.float32)
    y = rng.standard_normal(64).astype(np.float32)
    expected = y + np.float32(-0.25) * x
    target = y
    axpy(-0.25, x, y)
    assert y is target and np.allclose(y, expected, rtol=1e-6, atol=1e-7)
    strided = rng.standard_normal(128).astype(np.float32)[::2]  # not contiguous: BLAS would copy
    expected = strided + np.float32(0.5) * x
    axpy(0.5, x, strided)
    assert np.allclose(strided, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_and_clears_huge_finite_ones(bad):
    from stalwart.optim import all_finite
    values = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    assert all_finite(values)
    values[7777] = bad
    assert not all_finite(values)
    huge = np.full(8, 3e38, dtype=np.float32)  # their float32 sum overflows; each is finite
    assert all_finite(huge) and not all_finite(np.append(huge, np.float32(bad)))
