"""EngineCore: the step loop of one model — schedule, run the model, update requests."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from tokenmill.config import EngineConfig, capture_sizes, default_batched_tokens
from tokenmill.distributed.group import PeerError
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.outputs import FinishReason
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.errors import ModelLoadError
from tokenmill.executor.base import Executor, ModelInfo
from tokenmill.executor.multiproc import MultiprocExecutor
from tokenmill.executor.uniproc import UniprocExecutor
from tokenmill.model.config import text_config
from tokenmill.model.loader import ModelSource, load_model_source
from tokenmill.model.registry import model_class
from tokenmill.model.vision import VisionLanguageModel
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.speculator import Speculator
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.worker.inputs import ModelOutput, ScheduledSequence

logger = logging.getLogger(__name__)


class EngineCore:
    """Holds the scheduler, the KV cache's bookkeeping and the executor that runs the
    model; `step()` advances every running request."""

    def __init__(self, config: EngineConfig, source: ModelSource | None = None):
        started = time.perf_counter()
        self.config = config
        self.source = source or load_model_source(config.model.model)
        # one per engine: compiled grammars are cached here and shared by every request
        self.structured_outputs = StructuredOutputManager(
            self.source.tokenizer,
            int(text_config(self.source.hf_config)["vocab_size"]),
            config.structured_outputs.guided_decoding_backend,
        )
        spec = config.speculative.speculative_config
        self.spec_config = None if spec is None else SpeculativeConfig.from_dict(spec)
        draft = _draft_source(self.spec_config, self.source, config)
        self.executor = _executor(config, self.source, self.structured_outputs, draft)
        try:
            self._init_scheduling(config, started)
        except BaseException:
            self.executor.shutdown()  # its worker processes, if any
            raise

    def _init_scheduling(self, config: EngineConfig, started: float) -> None:
        self.info = self.executor.info
        scheduler_config = config.scheduler
        budget = scheduler_config.max_num_batched_tokens
        if budget is None:
            budget = default_batched_tokens(self.info.device.type)
            scheduler_config = replace(scheduler_config, max_num_batched_tokens=budget)
        self.max_model_len = self._resolve_max_model_len(budget)
        self.kv_cache = KVCacheManager(
            self.info.num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
            self.info.arch.kv_window,
        )
        spec = self.spec_config
        self.speculator = None if spec is None else Speculator(spec)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache, self.speculator)
        self.requests: dict[str, Request] = {}
        self._log_summary(time.perf_counter() - started)

    @property
    def vocab_size(self) -> int:
        return self.info.arch.vocab_size

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def add_request(self, request: Request) -> None:
        """Admit a request to the waiting queue (the engine's InputProcessor has checked its
        prompt against the context and the vocabulary)."""
        request.set_max_model_len(self.max_model_len)
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def shutdown(self) -> None:
        """Release the executor's workers (after the last step)."""
        self.executor.shutdown()

    def check_health(self) -> None:
        """Raise PeerError once a worker process is gone (the engine cannot step)."""
        self.executor.check_health()

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """End a request now (abort, or a stop string found after detokenizing)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request, reason)
            self.executor.forget(request_id)

    def step(self) -> list[Request]:
        """One engine step; returns the requests that got a token (finished ones included)."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        try:
            started = time.perf_counter()
            output = self.executor.execute(self.model_input(out))
            if self.speculator is not None and out.is_decode_only:
                self.speculator.observe_step(out.num_batched_tokens, time.perf_counter() - started)
            failed: list[Request] = []
        except PeerError:
            raise  # a rank is gone: no request can run any more
        except Exception:
            logger.exception(
                "engine step failed; retrying its %d requests one by one", len(out.scheduled)
            )
            output, failed = self._execute_one_by_one(out)
        if output.draft_token_ids and self.speculator is not None:
            self.speculator.offer(output.draft_token_ids)
        self._record_logprobs(output)
        self._record_pooled(output)
        changed = self.scheduler.update(out, output.sampled_token_ids) + failed
        changed += self._finish_pooled(out)
        for request in changed:
            if request.status is RequestStatus.FINISHED:  # (is_finished, inline: every request)
                self.requests.pop(request.request_id, None)
                self.executor.forget(request.request_id)
        return changed

    def model_input(self, out: SchedulerOutput) -> list[ScheduledSequence[Request]]:
        """The step as the executor takes it: each request's new tokens and KV blocks (the
        scheduler makes them in that form)."""
        return out.scheduled

    def logits_for(self, out: SchedulerOutput) -> torch.Tensor:
        """The float32 logits [N, V] a scheduled step's sampler would see; the step's
        requests do not advance (parity tests and benchmarks)."""
        return self.executor.logits_for(self.model_input(out))

    def _record_logprobs(self, output: ModelOutput) -> None:
        """Write the step's prompt and sample logprobs into their requests."""
        for request_id, entries in output.prompt_logprobs.items():
            self.requests[request_id].prompt_logprobs.extend(entries)
        for request_id, entries in output.logprobs.items():
            for entry in entries:
                self.requests[request_id].add_logprobs(entry)

    def _record_pooled(self, output: ModelOutput) -> None:
        """Add each embedding chunk's part to its request: MEAN sums its chunks (one at
        position 0 starts over: the request was preempted and is recomputed)."""
        for request_id, (start, part) in output.pooled.items():
            request = self.requests[request_id]
            if request.pooling_type == "MEAN" and start > 0 and request.pooled is not None:
                part = request.pooled + part
            request.pooled = part

    def _finish_pooled(self, out: SchedulerOutput) -> list[Request]:
        """Embedding requests whose last prompt token was computed this step: they are done."""
        done = []
        for item in out.scheduled:
            request = item.request
            if request.pooling_type is None or request.is_finished:
                continue
            if request.num_computed_tokens == request.num_tokens:
                self.scheduler.finish(request, "stop")
                done.append(request)
        return done

    def _execute_one_by_one(self, out: SchedulerOutput) -> tuple[ModelOutput, list[Request]]:
        """After a failed step: run each request alone, so only the ones that fail again
        (a poisoned input, a grammar backend error) are ended, with finish_reason "error".

        Re-running is safe: a step writes K/V only into the request's own slots for the
        same positions, and the scheduler has not advanced anything yet.
        """
        output = ModelOutput()
        failed: list[Request] = []
        for item in list(out.scheduled):
            request = item.request
            alone = SchedulerOutput(scheduled=[item])
            try:
                output.update(self.executor.execute(self.model_input(alone)))
            except PeerError:
                raise  # a rank is gone: no request can run any more
            except Exception as exc:
                logger.exception("request %s failed in the engine", request.request_id)
                out.scheduled.remove(item)
                request.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(request, "error")
                failed.append(request)
        return output, failed

    def _resolve_max_model_len(self, max_batched_tokens: int) -> int:
        limit = self.info.arch.max_context
        wanted = self.config.model.max_model_len
        if wanted is not None and wanted > limit:
            raise ModelLoadError(
                f"max_model_len {wanted} exceeds the model's context length {limit}"
            )
        block_size = self.config.cache.block_size
        capacity = self.info.num_blocks * block_size
        window = self.info.arch.kv_window
        if window is not None and capacity >= window + max_batched_tokens + 2 * block_size:
            # every layer slides: a sequence holds its window and one step's chunk at most
            capacity = limit
        if wanted is not None and wanted > capacity:
            raise ModelLoadError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len {wanted}; "
                "give it more memory (kv_cache_memory) or lower max_model_len"
            )
        if wanted is None and capacity < limit:
            logger.warning(
                "KV cache holds %d tokens; capping max_model_len from %d", capacity, limit
            )
            limit = capacity
        return wanted or limit

    def _log_summary(self, seconds: float) -> None:
        info = self.info
        logger.info(
            "Loaded %s: %s, %.1fM parameters%s, %s math on %s%s, weights %s, "
            "max_model_len %d, KV cache %d blocks x %d tokens (%.1f MiB, %s), in %.1f s",
            self.source.name,
            (self.source.hf_config.get("architectures") or ["?"])[0],
            info.num_parameters / 1e6,
            _rank_zero(info),
            str(info.dtype).removeprefix("torch."),
            info.device,
            f" ({info.cpu_threads})" if info.cpu_threads else "",
            info.quantization or "unquantized",
            self.max_model_len,
            info.num_blocks,
            self.config.cache.block_size,
            info.kv_cache_bytes / 2**20,
            str(info.kv_cache_dtype).removeprefix("torch."),
            seconds,
        )


