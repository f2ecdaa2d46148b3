import time

from de3bert.training.phase_timer import PhaseTimer


def test_phases_accumulate_and_a_disabled_timer_records_nothing():
    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("sleep"):
            time.sleep(0.01)
    assert timer.seconds["sleep"] >= 0.02 and set(timer.seconds) == {"sleep"}
    off = PhaseTimer(enabled=False)
    with off.phase("sleep"):
        time.sleep(0.001)
    assert not off.seconds
