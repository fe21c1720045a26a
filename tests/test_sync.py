import numpy as np
import pytest

from stalwart.sync import ASP, BSP, SyncError, parse_policy


def g(value, size=4):
    return np.full(size, value, dtype=np.float32)


def test_bsp_applies_the_mean_once_all_workers_pushed():
    bsp = BSP(workers=3, shard_size=4)
    assert bsp.on_push(0, 0, g(1)) is None
    assert bsp.on_push(1, 0, g(2)) is None
    assert not bsp.may_proceed(0, 0)
    update = bsp.on_push(2, 0, g(6))
    np.testing.assert_allclose(update, g(3))
    assert bsp.may_proceed(0, 0) and not bsp.may_proceed(0, 1)


def test_bsp_resend_is_counted_once():
    bsp = BSP(workers=2, shard_size=4)
    bsp.on_push(0, 0, g(1))
    assert bsp.on_push(0, 0, g(100)) is None
    np.testing.assert_allclose(bsp.on_push(1, 0, g(3)), g(2))


def test_bsp_refuses_a_clock_out_of_step():
    bsp = BSP(workers=2, shard_size=4)
    with pytest.raises(SyncError, match="pushed clock 3 while the barrier collects clock 0"):
        bsp.on_push(0, 3, g(1))


def test_bsp_leaving_worker_releases_the_barrier():
    bsp = BSP(workers=3, shard_size=4)
    bsp.on_push(0, 0, g(2))
    bsp.on_push(1, 0, g(4))
    update = bsp.leave(2)
    np.testing.assert_allclose(update, g(3))
    assert bsp.may_proceed(1, 0)
    # later barriers wait only for the workers still in the job
    assert bsp.on_push(0, 1, g(1)) is None
    np.testing.assert_allclose(bsp.on_push(1, 1, g(3)), g(2))


def test_asp_applies_every_push_and_never_waits():
    asp = ASP(workers=2, shard_size=4)
    np.testing.assert_allclose(asp.on_push(1, 7, g(5)), g(5))
    assert asp.may_proceed(0, 100)
    assert asp.lr_scale() == 0.5 and BSP(2, 4).lr_scale() == 1.0


@pytest.mark.parametrize("spec, message", [("bogus", "unknown sync policy"), ("bsp:3", "takes no parameters")])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(spec)
