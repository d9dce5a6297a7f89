"""Scheduler scenarios with a fake runner: budget, chunked prefill, preemption, aborts."""

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams

BS = 4


def make(rid: str, num_prompt: int, max_tokens: int = 4) -> Request:
    return Request(
        rid,
        list(range(1, num_prompt + 1)),
        SamplingParams(max_tokens=max_tokens),
        frozenset({0}),
        10_000,
    )


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {x.request.request_id: [token] for x in out.scheduled if x.samples}
    s.update(out, sampled)
    return out


def test_decodes_first_then_prefill_chunks_within_budget():
    s = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), KVCacheManager(64, BS)
    )
    a, b = make("a", 6), make("b", 9)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6), ("b", 4)]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0  # b's prompt is chunked
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 5)]
    assert b.num_output_tokens == 1


def test_max_num_seqs_caps_running():
    s = Scheduler(
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), KVCacheManager(64, BS)
    )
    for i in range(3):
        s.add(make(str(i), 3))
    out = run_step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_finished_requests_free_blocks():
    kv = KVCacheManager(16, BS)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), kv)
    r = make("a", 5, max_tokens=3)
    s.add(r)
    while s.has_unfinished:
        run_step(s)
    assert r.finish_reason == "length" and r.num_output_tokens == 3
    assert kv.pool.num_free_blocks == 16


def test_eos_stops_and_min_tokens_delays_it():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), KVCacheManager(16, BS))
    r = make("a", 3, max_tokens=10)
    s.add(r)
    run_step(s, token=0)
    assert r.finish_reason == "stop" and r.num_output_tokens == 1


def test_preemption_recomputes_newest_and_everything_completes():
    kv = KVCacheManager(6, BS)  # 24 token slots for two requests that want 2 x 16
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    a, b = make("a", 8, max_tokens=8), make("b", 8, max_tokens=8)
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(100):
        if not s.has_unfinished:
            break
        preempted += [r.request_id for r in run_step(s).preempted]
    assert preempted and preempted[0] == "b"  # the newest goes first
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert s.num_preemptions >= 1
    assert kv.pool.num_free_blocks == 6


def test_abort_while_waiting_and_running_frees_blocks():
    kv = KVCacheManager(16, BS)
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=2048), kv)
    a, b = make("a", 5), make("b", 5)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(b, "abort")
    s.finish(a, "abort")
    assert a.status is RequestStatus.FINISHED and b.finish_reason == "abort"
    assert not s.has_unfinished and kv.pool.num_free_blocks == 16


def test_prefix_hit_skips_cached_tokens():
    kv = KVCacheManager(32, BS)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), kv)
    a = make("a", 13, max_tokens=1)
    s.add(a)
    while s.has_unfinished:
        run_step(s)
    b = make("b", 13, max_tokens=1)
    s.add(b)
    out = run_step(s)
    assert b.num_cached_tokens == 12 and out.scheduled[0].num_new_tokens == 1


def test_the_default_step_budget_depends_on_the_device():
    from tokenmill.config import default_batched_tokens

    assert SchedulerConfig().max_num_batched_tokens is None  # resolved by the engine
    assert default_batched_tokens("cpu") == 512
    assert default_batched_tokens("cuda") == 2048


# -- scheduling policies -------------------------------------------------------------------


def prioritized(rid: str, priority: int, num_prompt: int = 3, max_tokens: int = 2) -> Request:
    request = make(rid, num_prompt, max_tokens)
    request.priority = priority
    return request


def admission_order(policy: str, priorities: list[int]) -> list[str]:
    """The order requests first run in when only one runs at a time."""
    config = SchedulerConfig(
        max_num_seqs=1,
        max_num_batched_tokens=2048,
        scheduling_policy=policy,  # type: ignore[arg-type]
    )
    s = Scheduler(config, KVCacheManager(64, BS))
    for i, priority in enumerate(priorities):
        s.add(prioritized(f"r{i}", priority))
    order: list[str] = []
    while s.has_unfinished:
        for item in run_step(s).scheduled:
            if item.request.request_id not in order:
                order.append(item.request.request_id)
    return order


def test_priority_policy_admits_by_priority_then_arrival() -> None:
    assert admission_order("priority", [2, 0, 1, 0, -1]) == ["r4", "r1", "r3", "r2", "r0"]


