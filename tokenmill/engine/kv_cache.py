"""KV cache bookkeeping: the block pool, per-request block tables and prefix hashes (no torch).

The KV tensors themselves live in the worker (worker/worker.py); this module only decides
which block holds which tokens.

    request tokens:  [t0 .. t15][t16 .. t31][t32 .. t40 ....]
    block table:      block 7    block 2    block 9 (partial)
    block hashes:     h0=H(salt, t0..t15)   h1=H(h0, t16..t31)   (full blocks only)

A full block is registered under its chained hash, so a later request whose
prompt starts with the same tokens reuses it (prefix caching). Freed blocks keep
their hash in an LRU free queue and are evicted only when a new block is needed.

Where every layer of the model attends over a sliding window (`kv_window`), the blocks
of a request wholly behind the window of its next token are freed as it advances (they
stay cached for prefix hits until evicted); its table keeps a hole (`NO_BLOCK`) there,
which attention never reads.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from tokenmill.engine.request import Request
from tokenmill.multimodal.inputs import hashes_in

BlockHash = bytes
NO_BLOCK = 0  # a freed block's place in a block table: a valid id, never read


def hash_block(
    parent: BlockHash | None,
    token_ids: list[int],
    salt: str | None = None,
    images: tuple[str, ...] = (),
) -> BlockHash:
    """SHA-256 over the parent hash, the block's token ids and the hashes of the images
    whose tokens lie in it (their placeholder tokens alone do not tell two images apart):
    collisions are infeasible."""
    digest = hashlib.sha256(parent or (salt or "").encode())
    digest.update(array("q", token_ids).tobytes())
    for image in images:
        digest.update(image.encode())
    return digest.digest()


def _block_hash(request: Request, parent: BlockHash | None, index: int, size: int) -> BlockHash:
    """The chained hash of the request's block `index` (full blocks only)."""
    start = index * size
    tokens = request.token_ids[start : start + size]
    images = hashes_in(request.images, start, start + size) if request.images else ()
    return hash_block(parent, tokens, request.cache_salt, images)


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and registered
    token_ids: tuple[int, ...] = ()  # what it holds, once registered: a hit must match them


