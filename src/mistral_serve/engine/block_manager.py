"""BlockManager: the paged KV cache's bookkeeping, with a prefix cache. Pure Python, no tensors.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns the blocks listed in
its block table. A block that is full is identified by a hash of its tokens and of every token
before it, so two sequences with the same prefix can share the block (reference counted).

Free blocks wait in least-recently-freed order; a free block keeps its hash until it is reused,
so a prompt seen a moment ago is still found in the cache.
"""

from __future__ import annotations

from collections import OrderedDict

from mistral_serve.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # prefix cache

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks that hold a prefix of seq. No side effects.

        At least the last token is left out: its forward pass gives the logits to sample from."""
        if not self.enable_prefix_caching:
            return []
        self._may_hash_full_blocks(seq, seq.num_tokens - 1)
        found = []
        for i, block_hash in enumerate(seq.block_hashes[:(seq.num_tokens - 1) // self.block_size]):
            block_id = self.hash_to_block_id.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(seq, i):
                break
            found.append(block_id)
        return found

    def _may_hash_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        for i in range(len(seq.block_hashes), num_tokens // self.block_size):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(chain_hash(parent, self._block_tokens(seq, i)))

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly computed full blocks so that others can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._may_hash_full_blocks(seq, seq.num_computed_tokens)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            block_hash = seq.block_hashes[i]
            block.hash, block.token_ids = block_hash, self._block_tokens(seq, i)
            self.hash_to_block_id.setdefault(block_hash, block.block_id)

    # allocation

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        return self._num_blocks_needed(seq, num_new_tokens, cached_block_ids) <= self.num_free_blocks

    def _num_blocks_needed(self, seq: Sequence, num_new_tokens: int, cached_block_ids) -> int:
        num_held = len(seq.block_table) + len(cached_block_ids)
        num_computed = max(seq.num_computed_tokens, len(cached_block_ids) * self.block_size)
        new_blocks = max(0, self.num_blocks_for(num_computed + num_new_tokens) - num_held)
        # a cached block that nobody holds is taken out of the free list too
        revived = sum(1 for block_id in cached_block_ids if self.blocks[block_id].ref_count == 0)
        return new_blocks + revived

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Give seq the blocks to hold num_new_tokens more tokens, after taking the cached prefix.

        Returns False, changing nothing, when there are not enough free blocks."""
        if not self.can_allocate(seq, num_new_tokens, cached_block_ids):
            return False
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        num_computed = max(seq.num_computed_tokens, len(cached_block_ids) * self.block_size)
        while len(seq.block_table) < self.num_blocks_for(num_computed + num_new_tokens):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its old contents from the prefix cache
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. The last blocks go back first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:  # nothing worth keeping: reuse it before cached blocks
                    self.free_block_ids[block_id] = None
                    self.free_block_ids.move_to_end(block_id, last=False)
                else:
                    self.free_block_ids[block_id] = None
        seq.block_table = []
