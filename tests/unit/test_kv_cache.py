"""Block pool and KV cache manager: allocation, freeing, prefix hits, LRU eviction."""

from tokenmill.engine.kv_cache import BlockPool, KVCacheManager, hash_block
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(), frozenset({0}), 1024, cache_salt=salt)


def test_hash_chains_parent_and_salt():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], "tenant-a") != a


def test_pool_allocates_and_frees_in_lru_order():
    pool = BlockPool(4)
    first = pool.allocate(2)
    assert [b.block_id for b in first] == [0, 1]
    assert pool.num_free_blocks == 2
    pool.free(first[::-1])
    assert pool.num_free_blocks == 4
    # 2 and 3 were never used, then 1 and 0 were freed in that order
    assert [b.block_id for b in pool.allocate(4)] == [2, 3, 1, 0]


def test_allocate_fails_without_change_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    request = make_request("a", list(range(10)))
    assert kv.allocate(request, 10)  # 3 blocks
    other = make_request("b", [1])
    assert not kv.allocate(other, 1)
    assert kv.pool.num_free_blocks == 0
    kv.free(request)
    assert kv.pool.num_free_blocks == 3


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    first = make_request("a", list(range(9)))
    kv.allocate(first, 9)
    first.num_computed_tokens = 9
    kv.cache_full_blocks(first)
    kv.free(first)
    again = make_request("b", list(range(9)))
    cached = kv.find_cached_prefix(again)
    assert len(cached) == 2  # the two full blocks; token 8 is computed again
    exact = make_request("c", list(range(8)))
    assert len(kv.find_cached_prefix(exact)) == 1  # never the whole prompt
    assert kv.allocate(again, 1, cached)
    assert list(kv.block_ids(again)[:2]) == [b.block_id for b in cached]


def test_salt_isolates_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    first = make_request("a", list(range(9)), salt="x")
    kv.allocate(first, 9)
    first.num_computed_tokens = 9
    kv.cache_full_blocks(first)
    assert kv.find_cached_prefix(make_request("b", list(range(9)), salt="y")) == []
    assert len(kv.find_cached_prefix(make_request("c", list(range(9)), salt="x"))) == 2


def test_shared_blocks_are_refcounted_and_evicted_last():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    first = make_request("a", list(range(5)))
    kv.allocate(first, 5)
    first.num_computed_tokens = 5
    kv.cache_full_blocks(first)
    second = make_request("b", list(range(5)))
    cached = kv.find_cached_prefix(second)
    assert kv.allocate(second, 1, cached)
    shared = cached[0]
    assert shared.ref_count == 2
    kv.free(first)
    assert shared.ref_count == 1 and kv.pool.num_free_blocks == 2
    kv.free(second)
    assert kv.pool.num_free_blocks == 4
    # the freed tail blocks are reused before the shared prefix block
    assert shared not in kv.pool.allocate(2)
    assert kv.pool.lookup(shared.block_hash, [0, 1, 2, 3]) is shared


def test_evicted_block_loses_its_hash():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    first = make_request("a", list(range(5)))
    kv.allocate(first, 5)
    first.num_computed_tokens = 5
    kv.cache_full_blocks(first)
    kv.free(first)
    kv.pool.allocate(2)
    assert kv.find_cached_prefix(make_request("b", list(range(5)))) == []


def test_a_hash_collision_is_never_a_hit(monkeypatch):
    """Even if two blocks' hashes collided, a hit must hold the request's own tokens."""
    import tokenmill.engine.kv_cache as kv_cache

    monkeypatch.setattr(
        kv_cache, "hash_block", lambda parent, tokens, salt=None, images=(): b"same"
    )
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    first = make_request("a", [1, 2, 3, 4, 5])
    assert kv.allocate(first, 5)
    first.num_computed_tokens = 5
    kv.cache_full_blocks(first)
    kv.free(first)
    same = make_request("b", [1, 2, 3, 4, 9])
    assert len(kv.find_cached_prefix(same)) == 1
    forged = make_request("c", [7, 7, 7, 7, 9])  # same (forged) hash, other tokens
    assert kv.find_cached_prefix(forged) == []


def test_blocks_behind_a_sliding_window_are_freed_and_stay_cached():
    """Window 6, blocks of 4: once 14 tokens are computed, the next token (position 14)
    reads keys 9..14, so blocks 0 and 1 (tokens 0..7) are freed, holes in the table; they
    stay registered, so a request with the same prefix still hits them."""
    from tokenmill.engine.kv_cache import NO_BLOCK

    kv = KVCacheManager(num_blocks=8, block_size=BS, kv_window=6)
    request = make_request("a", list(range(14)))
    assert kv.allocate(request, 14)  # blocks 0..3
    held = list(kv.block_ids(request))
    request.num_computed_tokens = 14
    kv.cache_full_blocks(request)
    request.append_token(99)
    assert kv.allocate(request, 1)
    assert list(kv.block_ids(request)) == [NO_BLOCK, NO_BLOCK, *held[2:]]
    assert kv.pool.num_free_blocks == 8 - 2
    other = make_request("b", list(range(14)))
    assert [b.block_id for b in kv.find_cached_prefix(other)] == held[:3]
    kv.free(request)
    assert kv.pool.num_free_blocks == 8


def test_without_a_window_nothing_is_freed_early():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    request = make_request("a", list(range(14)))
    assert kv.allocate(request, 14)
    request.num_computed_tokens = 14
    request.append_token(99)
    assert kv.allocate(request, 1)
    assert kv.pool.num_free_blocks == 4
