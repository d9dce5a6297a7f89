"""Prompt lookup: guess the next tokens as the continuation of an earlier occurrence of
the sequence's last n tokens (in the prompt or the output so far)."""

from __future__ import annotations

import numpy as np


def propose(token_ids: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens,
    for the largest n in [min_n, max_n] that occurs earlier; [] when none does.

    One vectorised pass finds the earlier places of the last token; each is then
    extended backwards while it matches, longest (then latest) first.
    """
    length = len(token_ids)
    if length <= min_n:
        return []
    ends = np.flatnonzero(token_ids[: length - 1] == token_ids[length - 1])
    if not ends.size:
        return []
    ids = token_ids.tolist() if ends.size > 8 else token_ids
    best_n, best_end = 0, -1
    for end in ends[::-1].tolist():  # latest first: a later one wins a tie
        n = 1
        while n < max_n and end - n >= 0 and ids[end - n] == ids[length - 1 - n]:
            n += 1
        if n > best_n:
            best_n, best_end = n, end
            if n == max_n:
                break
    if best_n < min_n:
        return []
    return token_ids[best_end + 1 : best_end + 1 + k].tolist()
