import pytest

from flatnet.testing.clock import FakeClock


def test_advance_moves_time_and_is_callable():
    clock = FakeClock(start=100.0)
    assert clock.now == 100.0 and clock() == 100.0
    assert clock.advance(2.5) == 102.5
    assert clock.now == 102.5


def test_time_never_goes_backwards():
    clock = FakeClock(start=10)
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        clock.advance_to(9)


def test_callbacks_run_in_time_order_with_their_own_now():
    clock = FakeClock()
    seen = []
    clock.call_at(3, lambda: seen.append(("c", clock.now)))
    clock.call_at(1, lambda: seen.append(("a", clock.now)))
    clock.call_later(2, lambda: seen.append(("b", clock.now)))
    cancelled = clock.call_at(2.5, lambda: seen.append(("never", clock.now)))
    cancelled.cancel()
    assert clock.pending() == 3
    clock.advance(2.9)
    assert seen == [("a", 1), ("b", 2)] and clock.now == 2.9
    clock.advance(0.1)
    assert seen[-1] == ("c", 3)
    assert clock.next_call_time() is None


def test_same_time_callbacks_run_in_registration_order_and_may_schedule_more():
    clock = FakeClock()
    seen = []
    clock.call_at(1, lambda: (seen.append(1), clock.call_later(0.5, lambda: seen.append(3))))
    clock.call_at(1, lambda: seen.append(2))
    clock.advance(5)
    assert seen == [1, 2, 3]


def test_run_due_runs_callbacks_scheduled_in_the_past():
    clock = FakeClock(start=50)
    seen = []
    clock.call_at(10, lambda: seen.append(clock.now))
    assert clock.run_due() == 1
    assert seen == [50]
