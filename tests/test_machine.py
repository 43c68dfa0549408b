"""The machine module: one device vocabulary, one peak-memory measurement on every platform."""
import resource
import types

import pytest

from edgelora import machine
from edgelora.config import TrainConfig
from edgelora.errors import EdgeloraError


def test_peak_rss_on_linux_is_vmhwm():
    status = open("/proc/self/status").read()
    kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert machine.peak_rss_mb() == pytest.approx(kib / 1024, rel=0.05)  # may grow a little in between


def test_release_memory_hands_freed_heap_back():
    """Freed blocks below malloc's mmap threshold stay resident in its heap (the last one pins its
    top) until release_memory trims it: what the torch comparison leaves behind before llama.cpp runs."""
    def anonymous_mb():
        status = open("/proc/self/status").read()
        return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1]) / 1024

    blocks = [bytearray(100_000) for _ in range(2000)]  # 200 MB of 100 kB blocks, each written (zeroed)
    last = blocks[-1]
    held = anonymous_mb()
    del blocks
    freed = anonymous_mb()
    machine.release_memory()
    assert held - freed < 20 and freed - anonymous_mb() > 150, (held, freed, anonymous_mb())
    assert len(last) == 100_000


@pytest.mark.parametrize("platform, maxrss", [("darwin", 300 * 2**20),  # macOS: bytes
                                              ("freebsd14", 300 * 1024)])  # Linux without /proc, the BSDs: KiB
def test_peak_rss_without_proc_reads_ru_maxrss_in_the_platforms_unit(monkeypatch, platform, maxrss):
    class NoProc(type(machine.Path())):
        def read_text(self, *a, **k):
            raise FileNotFoundError(str(self))

    monkeypatch.setattr(machine, "Path", NoProc)
    monkeypatch.setattr(machine.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert machine.peak_rss_mb() == 300


def test_one_device_vocabulary():
    assert machine.torch_device("metal") == "mps" and machine.device_name("mps") == "metal"
    assert [machine.device_name(machine.torch_device(d)) for d in machine.DEVICES] == list(machine.DEVICES)
    assert TrainConfig(data="x.jsonl", device="mps").resolved().device == "metal"  # an older run's config.yaml
    with pytest.raises(EdgeloraError, match="device.*must be auto, cpu, cuda or metal"):
        TrainConfig(data="x.jsonl", device="gpu").resolved()
