"""edgelora.stages: nested stages add up to the time spent, each stage's own; nothing without a clock."""
import time

import pytest

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
    assert record["total"] + 0.002 >= record["inner"] + record["outer"]  # each rounded to the millisecond
    line = clock.summary()  # the longest stage first, each with its seconds and share
    assert line.startswith(f"{clock.total():.1f} s in all; where the time went: inner ")
    assert line.index("inner ") < line.index(", outer ") and line.endswith("%)")


def test_the_stage_that_raised_the_peak_is_named_though_stages_take_turns():
    import mmap
    from pathlib import Path

    from edgelora.machine import peak_rss_mb

    Path("/proc/self/clear_refs").write_text("5")  # the peak back to the RSS now (Linux): earlier tests set it high
    clock = StageClock()
    start = peak_rss_mb()
    block = mmap.mmap(-1, 64 << 20)  # 64 MiB of new pages (not memory an allocator kept), held to the end
    with clock.running():
        for turn in range(2):  # as the search's stages take turns for each quant
            with stage("measure"):
                with stage("answers"):
                    if turn == 1:
                        for page in range(0, len(block), mmap.PAGESIZE):
                            block[page] = 1  # touched: resident from here on
            with stage("trials"):
                pass
    block.close()
    assert clock.peak_mb["measure"] == clock.peak_mb["trials"]  # the last ends say nothing of who raised it
    assert clock.peak_rise_mb["answers"] > 60
    assert clock.peak_rise_mb["measure"] < 5 and clock.peak_rise_mb["trials"] < 5
    assert sum(clock.peak_rise_mb.values()) == pytest.approx(peak_rss_mb() - start, abs=1)


def test_stage_without_a_clock_does_nothing():
    clock = StageClock()
    with stage("loose"):
        pass
    assert clock.seconds == {}
