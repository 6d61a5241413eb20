"""Weight layouts of our CPU kernels (kernels.c): torch tensors in, the kernels' tiles out."""

from __future__ import annotations

import torch

# every kernel's weights lie in tiles of 32 output rows: out_features must be a multiple of it
TILE_ROWS = 32


def bf16_layout(weight: torch.Tensor) -> torch.Tensor:
    """bfloat16 (out, in) → the kernel's layout, (out / 32, in / 2, 2, 32): in each block of 16 rows,
    a pair of inputs of every row side by side. out must be a multiple of 32, in of 4."""
    out_features, in_features = weight.shape
    tiles, pairs = out_features // TILE_ROWS, in_features // 2
    # (tile, block, row, pair, input of the pair) → (tile, pair, block, row, input)
    return weight.reshape(tiles, 2, 16, pairs, 2).permute(0, 3, 1, 2, 4).contiguous().reshape(tiles, pairs, 2, 32)


def int8_layout(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (out, in) → the kernel's layout (int8 (out / 32, in / 4, 2, 64)) and each row's sum
    (out,) int32. out must be a multiple of 32, in of 4."""
    out_features, in_features = weight.shape
    tiles, quads = out_features // TILE_ROWS, in_features // 4
    # (tile, block, row, quad, input of the quad) → (tile, quad, block, row, input)
    tiled = weight.reshape(tiles, 2, 16, quads, 4).permute(0, 3, 1, 2, 4).contiguous().reshape(tiles, quads, 2, 64)
    return tiled, weight.sum(dim=1, dtype=torch.int32)


# torch's CPU int4 layout packs rows in blocks of 64 (another layout, not read here, when the rows
# are not a multiple of 64)
TORCH_INT4_ROW_BLOCK = 64


def int4_layout(torch_packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout (uint8 (out, in / 2), scales and zeros (in / group_size, out, 2), with
    weight = (q - 8) * scale + zero) → the kernel's: (uint8 (out / 32, in / 4, 2, 32), float32
    (out / 32, groups, 4, 16)). out must be a multiple of 64."""
    out_features, in_features = torch_packed.shape[0], torch_packed.shape[1] * 2
    q = unpack_torch_int4(torch_packed)  # (out, in) uint8 in 0..15
    tiles, blocks, quads = out_features // TILE_ROWS, TILE_ROWS // 16, in_features // 4
    # (tile, block, row, quad, low/high nibble, column of the pair): q[4p + 2 * half + column]
    q = q.reshape(tiles, blocks, 16, quads, 2, 2)
    packed = q[..., 0, :] | (q[..., 1, :] << 4)  # (tile, block, row, quad, column)
    packed = packed.permute(0, 3, 1, 2, 4).contiguous().reshape(tiles, quads, blocks, 32)
    scales, zeros = scales_and_zeros.float().unbind(-1)  # (groups, out) each
    # (q - 8) * scale + zero = (128 + q) * scale + (zero - 136 * scale)
    offsets = zeros - 136 * scales
    groups = scales.shape[0]
    by_tile = torch.stack((scales, offsets)).reshape(2, groups, tiles, blocks, 16)  # (kind, group, tile, block, row)
    scales_offsets = by_tile.permute(2, 1, 0, 3, 4).contiguous().reshape(tiles, groups, 2 * blocks, 16)
    return packed, scales_offsets


def unpack_torch_int4(torch_packed: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 layout → q (out, in) uint8. Blocks of 64 rows; in each, input k's 32 bytes
    hold rows 0..31 in their low nibbles and rows 32..63 in their high nibbles."""
    out_features, in_features = torch_packed.shape[0], torch_packed.shape[1] * 2
    if out_features % TORCH_INT4_ROW_BLOCK:
        raise ValueError(f"torch's int4 layout for {out_features} rows (not a multiple of 64) is not read here")
    by_block = torch_packed.reshape(out_features // TORCH_INT4_ROW_BLOCK, in_features, TORCH_INT4_ROW_BLOCK // 2)
    return torch.cat((by_block & 15, by_block >> 4), dim=2).transpose(1, 2).reshape(out_features, in_features)
