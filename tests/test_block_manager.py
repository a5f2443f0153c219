import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix.core.block_manager import BlockManager, BlockManagerError, blocks_for


def test_allocate_append_free_exact_accounting():
    bm = BlockManager(num_blocks=10, block_size=16, watermark=0.0)
    assert bm.allocate("a", 17) and bm.num_blocks_of("a") == 2
    assert bm.append_slot("a", 32) is None  # still fits in 2 blocks
    assert bm.append_slot("a", 33) is not None and bm.num_blocks_of("a") == 3
    assert bm.num_free_blocks == 7
    assert bm.free("a") == 3 and bm.num_free_blocks == 10
    assert bm.free("a") == 0
    bm.check()


def test_watermark_applies_to_admission_not_appends():
    bm = BlockManager(num_blocks=100, block_size=16, watermark=0.05)  # 5 blocks kept back
    assert bm.watermark_blocks == 5
    assert bm.can_allocate(95 * 16)
    assert not bm.can_allocate(95 * 16 + 1)
    bm.allocate("a", 95 * 16)
    # appends may eat into the watermark until the pool is empty
    for i in range(5):
        assert bm.can_append_slot()
        bm.append_slot("a", 95 * 16 + 1 + 16 * i)
    assert not bm.can_append_slot()
    with pytest.raises(BlockManagerError):
        bm.append_slot("a", 100 * 16 + 1)


def test_errors_on_misuse():
    bm = BlockManager(4, 16, 0.0)
    bm.allocate("a", 1)
    with pytest.raises(BlockManagerError):
        bm.allocate("a", 1)
    with pytest.raises(BlockManagerError):
        bm.allocate_blocks("b", 10)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0)


def test_rename_hands_over_table():
    bm = BlockManager(8, 16, 0.0)
    ids = bm.allocate_blocks(("m", 1), 3)
    bm.rename(("m", 1), 42)
    assert bm.table(42) == ids and bm.num_blocks_of(("m", 1)) == 0
    bm.check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "append", "free"]), st.integers(0, 5), st.integers(1, 80)),
                max_size=80))
def test_random_operations_never_leak(ops):
    bm = BlockManager(32, 16, 0.0)
    lens: dict[int, int] = {}
    for op, owner, n in ops:
        if op == "alloc" and owner not in lens and bm.can_allocate(n):
            bm.allocate(owner, n)
            lens[owner] = n
        elif op == "append" and owner in lens and bm.can_append_slot():
            lens[owner] += 1
            bm.append_slot(owner, lens[owner])
        elif op == "free" and owner in lens:
            bm.free(owner)
            del lens[owner]
        bm.check()
        assert bm.num_used_blocks == sum(blocks_for(v, 16) for v in lens.values())
    for owner in list(lens):
        bm.free(owner)
    assert bm.num_free_blocks == 32
