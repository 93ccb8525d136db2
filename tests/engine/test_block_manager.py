"""The block manager's accounting, without a model: what a request needs, reservations,
shared blocks and the block set aside."""

from gpt2serve.engine.kv_cache import BlockManager


def test_a_request_needs_its_prompt_blocks_now_and_reserves_its_growth():
    blocks = BlockManager(10, 8)
    # 20 prompt tokens: 3 blocks; 20 + 5 - 1 positions also fit 3; siblings copy the third
    assert blocks.need(20, 5, 1) == (3, 0)
    assert blocks.need(20, 5, 3) == (3, 2)
    assert blocks.need(20, 13, 1) == (3, 1)  # 32 positions: a fourth block, promised
    got = blocks.admit(3, 4)
    assert len(set(got)) == 3 and blocks.available == 10 - 3 - 4
    assert blocks.admit(4, 0) is None  # 3 free beyond the promise
    grown = blocks.grow()
    assert grown not in got and blocks.promised == 3 and blocks.available == 3


def test_shared_blocks_return_when_their_last_holder_releases_them():
    blocks = BlockManager(4, 8)
    table = blocks.admit(2, 0)
    blocks.share(table)
    blocks.release(table)
    assert blocks.available == 2
    blocks.release(table)
    assert blocks.available == 4


def test_a_block_set_aside_leaves_the_pool_for_good():
    blocks = BlockManager(4, 8)
    scratch = blocks.set_aside()
    assert blocks.num_blocks == 3 and blocks.available == 3
    assert scratch not in blocks.admit(3, 0)
