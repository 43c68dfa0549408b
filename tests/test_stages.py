"""edgelora.stages: nested stages add up to the time spent, each stage's own; nothing without a clock."""
import time

from edgelora.stages import StageClock, stage


def test_nested_stages_count_their_own_time():
    clock = StageClock()
    with clock.running():
        with stage("outer"):
            time.sleep(0.05)
            with stage("inner"):
                time.sleep(0.1)
        with stage("inner"):  # a stage run twice adds up
            time.sleep(0.05)
    assert 0.04 < clock.seconds["outer"] < 0.1
    assert 0.14 < clock.seconds["inner"] < 0.25
    assert sum(clock.seconds.values()) <= clock.total()
    assert set(clock.peak_mb) == {"outer", "inner"} and all(v > 0 for v in clock.peak_mb.values())
    record = clock.as_dict()
    assert record["total"] >= record["inner"] + record["outer"]
    line = clock.summary()  # the longest stage first, each with its seconds and share
    assert line.startswith(f"{clock.total():.1f} s in all; where the time went: inner ")
    assert line.index("inner ") < line.index(", outer ") and line.endswith("%)")


def test_stage_without_a_clock_does_nothing():
    clock = StageClock()
    with stage("loose"):
        pass
    assert clock.seconds == {}
