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
    bsp.on_push(0, 0, g(1))
    bsp.on_push(1, 0, g(1))
    with pytest.raises(SyncError, match="pushed clock 3 while the barrier collects clock 1"):
        bsp.on_push(0, 3, g(1))


def test_bsp_after_a_restart_follows_the_workers_clock():
    bsp = BSP(workers=2, shard_size=4)   # a restarted server: it knows no clock
    assert bsp.on_push(0, 7, g(1)) is None
    assert bsp.may_proceed(1, 6)         # barrier 6 completed before the crash
    # worker 1 had passed barrier 7 elsewhere: collection moves on to 8
    assert bsp.on_push(1, 8, g(5)) is None
    assert bsp.on_push(0, 7, g(1)) is None and bsp.may_proceed(0, 7)  # a late resend, done
    np.testing.assert_allclose(bsp.on_push(0, 8, g(3)), g(4))
    with pytest.raises(SyncError):
        bsp.on_push(1, 5, g(1))          # synced now: the past is refused again


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


def test_bsp_once_every_worker_left_follows_the_clock_they_come_back_with():
    bsp = BSP(workers=2, shard_size=4)
    for clock in range(3):
        bsp.on_push(0, clock, g(1))
        bsp.on_push(1, clock, g(1))
    bsp.leave(0)
    bsp.leave(1)                         # both went local (a stateless outage elsewhere)
    assert bsp.join(0) == 3 and bsp.join(1) == 3
    assert bsp.on_push(0, 40, g(2)) is None          # they trained on: no SyncError
    np.testing.assert_allclose(bsp.on_push(1, 40, g(4)), g(3))
    assert bsp.may_proceed(0, 40)
    with pytest.raises(SyncError):
        bsp.on_push(1, 12, g(1))         # synced again


def test_asp_applies_every_push_and_never_waits():
    asp = ASP(workers=2, shard_size=4)
    np.testing.assert_allclose(asp.on_push(1, 7, g(5)), g(5))
    assert asp.may_proceed(0, 100)
    assert asp.lr_scale() == 0.5 and BSP(2, 4).lr_scale() == 1.0


@pytest.mark.parametrize("spec, message", [("bogus", "unknown sync policy"), ("bsp:3", "takes no parameters")])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(spec)


# --- SSP -----------------------------------------------------------------------------

def test_ssp_bounds_the_lead_over_the_slowest():
    ssp = parse_policy("ssp:2")(3, 4)
    for c in range(3):
        np.testing.assert_allclose(ssp.on_push(0, c, g(1)), g(1))  # applied at once
    assert not ssp.may_proceed(0, 2)        # slowest has pushed nothing: 2 - (-1) > 2
    ssp.on_push(1, 0, g(1))
    assert not ssp.may_proceed(0, 2)        # worker 2 still has not pushed
    ssp.on_push(2, 0, g(1))
    assert ssp.may_proceed(0, 2) and not ssp.may_proceed(0, 3)
    assert ssp.lr_scale() == 1 / 3


def test_ssp_zero_waits_like_bsp_and_leavers_are_not_waited_for():
    ssp = parse_policy("ssp:0")(2, 4)
    ssp.on_push(0, 0, g(1))
    assert not ssp.may_proceed(0, 0)
    ssp.leave(1)
    assert ssp.may_proceed(0, 0)


# --- DSSP ----------------------------------------------------------------------------