class BlockPool:
    """All blocks; free ones in LRU order (evict from the front), full ones findable by hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[BlockHash, KVBlock] = {}
        self.enable_caching = enable_caching

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take blocks from the LRU front, evicting their cached hashes."""
        if num_blocks > len(self.free_queue):
            raise RuntimeError("allocate() beyond the free blocks; check num_free_blocks first")
        taken = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash, block.token_ids = None, ()
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks (removing free ones from the free queue)."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop a reference; blocks nobody holds go to the back of the free queue.

        Callers pass a request's blocks in reverse so its tail is evicted before its
        prefix, which is the part other requests are likely to share.
        """
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def lookup(self, block_hash: BlockHash, token_ids: list[int]) -> KVBlock | None:
        """The cached block under this hash, confirmed to hold exactly these tokens."""
        block = self.cached.get(block_hash) if self.enable_caching else None
        if block is not None and block.token_ids != tuple(token_ids):
            return None  # a hash collision (never seen with SHA-256): recompute, never share
        return block

    def register(self, block: KVBlock, block_hash: BlockHash, token_ids: list[int]) -> None:
        if self.enable_caching and block.block_hash is None:
            block.block_hash, block.token_ids = block_hash, tuple(token_ids)
            self.cached.setdefault(block_hash, block)


@dataclass(slots=True)
class _RequestBlocks:
    blocks: list[KVBlock | None] = field(default_factory=list)  # None: freed, behind the window
    # of `blocks`, NO_BLOCK for None; an int64 array, which the runner copies into its
    # tensors as bytes
    block_ids: array[int] = field(default_factory=lambda: array("q"))
    num_freed: int = 0  # blocks [0, num_freed) are None
    hashes: list[BlockHash] = field(default_factory=list)  # of the full blocks, in order


class KVCacheManager:
    """Gives each request the blocks its tokens need and shares full prefix blocks."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        kv_window: int | None = None,  # keys a token may attend at most, where all layers slide
    ):
        self.block_size = block_size
        self.kv_window = kv_window
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._requests: dict[str, _RequestBlocks] = {}

    def block_ids(self, request: Request) -> array[int]:
        """The request's block table now (int64; a copy of the one kept up to date as it
        changes)."""
        return self._requests[request.request_id].block_ids[:]

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of cached full blocks at the start of the request's tokens.

        At least one token is always left to compute, so the last prompt token's
        logits exist to sample from.
        """
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: list[KVBlock] = []
        parent: BlockHash | None = None
        for i in range(max_blocks):
            tokens = request.token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = _block_hash(request, parent, i, self.block_size)
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            found.append(block)
        return found

    def table_after(self, request: Request, num_new_tokens: int) -> array[int] | None:
        """allocate() for a running request, then its block table; None (and nothing taken)
        when blocks run out. The table is the one kept up to date, not a copy: it holds
        until the request's next allocate() or free() (a step runs between two schedules)."""
        if not self.allocate(request, num_new_tokens):
            return None
        return self._requests[request.request_id].block_ids

    def allocate(
        self, request: Request, num_new_tokens: int, cached: list[KVBlock] | None = None
    ) -> bool:
        """Make room for num_new_tokens more tokens; False (and nothing taken) when blocks run
        out. Blocks behind a sliding window are freed either way."""
        entry = self._requests.get(request.request_id)
        if entry is not None:
            needed = request.num_computed_tokens + num_new_tokens
            if self.kv_window is None and needed <= len(entry.blocks) * self.block_size:
                return True  # (most decode steps: the last block has room)
            self._free_behind_window(request, entry)
        cached = cached or []
        num_held = len(entry.blocks) if entry else len(cached)
        num_cached_tokens = len(cached) * self.block_size
        num_needed = -(
            -(request.num_computed_tokens + num_cached_tokens + num_new_tokens) // self.block_size
        )
        num_new_blocks = max(0, num_needed - num_held)
        evictable_cached = sum(1 for b in cached if b.ref_count == 0)
        if num_new_blocks + evictable_cached > self.pool.num_free_blocks:
            return False
        if entry is None:
            entry = self._requests[request.request_id] = _RequestBlocks()
            self.pool.touch(cached)
            entry.blocks.extend(cached)
            entry.block_ids.extend(b.block_id for b in cached)
            entry.hashes.extend(b.block_hash for b in cached if b.block_hash is not None)
        new_blocks = self.pool.allocate(num_new_blocks)
        entry.blocks.extend(new_blocks)
        entry.block_ids.extend(b.block_id for b in new_blocks)
        return True

    def _free_behind_window(self, request: Request, entry: _RequestBlocks) -> None:
        """Free the blocks wholly before the window of the request's next token (their
        tokens are computed and registered; no layer reads them again)."""
        if self.kv_window is None:
            return
        first_key = request.num_computed_tokens - self.kv_window + 1
        behind = max(0, first_key) // self.block_size
        freed = entry.blocks[entry.num_freed : behind]
        if freed:
            self.pool.free([b for b in reversed(freed) if b is not None])
            entry.blocks[entry.num_freed : behind] = [None] * len(freed)
            entry.block_ids[entry.num_freed : behind] = array("q", [NO_BLOCK] * len(freed))
            entry.num_freed = behind

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks under their chained hashes."""
        entry = self._requests[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        if num_full == len(entry.hashes):
            return  # (most steps: no block filled up)
        for i in range(len(entry.hashes), num_full):
            parent = entry.hashes[-1] if entry.hashes else None
            tokens = request.token_ids[i * self.block_size : (i + 1) * self.block_size]
            block_hash = _block_hash(request, parent, i, self.block_size)
            entry.hashes.append(block_hash)
            block = entry.blocks[i]
            if block is not None:  # (blocks are freed only once computed and registered)
                self.pool.register(block, block_hash, tokens)

    def free(self, request: Request) -> None:
        entry = self._requests.pop(request.request_id, None)
        if entry is not None:
            self.pool.free([b for b in reversed(entry.blocks) if b is not None])
