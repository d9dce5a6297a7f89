"""Token bitmasks: int32 words, bit i of word j set = token 32*j+i allowed (xgrammar's layout)."""

from __future__ import annotations

import torch

_XGRAMMAR_CPU_DTYPES = (torch.float32, torch.bfloat16)  # what xgrammar's CPU kernel handles


def num_bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row: ceil(vocab_size / 32)."""
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask [num_rows, ceil(vocab_size/32)] with every token allowed."""
    return torch.full((num_rows, num_bitmask_words(vocab_size)), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set logits[r, t] = -inf where bit t of bitmask[r] is 0, for each r in `rows`; in place.

    logits: [B, V]; bitmask: [>= B, W] int32 (row r constrains logits row r); rows: CPU int
    tensor of row indices. Columns past 32*W are masked too. One batched op for all rows.
    """
    if rows.numel() == 0:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    if _can_use_xgrammar(logits, bitmask):
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows.tolist())
    else:
        apply_bitmask_torch(logits, bitmask, rows)


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """apply_bitmask in plain torch ops (any device and dtype): unpack the bits, masked_fill."""
    rows = rows.to(logits.device, dtype=torch.long)
    num_tokens = logits.shape[-1]
    allowed = unpack_bitmask(bitmask[rows], num_tokens)  # [R, V] bool
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def unpack_bitmask(words: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[R, W] int32 words -> [R, num_tokens] bool; tokens past 32*W are False."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    allowed = bits.reshape(words.shape[0], -1).bool()  # [R, 32*W]
    if allowed.shape[1] >= num_tokens:
        return allowed[:, :num_tokens]
    padding = allowed.new_zeros((words.shape[0], num_tokens - allowed.shape[1]))
    return torch.cat([allowed, padding], dim=1)


def _can_use_xgrammar(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """xgrammar's kernels: CUDA (Triton) or CPU float32/bfloat16, 2-D, mask as wide as logits."""
    if logits.dim() != 2 or 32 * bitmask.shape[-1] < logits.shape[-1]:
        return False
    if logits.device.type == "cuda":
        return True
    return logits.device.type == "cpu" and logits.dtype in _XGRAMMAR_CPU_DTYPES