def test_fcfs_admits_in_arrival_order_whatever_the_priorities() -> None:
    assert admission_order("fcfs", [2, 0, 1, 0, -1]) == ["r0", "r1", "r2", "r3", "r4"]


def pressured(policy: str, priority_a: int, priority_b: int) -> tuple[Scheduler, Request, Request]:
    """a (5-token prompt) and b (8) fill the 4 KV blocks after one step; then a's next token
    fits its second block and b's needs a third."""
    config = SchedulerConfig(max_num_batched_tokens=64, scheduling_policy=policy)  # type: ignore[arg-type]
    s = Scheduler(config, KVCacheManager(4, BS))
    a, b = prioritized("a", priority_a, 5, 8), prioritized("b", priority_b, 8, 8)
    s.add(a)
    s.add(b)
    run_step(s)
    assert a.num_tokens == 6 and b.num_tokens == 9
    return s, a, b


def test_fcfs_preempts_the_newest_running_request() -> None:
    s, a, b = pressured("fcfs", 0, 0)
    out = run_step(s)
    assert [x.request for x in out.scheduled] == [a] and out.preempted == [b]


def test_priority_preempts_the_least_urgent_even_if_already_scheduled_this_step() -> None:
    s, a, b = pressured("priority", 1, 0)  # a arrived first but is less urgent
    out = run_step(s)
    # a was scheduled before b ran out of blocks: it is taken out of the step again
    assert [x.request for x in out.scheduled] == [b] and out.preempted == [a]
    assert out.num_batched_tokens == 1 and a.status is RequestStatus.PREEMPTED
    while s.has_unfinished:
        run_step(s)
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert s.kv_cache.pool.num_free_blocks == 4


def test_priority_ties_preempt_the_later_arrival() -> None:
    s, a, b = pressured("priority", 0, 0)
    out = run_step(s)
    assert out.preempted == [b]


def test_a_preempted_request_waits_by_its_key() -> None:
    from tokenmill.engine.request_queue import PriorityQueue

    queue = PriorityQueue()
    early, late, urgent = prioritized("early", 1), prioritized("late", 1), prioritized("u", 0)
    for request in (early, late, urgent):
        queue.add(request)
    assert [queue.pop(), queue.pop()] == [urgent, early]
    queue.add_preempted(early)  # back ahead of `late`, which arrived after it
    assert list(queue) == [early, late] and queue.peek() is early
    queue.remove(early)
    queue.forget(early)
    assert list(queue) == [late] and early not in queue and late in queue


def test_a_request_ends_at_the_context_it_is_admitted_to() -> None:
    """The engine sets its own context on admission; the length check follows it."""
    request = make("r", 6, max_tokens=100)  # made with a context of 10,000
    request.set_max_model_len(8)  # as EngineCore.add_request does
    request.token_ids.append(7)
    assert not request.check_stop()  # 7 tokens of 8
    request.token_ids.append(7)
    assert request.check_stop() and request.finish_reason == "length"


def test_each_step_counts_its_tokens_into_vllms_buckets():
    """vllm:iteration_tokens_total: a 6-token prompt and a 9-token one chunked at 10, then
    decodes; a step that schedules nothing counts nothing."""
    from tokenmill.engine.step_stats import STEP_TOKEN_BUCKETS, StepTokenCounter

    s = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), KVCacheManager(64, BS)
    )
    s.add(make("a", 6, max_tokens=3))
    s.add(make("b", 9, max_tokens=3))
    per_step = []
    while s.has_unfinished:
        per_step.append(run_step(s).num_batched_tokens)
    assert per_step == [10, 6, 2, 1]  # a 6 + b 4; a 1 + b 5; a 1 + b 1; b 1
    s.schedule()  # nothing left to run
    steps = s.step_tokens.snapshot()
    assert steps.num_steps == 4 and steps.total_tokens == 19
    at_most = dict(zip(STEP_TOKEN_BUCKETS, steps.cumulative, strict=False))
    assert (at_most[1], at_most[8], at_most[16]) == (1, 3, 4)
    assert steps.cumulative[-1] == at_most[16384] == 4
    counter = StepTokenCounter()
    counter.observe(20000)  # past the last bucket: only in +Inf
    assert counter.snapshot().cumulative == (0,) * len(STEP_TOKEN_BUCKETS) + (1,)
