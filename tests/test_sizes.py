"""Sizes as people write them (edgelora.sizes): --target-size, max_memory."""
import pytest

from edgelora.errors import EdgeloraError
from edgelora.sizes import parse_size


@pytest.mark.parametrize("text, size", [("70MB", 70_000_000), ("64MiB", 64 << 20), ("1.5 GB", 1_500_000_000),
                                        ("123456", 123456), ("512kib", 512 << 10), ("2M", 2_000_000)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_bad_size_is_one_line():
    with pytest.raises(EdgeloraError, match="--target-size 'big': give a size such as 70MB"):
        parse_size("big")
