"""Sizes as people write them ('74MiB', '1.5GB'): export's --target-size, training's max_memory."""
from __future__ import annotations

import re

from .errors import EdgeloraError


def parse_size(text: str, what: str = "--target-size") -> int:
    """'70MB', '70 MiB', '1.5GB', '123456' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B?|B)?\s*", text, re.I)
    if not m:
        raise EdgeloraError(f"{what} {text!r}: give a size such as 70MB or 64MiB")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    return int(float(m.group(1)) * scale)
