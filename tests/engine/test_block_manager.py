from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.params import SamplingParams
from mistral_serve.engine.sequence import Sequence


def make_seq(tokens, request_id="r"):
    return Sequence(request_id, 0, list(tokens), SamplingParams(), max_total_tokens=10_000)


def test_allocate_grows_block_table_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(10))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    seq.num_computed_tokens = 10
    seq.append_token(99)
    assert bm.allocate(seq, 1)  # 11 tokens still fit in 3 blocks
    assert len(seq.block_table) == 3
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_allocate_refuses_without_changing_anything_when_blocks_run_out():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(9))
    assert not bm.allocate(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_full_blocks_of_a_computed_prompt_are_shared_by_the_next_sequence():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(range(10), "a")
    bm.allocate(first, 10)
    first.num_computed_tokens = 10
    bm.cache_full_blocks(first)
    second = make_seq(list(range(8)) + [50, 51, 52], "b")
    cached = bm.find_cached_prefix(second)
    assert cached == first.block_table[:2]
    assert bm.allocate(second, second.num_tokens - 8, cached)
    assert second.block_table[:2] == first.block_table[:2]
    assert bm.blocks[cached[0]].ref_count == 2
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 8


def test_a_different_prefix_gets_no_hit_even_with_a_matching_later_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(first, 9)
    first.num_computed_tokens = 9
    bm.cache_full_blocks(first)
    other = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.find_cached_prefix(other) == []


def test_the_last_token_is_never_taken_from_the_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(range(8))
    bm.allocate(first, 8)
    first.num_computed_tokens = 8
    bm.cache_full_blocks(first)
    same = make_seq(range(8))
    assert len(bm.find_cached_prefix(same)) == 1  # 7 tokens may come from the cache: one block


def test_freed_cached_blocks_stay_findable_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    first = make_seq(range(9))
    bm.allocate(first, 9)
    first.num_computed_tokens = 9
    bm.cache_full_blocks(first)
    bm.free(first)
    assert bm.num_free_blocks == 4
    again = make_seq(range(9))
    cached = bm.find_cached_prefix(again)
    assert len(cached) == 2
    assert bm.allocate(again, 1, cached)
    assert bm.num_free_blocks == 1
    # a newcomer that needs every free block evicts the old contents
    bm.free(again)
    newcomer = make_seq(range(100, 116))
    assert bm.allocate(newcomer, 16)
    assert bm.find_cached_prefix(make_seq(range(9))) == []