def test_dssp_grants_the_extra_clocks_that_meet_the_slowest():
    dssp = parse_policy("dssp:1:4")(2, 4)
    # worker 1 is slow: one push per second; worker 0 pushes every 0.25 s
    dssp.on_push(1, 0, g(1), now=0.0)
    dssp.on_push(0, 0, g(1), now=0.0)
    dssp.on_push(0, 1, g(1), now=0.25)
    assert dssp.may_proceed(0, 1)           # 1 ahead: within S
    dssp.on_push(1, 1, g(1), now=1.0)
    for c, t in [(2, 1.25), (3, 1.5)]:
        dssp.on_push(0, c, g(1), now=t)
    # worker 0 at clock 3 is 2 ahead of the slowest (1): beyond S=1, so the leader
    # predicts the slowest's next push at 2.0 and grants r with 1.5 + r*0.25 nearest: 2
    assert dssp.grants == {0: 2}
    assert dssp.may_proceed(0, 3)           # 2 ahead <= 1 + 2
    dssp.on_push(0, 4, g(1), now=1.75)
    assert dssp.may_proceed(0, 4)
    dssp.on_push(0, 5, g(1), now=2.0)
    assert not dssp.may_proceed(0, 5)       # 4 ahead > 3: waits for the slowest
    assert [e for e, _ in dssp.drain_events()] == ["dssp_grant"]


def test_dssp_follower_allows_the_loosest_bound():
    follower = parse_policy("dssp:1:4")(2, 4, leader=False)
    follower.on_push(1, 0, g(1), now=0.0)
    for c in range(6):
        follower.on_push(0, c, g(1), now=c * 0.1)
    assert follower.may_proceed(0, 5) and not follower.may_proceed(0, 6)


# --- ElasticBSP ----------------------------------------------------------------------

def _push_all(policy, pushes):
    for worker, clock, now in pushes:
        policy.on_push(worker, clock, g(1), now=now)


def test_elastic_places_a_barrier_where_workers_meet_and_all_shards_hold_it():
    leader = parse_policy("elastic:6")(2, 4)
    follower = parse_policy("elastic:6")(2, 4, leader=False)
    # worker 0 pushes every 1 s, worker 1 every 2 s
    pushes = [(0, 0, 1.0), (1, 0, 2.0), (0, 1, 2.0), (0, 2, 3.0), (1, 1, 4.0)]
    _push_all(leader, pushes)
    _push_all(follower, pushes)
    # predicted: worker 0 at 3 + k (k=2..7) -> 5..10, worker 1 at 4 + 2k -> 8, 10, ..., 18
    # the closest pair is 8 and 8: worker 0 after clock 2 + 5 = 7, worker 1 after clock 1 + 2 = 3
    assert leader.hint_for(0) == {"barrier": 0, "clock": 7}
    assert leader.hint_for(1) == {"barrier": 0, "clock": 3}
    assert follower.hint_for(0) is None     # only the leader plans
    hints = {0: leader.hint_for(0), 1: leader.hint_for(1)}
    for shard in (leader, follower):
        shard.on_push(0, 6, g(1), now=7.0, hint=hints[0])  # not its barrier clock yet
        shard.on_pull(0, 6, hints[0])
        assert shard.may_proceed(0, 6)
        shard.on_push(0, 7, g(1), now=8.0, hint=hints[0])  # arrives at the barrier...
        shard.on_pull(0, 7, hints[0])
        assert not shard.may_proceed(0, 7)                   # ...and waits there
        shard.on_push(1, 3, g(1), now=8.5, hint=hints[1])  # the last one arrives: it opens
        shard.on_pull(1, 3, hints[1])
        assert shard.may_proceed(0, 7) and shard.may_proceed(1, 3)
    (name, record), = leader.drain_events()
    assert name == "barrier" and record["clocks"] == {0: 7, 1: 3}
    assert record["predicted_wait_s"] == {0: 0.0, 1: 0.0}
    assert record["expected_wait_s"] == {0: 0.0, 1: 0.0}  # steady intervals: no noise to expect
    assert record["actual_wait_s"] == {0: 0.5, 1: 0.0}
    assert follower.drain_events() == []
    assert leader.hint_for(0) is None       # monitoring again: two pushes each needed


