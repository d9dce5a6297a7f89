"""The data-parallel router: least loaded first; a prompt whose prefix one engine holds
(half of it or more) goes there unless that engine is over the slack."""

from __future__ import annotations

from tokenmill.engine.router import PrefixAffinityRouter

BLOCK = 4


def router(engines: int = 2, slack: int = 2, capacity: int = 100) -> PrefixAffinityRouter:
    return PrefixAffinityRouter(engines, BLOCK, capacity, slack)


def route(r: PrefixAffinityRouter, prompt: list[int], loads: list[int], routed: list[int],
          salt: str | None = None) -> int:  # fmt: skip
    return r.route(r.block_hashes(prompt, salt), len(prompt), loads, routed)


def test_least_loaded_then_fewest_routed() -> None:
    r = router(3)
    assert route(r, [1, 2, 3, 4, 5], [2, 0, 1], [0, 0, 0]) == 1
    assert route(r, [9, 9, 9, 9, 9], [0, 0, 0], [5, 3, 4]) == 1


def test_a_long_shared_prefix_goes_where_it_is_cached() -> None:
    r = router()
    document = list(range(100, 132))  # 8 blocks
    first = route(r, document + [1, 2], [0, 0], [0, 0])
    # the other engine is idle, this one busier but within the slack: the cache wins
    loads = [0, 0]
    loads[first] = 2
    assert route(r, document + [3, 4, 5], loads, [1, 1]) == first
    # beyond the slack it goes to the least loaded after all
    loads[first] = 3
    assert route(r, document + [6], loads, [1, 1]) == 1 - first


def test_a_short_shared_header_does_not_pull_every_request() -> None:
    r = router()
    header = [7, 7, 7, 7]  # one block, as a chat template's start
    engines = [
        route(r, header + list(range(10 * k, 10 * k + 12)), [0, 0], [k % 2, (k + 1) % 2])
        for k in range(4)
    ]
    assert engines == [0, 1, 0, 1]


def test_the_cache_salt_separates_prefixes() -> None:
    r = router()
    document = list(range(32))
    first = route(r, document, [0, 0], [0, 0], salt="a")
    assert route(r, document, [0, 0], [1, 0] if first == 0 else [0, 1], salt="b") == 1 - first
    assert route(r, document, [0, 0], [1, 1], salt="a") == first


def test_an_engines_memory_is_bounded_by_its_cache() -> None:
    r = router(capacity=4)
    route(r, list(range(32)), [0, 0], [0, 0])
    assert max(len(c) for c in r.cached) == 4
