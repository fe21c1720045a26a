from hypothesis import given
from hypothesis import strategies as st

from stalwart.layout import ALIGN, ParameterLayout


@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=12), shards=st.integers(1, 16))
def test_shards_tile_the_vector(sizes, shards):
    layout = ParameterLayout((f"p{i}", (n,)) for i, n in enumerate(sizes))
    if layout.total < shards:
        return
    bounds = layout.shard_bounds(shards)
    assert bounds[0] == 0 and bounds[-1] == layout.total
    assert all(a < b for a, b in zip(bounds, bounds[1:]))  # contiguous, disjoint, none empty
    if layout.total >= shards * ALIGN * 4:
        sizes_ = layout.shard_sizes(shards)
        assert max(sizes_) - min(sizes_) <= 2 * ALIGN  # balanced to the alignment
        assert all(b % ALIGN == 0 for b in bounds[:-1])


def test_entries_lie_end_to_end():
    layout = ParameterLayout([("w", (3, 4)), ("b", (4,))])
    assert [(e.name, e.offset, e.numel) for e in layout.entries] == [("w", 0, 12), ("b", 12, 4)]
    assert layout.total == 16