def test_elastic_expects_longer_waits_than_zipline_predicts_when_intervals_are_noisy():
    def barrier_record():
        leader = parse_policy("elastic:6")(2, 4)
        # worker 0 steps 1 s, then 2 s (noisy); worker 1 steadily every 3 s
        _push_all(leader, [(0, 0, 0.0), (1, 0, 0.0), (0, 1, 1.0), (0, 2, 3.0), (1, 1, 3.0)])
        hints = {w: leader.hint_for(w) for w in (0, 1)}
        for w in (0, 1):
            leader.on_push(w, hints[w]["clock"], g(1), now=100.0, hint=hints[w])
        (_, record), = leader.drain_events()
        return record
    record = barrier_record()
    # The barrier's arrivals are the maximum of noisy times: both workers should expect to
    # wait longer than the paper's certain prediction, the steady one too.
    for w in (0, 1):
        assert record["expected_wait_s"][w] > record["predicted_wait_s"][w] + 0.1
    assert barrier_record()["expected_wait_s"] == record["expected_wait_s"]  # a fixed-seed draw


def test_elastic_learns_its_forecast_error_from_past_barriers():
    leader = parse_policy("elastic:6")(2, 4)
    # Steady intervals of 1 s: the first plan expects no wait.
    _push_all(leader, [(0, 0, 0.0), (1, 0, 0.0), (0, 1, 1.0), (1, 1, 1.0)])
    hints = {w: leader.hint_for(w) for w in (0, 1)}
    assert hints[0]["clock"] == hints[1]["clock"] == 3  # predicted at 3.0 s, 2 s ahead
    leader.on_push(0, 3, g(1), now=3.0, hint=hints[0])
    leader.on_push(1, 3, g(1), now=3.5, hint=hints[1])  # worker 1 arrives 0.5 s late: 25% of its horizon
    (_, first), = leader.drain_events()
    assert first["expected_wait_s"] == {0: 0.0, 1: 0.0} and first["arrival_error_s"] == {0: 0.0, 1: 0.5}
    # Steady again: the intervals alone would expect no wait, the forecast's record does.
    _push_all(leader, [(0, 4, 4.5), (1, 4, 4.5), (0, 5, 5.5), (1, 5, 5.5)])
    hints = {w: leader.hint_for(w) for w in (0, 1)}
    for w in (0, 1):
        leader.on_push(w, hints[w]["clock"], g(1), now=7.5, hint=hints[w])
    (_, second), = leader.drain_events()
    assert second["predicted_wait_s"] == {0: 0.0, 1: 0.0}
    # Worker 1 strays by 25% of a 2 s horizon (sd 0.5 s), worker 0 not at all: it
    # waits for worker 1 half the time, about 0.5 * 0.5 * sqrt(2 / pi) = 0.2 s.
    assert 0.12 < second["expected_wait_s"][0] < 0.3
    state = leader.state_dict()
    again = parse_policy("elastic:6")(2, 4)
    again.load_state_dict(state)
    assert again.error == leader.error and leader.error[1] > 0 and leader.error[0] == 0


def test_elastic_adapts_when_a_worker_changes_speed():
    leader = parse_policy("elastic:20")(2, 4)
    _push_all(leader, [(0, 0, 0.0), (0, 1, 1.0), (1, 0, 0.0), (1, 1, 1.0)])
    assert leader.hint_for(0)["clock"] == leader.hint_for(1)["clock"]  # same speed, same clock
    h0, h1 = leader.hint_for(0), leader.hint_for(1)
    leader.on_push(0, 3, g(1), now=3.0, hint=h0)
    leader.on_push(1, 3, g(1), now=3.0, hint=h1)
    assert leader.released == 0
    # now worker 1 is three times slower
    _push_all(leader, [(0, 4, 4.0), (0, 5, 5.0), (1, 4, 6.0), (1, 5, 9.0)])
    # predicted: worker 0 at 5 + k -> 7, 8, ..., worker 1 at 9 + 3k -> 15, 18, ...; they meet
    # at 15, the earliest exact meeting: worker 0 runs 10 more clocks, worker 1 only 2
    assert leader.hint_for(0) == {"barrier": 1, "clock": 15}
    assert leader.hint_for(1) == {"barrier": 1, "clock": 7}


