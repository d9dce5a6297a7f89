"""--distributed-executor-backend ray: the follower ranks are Ray actors. A local Ray
cluster started here (two CPUs): tensor parallel over Ray computes what it does over local
processes, and a follower actor that dies fails the engine."""

from __future__ import annotations

import gc

import pytest
import ray

from tokenmill import LLM, SamplingParams
from tokenmill.distributed.group import PeerError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
PROMPTS = ["The weather today is", "Once upon a time"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    gc.collect()  # the tests' engines and their Ray handles go while Ray still runs
    ray.shutdown()


def entries(output) -> list[dict[int, float]]:
    return [{t: p.logprob for t, p in step.items()} for step in output.outputs[0].logprobs]


def test_tensor_parallel_over_ray_equals_local_processes(local_ray, tiny_hf_model_dir):
    directory = str(tiny_hf_model_dir("llama"))
    kwargs = dict(dtype="float32", device="cpu", kv_cache_memory=16 << 20, tensor_parallel_size=2)
    over_ray = LLM(directory, distributed_executor_backend="ray", **kwargs)
    executor = over_ray.engine.core.executor
    assert type(executor.followers).__name__ == "RayFollowers"
    got = over_ray.generate(PROMPTS, GREEDY)
    local = LLM(directory, **kwargs)
    want = local.generate(PROMPTS, GREEDY)
    local.engine.core.shutdown()
    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert entries(a) == entries(b)
    # an actor that dies: the next step fails, and the engine stays failed
    ray.kill(executor.followers.actors[0])
    with pytest.raises(PeerError):
        over_ray.generate(PROMPTS, GREEDY)
    with pytest.raises(PeerError):
        over_ray.engine.core.check_health()
    executor.shutdown()
