"""The configuration tree: model, cache, scheduler, structured outputs; built by the CLI or LLM()."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from tokenmill.errors import ModelLoadError

DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
# CPU weight formats (tokenmill/backends/formats.py says what each is and picks the default);
# "none" = the dtype's own weights
Quantization = Literal["gguf", "gguf-float32", "rtn", "fp16"]
QuantizationSetting = Literal["gguf", "gguf-float32", "rtn", "fp16", "none"]
KVCacheDtype = Literal["auto", "float16", "bfloat16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2"]
Device = Literal["auto", "cpu", "cuda"]
# how the model runs (tokenmill/backends): "auto" = the CPU backend (native kernels where
# they run) on a CPU, the CUDA backend (Triton paged attention) on a GPU; "torch" = the
# plain-torch reference anywhere
Backend = Literal["auto", "cpu", "cuda", "torch"]
# the grammar backends of tokenmill/structured (its BACKENDS registry; a unit test keeps them equal)
GuidedDecodingBackend = Literal["xgrammar", "outlines", "lm-format-enforcer"]
# fcfs: requests run in arrival order; priority: by (request priority, arrival), lower first
SchedulingPolicy = Literal["fcfs", "priority"]


@dataclass(slots=True)
class ModelConfig:
    """What to load and how."""

    model: str | None = None  # local HF dir, .gguf file, or cached hub name; None = bundled default
    dtype: DType = "auto"
    device: Device = "auto"
    backend: Backend = "auto"
    # CPU: threads for torch and the native kernels; None = torch's default capped at the
    # cgroup's CPU quota, lowered and raised by the kernels' pool as the CPU time the
    # process gets changes (kernels/parallel.h); a number pins it
    cpu_threads: int | None = None
    max_model_len: int | None = None  # tokens; None = the model's own context length
    chat_template: str | None = None  # a file path or the template text; overrides the model's
    seed: int = 0  # seed for requests that give none
    # the model's sampling defaults (engine/generation_config.py): "auto" = its
    # generation_config.json, "vllm" = none, else a directory holding one
    generation_config: str = "auto"
    max_logprobs: int = 20  # most logprobs/prompt_logprobs a request may ask for (vLLM's default)
    # the weight format (gguf, gguf-float32, rtn, fp16, none); None = the device's default.
    # What each is and which is the default: backends/formats.py.
    quantization: QuantizationSetting | None = None
    # how embeddings pool the last hidden states (vLLM's --pooler-config):
    # {"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": bool}; None = the model's
    # sentence-transformers config, else LAST, normalised (pooling_params.PoolerConfig)
    pooler_config: dict[str, Any] | None = None
    # a vision model's processor options for every image (vLLM's --mm-processor-kwargs, e.g.
    # Qwen2.5-VL's {"max_pixels": ...}); a request's mm_processor_kwargs add to them
    mm_processor_kwargs: dict[str, Any] | None = None
    # CUDA: decode steps replay CUDA graphs captured at load (backends/cuda_graphs.py),
    # unless enforce_eager; one per batch size of cuda_graph_sizes (vLLM's: one number N =
    # 1, 2, 4, 8, 16, ... N; several = those; None = up to min(2 * max_num_seqs, 512)),
    # for sequences of up to max_seq_len_to_capture tokens (longer ones run eagerly)
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None
    max_seq_len_to_capture: int = 8192


@dataclass(slots=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | None = None  # bytes; None = sized to the machine
    # auto: float16 with the CPU's GGUF default where the kernels read it, else the model's
    # dtype (backends/formats.py)
    kv_cache_dtype: KVCacheDtype = "auto"
    gpu_memory_utilization: float = 0.9  # CUDA only: share of GPU memory tokenmill may use
    enable_prefix_caching: bool = True


@dataclass(slots=True)
class SchedulerConfig:
    """The continuous-batching scheduler."""

    max_num_seqs: int = 256  # running requests per step
    # token budget per step (prefill chunks + decodes); None: by device (default_batched_tokens)
    max_num_batched_tokens: int | None = None
    # fcfs: arrival order, the newest running request is preempted first; priority: by
    # (priority, arrival), lower first, and the running request with the largest key is
    # preempted first (vLLM's --scheduling-policy)
    scheduling_policy: SchedulingPolicy = "fcfs"


def capture_sizes(setting: list[int] | None, max_num_seqs: int) -> list[int]:
    """The batch sizes of ModelConfig.cuda_graph_sizes (vLLM's --cuda-graph-sizes): none
    given, up to min(2 * max_num_seqs, 512); one number N, 1, 2, 4 and every multiple of 8 up
    to N; several, those sizes."""
    if setting is not None and any(size < 1 for size in setting):
        raise ModelLoadError(f"cuda_graph_sizes must be positive batch sizes, got {setting}")
    if setting is not None and len(setting) > 1:
        return sorted(set(setting))
    largest = setting[0] if setting else min(2 * max_num_seqs, 512)
    return [s for s in (1, 2, 4) if s <= largest] + list(range(8, largest + 1, 8))


def default_batched_tokens(device_type: str) -> int:
    """The step budget when none is set: 2048 tokens on GPUs (vLLM's); 512 on CPUs, where a
    2048-token prefill step takes seconds and every running stream waits it out: smaller
    chunks cut TTFT under a burst of prompts and cost no throughput (docs/benchmarks.md,
    "Prefill, TTFT and the step budget")."""
    return 512 if device_type == "cpu" else 2048


@dataclass(slots=True)
class StructuredOutputsConfig:
    """Structured outputs (guided decoding)."""

    guided_decoding_backend: GuidedDecodingBackend = "xgrammar"  # requests may pick another
    # reasoning models (tokenmill/tools/reasoning.py): "qwen3", "deepseek_r1" (the thought
    # between <think> and </think>; constraints apply after it); "none" = off; None = found
    # from the chat template
    reasoning_parser: str | None = None


# mp: processes on this machine; ray: Ray actors on a Ray cluster's nodes; external_launcher:
# every rank started by torchrun (or any env:// launcher), rank 0 serving
DistributedBackend = Literal["mp", "ray", "external_launcher"]


@dataclass(slots=True)
class ParallelConfig:
    """How many processes run the model (tokenmill/executor/multiproc.py)."""

    # ranks that each hold a shard of every layer's weights (Megatron-style), 1 = one process
    tensor_parallel_size: int = 1
    # ranks that each hold a run of the layers, the activations passed from one to the next
    pipeline_parallel_size: int = 1
    # engines (each with the whole model, in its own process) behind the one server; each
    # request goes to one of them (engine/router.py), 1 = the engine runs in the server
    data_parallel_size: int = 1
    # how the ranks start (vLLM's --distributed-executor-backend); None: mp
    distributed_executor_backend: DistributedBackend | None = None


@dataclass(slots=True)
class SpeculativeDecodingConfig:
    """Speculative decoding (tokenmill/spec_decode)."""

    # vLLM's --speculative-config: {"method": "ngram", "num_speculative_tokens": K,
    # "prompt_lookup_min": ..., "prompt_lookup_max": ...}; None = off
    speculative_config: dict[str, Any] | None = None


@dataclass(slots=True)
class EngineConfig:
    """The whole engine's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeDecodingConfig = field(default_factory=SpeculativeDecodingConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (LLM(...) and the CLI); unknown keys raise."""
        config = cls()
        sections = (
            config.model, config.cache, config.scheduler, config.structured_outputs,
            config.parallel, config.speculative,
        )  # fmt: skip
        for key, value in kwargs.items():
            if key == "dtype":  # vLLM's other names: "half", "float", torch.float16, ...
                value = str(value).removeprefix("torch.")
                value = DTYPE_ALIASES.get(value, value)
            for section in sections:
                if key in {f.name for f in fields(section)}:
                    setattr(section, key, value)
                    break
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return config