def test_elastic_with_a_span_predicts_from_a_smoothed_interval_that_one_noisy_step_barely_moves():
    latest, smoothed = parse_policy("elastic:10")(1, 4), parse_policy("elastic:10:3")(1, 4)  # weight 0.5
    for policy in (latest, smoothed):
        # Intervals 1, 1, then one step of 3 (a scheduling hiccup): plans are placed after
        # the second push, so each push re-plans only once the barrier is released.
        _push_all(policy, [(0, 0, 0.0), (0, 1, 1.0)])
        hint = policy.hint_for(0)
        assert policy.plan["interval"] == {0: 1.0}
        policy.on_push(0, hint["clock"], g(1), now=float(hint["clock"]), hint=hint)  # the barrier: opens alone
        assert policy.released == 0 and policy.plan is None
        c = hint["clock"]
        _push_all(policy, [(0, c + 1, c + 1.0), (0, c + 2, c + 4.0)])  # the hiccup: 3 s
    assert latest.plan["interval"] == {0: 3.0}                       # the paper's rule follows the hiccup
    assert smoothed.plan["interval"] == {0: 2.0}                     # 0.5 * 3 + 0.5 * 1, carried across the barrier
    smoothed.leave(0)
    assert smoothed.interval == {}


def test_elastic_worker_leaving_opens_the_barrier():
    leader = parse_policy("elastic:4")(2, 4)
    _push_all(leader, [(0, 0, 0.0), (0, 1, 1.0), (1, 0, 0.0), (1, 1, 1.0)])
    hint = leader.hint_for(0)
    leader.on_push(0, 3, g(1), now=3.0, hint=hint)
    leader.on_pull(0, 3, hint)
    assert not leader.may_proceed(0, 3)
    leader.leave(1, now=4.0)
    assert leader.may_proceed(0, 3)


@pytest.mark.parametrize("hint", [{"barrier": "x", "clock": 1}, {"barrier": 0, "clock": None},
                                  {"barrier": -3, "clock": 1}, {"barrier": 9, "clock": 1}])
def test_elastic_refuses_malformed_or_unknown_barrier_hints(hint):
    leader = parse_policy("elastic:4")(2, 4)
    with pytest.raises(SyncError):
        leader.on_pull(0, 1, hint)


@pytest.mark.parametrize("spec, message", [
    ("ssp:x", "staleness must be an integer"), ("ssp:-1", "must be >= 0"),
    ("dssp:1:2:3", "too many parameters; use dssp:STALENESS:EXTRA"), ("elastic:0", "must be >= 1"),
    ("elastic:4:0", "span must be >= 1"), ("elastic:4:2:1", "use elastic:LOOKAHEAD:SPAN")])
def test_bad_parameters_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(spec)


@pytest.mark.parametrize("spec, cls", [("ssp", "SSP"), ("dssp", "DSSP"), ("elastic", "ElasticBSP")])
def test_defaults(spec, cls):
    assert type(parse_policy(spec)(2, 4)).__name__ == cls


def test_a_worker_joining_bsp_is_waited_for_from_the_barrier_being_collected():
    bsp = BSP(workers=2, shard_size=4)
    bsp.leave(1)
    np.testing.assert_allclose(bsp.on_push(0, 0, g(2)), g(2))   # alone: barrier 0 done
    assert bsp.join(1) == 1                                     # joins at barrier 1
    assert bsp.on_push(0, 1, g(2)) is None                      # which now waits for it
    np.testing.assert_allclose(bsp.on_push(1, 1, g(4)), g(3))