def _rank_zero(info: ModelInfo) -> str:
    if info.tensor_parallel_size > 1:
        return f" (rank 0 of {info.tensor_parallel_size}, tensor parallel)"
    if info.pipeline_parallel_size > 1:
        return f" (stage 0 of {info.pipeline_parallel_size}, pipeline parallel)"
    return ""


def _draft_source(
    spec: SpeculativeConfig | None, target: ModelSource, config: EngineConfig
) -> tuple[ModelSource, str | None] | None:
    """A draft model's checkpoint and quantization, checked against the target's."""
    if spec is None or spec.model is None:
        return None
    parallel = config.parallel
    if max(parallel.tensor_parallel_size, parallel.pipeline_parallel_size) > 1:
        raise ModelLoadError(
            "speculative_config: a draft model runs with one worker; tensor and pipeline "
            "parallelism take ngram speculation"
        )
    draft = load_model_source(spec.model)
    for source in (target, draft):
        if issubclass(model_class(source.hf_config), VisionLanguageModel):
            raise ModelLoadError(
                f"speculative_config: {source.name} is a vision-language model; draft "
                "models speculate for text models"
            )
    if draft.tokenizer.hf.get_vocab() != target.tokenizer.hf.get_vocab():
        raise ModelLoadError(
            f"speculative_config: the draft model {spec.model} has another vocabulary "
            "than the model; its guesses would be other tokens"
        )
    return draft, spec.quantization


def _executor(
    config: EngineConfig,
    source: ModelSource,
    grammars: StructuredOutputManager,
    draft: tuple[ModelSource, str | None] | None = None,
) -> Executor:
    """One worker in this process, or a tensor- or pipeline-parallel group of processes."""
    parallel = config.parallel
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ModelLoadError(f"parallel sizes must be at least 1, got tensor {tp}, pipeline {pp}")
    if tp > 1 and pp > 1:
        raise ModelLoadError(
            "tensor and pipeline parallelism together are not supported yet: use one"
        )
    if parallel.data_parallel_size > 1:
        raise ModelLoadError(
            "data parallelism runs engine processes behind a server: "
            "tokenmill serve --data-parallel-size N"
        )
    size = max(tp, pp)
    if size == 1:  # whatever the backend: there are no other ranks to start
        sizes = capture_sizes(config.model.cuda_graph_sizes, config.scheduler.max_num_seqs)
        model = replace(config.model, cuda_graph_sizes=sizes)  # (resolved)
        return UniprocExecutor(model, config.cache, source, grammars, draft)
    return MultiprocExecutor(
        config.model, config.cache, source, grammars, size, pipeline=pp > 1,
        backend=parallel.distributed_executor_backend,
    )  # fmt: skip