def test_a_worker_rejoining_shards_a_barrier_apart_continues_from_the_earlier_one():
    # worker 1 was lost; worker 0's push for clock 5 reached shard A, not yet shard B
    a, b = BSP(workers=2, shard_size=4), BSP(workers=2, shard_size=4)
    for shard in (a, b):
        for clock in range(5):
            shard.on_push(0, clock, g(1))
            shard.on_push(1, clock, g(1))
        shard.leave(1)
    a.on_push(0, 5, g(1))                                    # A: barrier 5 done alone
    resume = min(a.join(1), b.join(1))                       # what the client takes
    assert (a.clock, b.clock, resume) == (6, 5, 5)
    assert a.on_push(1, 5, g(9)) is None and a.may_proceed(1, 5)   # late at A: dropped
    assert b.on_push(0, 5, g(1)) is None                     # B waits for the rejoined worker
    np.testing.assert_allclose(b.on_push(1, 5, g(3)), g(2))
    for shard in (a, b):                                     # both collect clock 6 together
        assert shard.on_push(0, 6, g(1)) is None
        np.testing.assert_allclose(shard.on_push(1, 6, g(3)), g(2))
    with pytest.raises(SyncError):
        a.on_push(1, 5, g(1))                                # caught up: the past is refused again


def test_a_worker_joining_ssp_resumes_after_its_last_clock():
    ssp = parse_policy("ssp:1")(2, 4)
    ssp.on_push(1, 4, g(1))
    ssp.leave(1)
    assert ssp.join(1) == 5 and 1 in ssp.active


@pytest.mark.parametrize("spec", ["ssp:1", "asp", "dssp:1:2"])
def test_a_newcomer_starts_from_the_slowest_clock_and_nobody_waits_for_it(spec):
    policy = parse_policy(spec)(2, 4)
    for clock in range(10):
        policy.on_push(0, clock, g(1))
        policy.on_push(1, clock, g(1))
    assert policy.join(2) == 10                       # a worker the job did not start with
    assert policy.may_proceed(0, 10) and policy.may_proceed(1, 10)
    policy.leave(1)                                   # a leaver's old slot, taken again
    assert policy.join(1) == 10


def test_one_of_the_first_workers_starting_late_begins_at_clock_0():
    asp = parse_policy("asp")(2, 4)
    for clock in range(5):
        asp.on_push(0, clock, g(1))
    assert asp.join(1) == 0                           # waited for from the start: no jump


@pytest.mark.parametrize("spec", ["bsp", "asp", "ssp:2", "dssp:1:2", "elastic:4", "elastic:4:5"])
def test_policy_state_survives_a_chain_state_transfer(spec):
    # Through the very bytes a STATE frame carries: every attribute of the policy must come
    # back equal, so an attribute a policy adds without declaring it in state_dict fails here.
    from stalwart.metrics import EventLog
    from stalwart.optim import build_optimizer
    from stalwart.shard import ShardState, Snapshot

    def shard(policy):
        return ShardState(0, 4, build_optimizer("sgd", 4, lr=0.1, momentum=0.9), policy, 2, EventLog(None, "s"))
    policy = parse_policy(spec)(2, 4)
    for c, t in [(0, 0.0), (1, 1.0), (2, 2.0)]:
        policy.on_push(0, c, g(1), now=t)
        policy.on_push(1, c, g(2), now=t + 0.5)
    policy.on_pull(0, 2, None, 2.6)
    if spec.startswith("elastic"):
        assert policy.plan is not None  # a barrier is planned: its state travels too
    copy = parse_policy(spec)(2, 4)
    source, target = shard(policy), shard(copy)
    with source.lock, target.lock:
        target.restore(Snapshot.decode(source.snapshot().to_bytes(), shard=0))
    for k, v in vars(policy).items():
        if k == "_events":
            continue  # decisions not yet logged are the sender's, not state
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(getattr(copy, k), v)
        else:
            assert getattr(copy, k) == v, k
    assert copy.may_proceed(0, 2) == policy.may_proceed(0, 2)
