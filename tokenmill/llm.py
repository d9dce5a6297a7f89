"""The offline API, shaped like vLLM's: LLM(...).generate(), .chat() and .embed()."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import secrets
from collections.abc import Sequence
from typing import Any, Required, TypedDict

from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.outputs import PoolingRequestOutput, RequestOutput
from tokenmill.engine.scoring import ScoringRequestOutput, check_pairing, pair_scores
from tokenmill.errors import InvalidRequestError, RequestFailedError
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from tokenmill.vllm_options import check_vllm_options

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class BeamSearchSequence:
    """One beam of LLM.beam_search, as vLLM's: `tokens` and `text` hold the prompt's too."""

    tokens: list[int]
    logprobs: list[Any]
    cum_logprob: float
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass(slots=True)
class BeamSearchOutput:
    """A prompt's beams, best first."""

    sequences: list[BeamSearchSequence]


class TextPrompt(TypedDict, total=False):
    """vLLM's prompt dict of text (a plain dict works the same)."""

    prompt: Required[str]
    multi_modal_data: dict[str, Any]
    mm_processor_kwargs: dict[str, Any]


class TokensPrompt(TypedDict, total=False):
    """vLLM's prompt dict of token ids (a plain dict works the same)."""

    prompt_token_ids: Required[list[int]]
    multi_modal_data: dict[str, Any]
    mm_processor_kwargs: dict[str, Any]


Prompt = str | list[int] | dict[str, Any]  # (TextPrompt and TokensPrompt are such dicts)
Message = dict[str, Any]


class LLM:
    """Generate for many prompts at once on one engine (continuous batching underneath).

    `model` is a local HF directory, a .gguf file, a cached hub id, or None for the
    bundled SmolLM2-135M-Instruct. Other keyword arguments are EngineConfig fields
    (dtype, device, max_model_len, kv_cache_memory, max_num_seqs, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        if "seed" in kwargs and kwargs["seed"] is None:  # vLLM's: requests without one vary
            kwargs["seed"] = secrets.randbits(63)
        for warning in check_vllm_options(model, kwargs):
            logger.warning("%s", warning)
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self.llm_engine = self.engine  # (vLLM's name)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        self._prompts: dict[str, str | None] = {}  # request id -> prompt text, while generating

    def get_tokenizer(self) -> Any:
        """The Hugging Face tokenizer (apply_chat_template, eos_token_id, ...), as vLLM's."""
        return self.tokenizer.hf

    def get_default_sampling_params(self) -> SamplingParams:
        """The params generate() uses when given none: the model's generation_config.json
        defaults (unless generation_config="vllm"), else SamplingParams()."""
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order.

        A prompt is text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": ...};
        a dict may add {"multi_modal_data": {"image": PIL image or a list of them}}, one per
        image placeholder of the prompt (a vision model's, e.g. "<image>").
        `priority`: one per prompt, lower first (needs scheduling_policy="priority").
        """
        _no_lora(lora_request)
        batch = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.engine.default_sampling_params()
        params = _as_params_list(sampling_params, len(batch))
        priorities = [0] * len(batch) if priority is None else list(priority)
        if len(priorities) != len(batch):
            raise ValueError(f"got {len(priorities)} priorities for {len(batch)} prompts")
        request_ids = []
        results: dict[str, RequestOutput | PoolingRequestOutput] = {}
        for prompt, p, rank in zip(batch, params, priorities, strict=True):
            text, token_ids = self._tokenize(prompt)
            token_ids, images = self._with_images(prompt, token_ids)
            request_id = str(next(self._ids))
            request_ids.append(request_id)
            immediate = self.engine.add_request(
                request_id, token_ids, p, priority=rank, images=images
            )
            if immediate is not None:
                results[request_id] = immediate
            self._prompts[request_id] = text
        return self._run(request_ids, results, "Generating", use_tqdm)  # type: ignore[return-value]

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams,
        lora_request: Any = None,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search entry point: `params.beam_width` beams per prompt, best first,
        searched as SamplingParams(use_beam_search=True) searches (engine/beam_search.py)."""
        batch = _as_prompt_list(prompts)  # (one prompt alone too)
        outputs = self.generate(batch, params.sampling_params(), use_tqdm, lora_request)
        results = []
        for output in outputs:
            sequences = []
            for beam in output.outputs:
                tokens = list(output.prompt_token_ids) + list(beam.token_ids)
                sequences.append(BeamSearchSequence(
                    tokens, list(beam.logprobs or []), beam.cumulative_logprob or 0.0,
                    self.tokenizer.decode(tokens), beam.finish_reason, beam.stop_reason,
                ))  # fmt: skip
            results.append(BeamSearchOutput(sequences))
        return results

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
        *,
        truncate_prompt_tokens: int | None = None,
        lora_request: Any = None,
    ) -> list[PoolingRequestOutput]:
        """One embedding per prompt, in input order (`output.outputs.embedding`), pooled as the
        model's pooler config says; served by the same engine that generates."""
        _no_lora(lora_request)
        params = pooling_params or PoolingParams()
        if truncate_prompt_tokens is not None:
            params = dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
        self.engine.check_pooling_params(params)
        request_ids = []
        for prompt in _as_prompt_list(prompts):
            text, token_ids = self._tokenize(prompt)
            request_id = str(next(self._ids))
            request_ids.append(request_id)
            self.engine.add_pooling_request(request_id, token_ids, params)
            self._prompts[request_id] = text
        return self._run(request_ids, {}, "Embedding", use_tqdm)  # type: ignore[return-value]

    def encode(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
        *,
        truncate_prompt_tokens: int | None = None,
        lora_request: Any = None,
        pooling_task: str | None = None,
    ) -> list[PoolingRequestOutput]:
        """vLLM's name for pooling (`output.outputs.data`, a tensor): embed()'s vectors, the one
        pooling task served here (pooling_task None, "embed" or "encode")."""
        if pooling_task not in (None, "embed", "encode"):
            raise ValueError(
                f"pooling_task={pooling_task!r}: tokenmill's pooling serves embeddings only"
            )
        return self.embed(
            prompts, pooling_params, use_tqdm,
            truncate_prompt_tokens=truncate_prompt_tokens, lora_request=lora_request,
        )  # fmt: skip

    def score(
        self,
        data_1: Prompt | Sequence[Prompt],
        data_2: Prompt | Sequence[Prompt],
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
        lora_request: Any = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score with an embedding model: each pair's cosine similarity
        (`output.outputs.score`), data_1 one prompt against every data_2, or the two lists
        pairwise; each prompt embedded once. Cross-encoder models are not served."""
        firsts, seconds = _as_prompt_list(data_1), _as_prompt_list(data_2)
        check_pairing(len(firsts), len(seconds), "data_1")
        embedded = self.embed(
            [*firsts, *seconds], pooling_params, use_tqdm,
            truncate_prompt_tokens=truncate_prompt_tokens, lora_request=lora_request,
        )  # fmt: skip
        pad = self.tokenizer.hf.pad_token_id
        separator = [] if pad is None else [pad]
        return pair_scores(embedded[: len(firsts)], embedded[len(firsts) :], separator)

    def classify(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's classification entry point: not served here (the reason, not AttributeError)."""
        raise NotImplementedError(_NO_CLASSIFIERS)

    def reward(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's reward-model entry point: not served here."""
        raise NotImplementedError(_NO_CLASSIFIERS)

    def _run(
        self,
        request_ids: list[str],
        results: dict[str, RequestOutput | PoolingRequestOutput],
        action: str,
        use_tqdm: bool,
    ) -> list[RequestOutput | PoolingRequestOutput]:
        """Step the engine until every request has finished; their outputs in order."""
        progress = tqdm(total=len(request_ids), desc=action, disable=not use_tqdm)
        while self.engine.has_unfinished:
            for output in self.engine.step():
                if output.finished:
                    results[output.request_id] = output
                    progress.update(1)
        progress.close()
        outputs = [results[r] for r in request_ids]
        failed = [o for o in outputs if o.error is not None]
        if failed:
            raise RequestFailedError(f"{len(failed)} request(s) failed: {failed[0].error}")
        for output in outputs:
            output.prompt = self._prompts.pop(output.request_id, None)
        return outputs

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate for all of them.

        A vision model takes images as content parts, as vLLM's LLM.chat: {"type": "image_pil",
        "image_pil": PIL image} or {"type": "image_url", "image_url": {"url": "data:..."}}.

        `tools` (OpenAI's function tools) reach the template as vLLM's LLM.chat gives them (a
        template that renders none gets them in a system message); the output is text (the
        server parses calls: tokenmill/tools). vLLM's argument order;
        `chat_template_content_format`: "auto" (what the template reads), "string" or
        "openai" (a list of parts)."""
        from tokenmill.tokenizer.chat_template import render_chat, template_reads_parts
        from tokenmill.tools.formats import detect_format
        from tokenmill.tools.request import tool_use

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        template = chat_template or self.tokenizer.chat_template
        use = tool_use(tools, "none", None, detect_format(template), max_tools=len(tools or []))
        _no_lora(lora_request)
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                "chat_template_content_format must be auto, string or openai; got "
                f"{chat_template_content_format!r}"
            )
        as_parts = (
            chat_template_content_format == "openai"
            if chat_template_content_format != "auto"
            else self.engine.image_processor is not None and template_reads_parts(template)
        )
        prompts: list[Prompt] = []
        for conversation in conversations:
            rendered, images = _template_messages(conversation, as_parts)  # type: ignore[arg-type]
            if use is not None:
                rendered = use.template_messages(rendered)
            text = render_chat(
                self.tokenizer,
                rendered,
                tools=use.template_tools() if use is not None else None,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
            )
            prompt: dict[str, Any] = {"prompt": text, "add_special_tokens": False}
            if images:
                prompt["multi_modal_data"] = {"image": images}
                if mm_processor_kwargs:
                    prompt["mm_processor_kwargs"] = mm_processor_kwargs
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _with_images(
        self, prompt: Prompt, token_ids: list[int]
    ) -> tuple[list[int], tuple[ImageInput, ...]]:
        """The prompt's image placeholders expanded with its multi_modal_data images."""
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if not data:
            return token_ids, ()
        unknown = set(data) - {"image"}
        if unknown:
            raise ValueError(f"multi_modal_data takes 'image'; got {sorted(unknown)}")
        images = data["image"] if isinstance(data["image"], list) else [data["image"]]
        processor = self.engine.image_processor
        if processor is None:
            raise InvalidRequestError("this model does not accept images", param="multi_modal_data")
        assert isinstance(prompt, dict)
        kwargs = processor.check_kwargs(
            prompt.get("mm_processor_kwargs") or {}, "mm_processor_kwargs"
        )
        return processor.expand(token_ids, images, "multi_modal_data", kwargs)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            text = prompt["prompt"]
            return text, self.tokenizer.encode(
                text, add_special_tokens=prompt.get("add_special_tokens", True)
            )
        return None, list(prompt)


def _template_messages(
    conversation: list[Message], as_parts: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The messages as a chat template takes them, and their images in order. Image parts
    become {"type": "image"}; with `as_parts` (a vision model's template loops over the
    parts) string content becomes one text part too."""
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(conversation):
        if message.get("role") == "developer":  # OpenAI's newer name for system
            message = {**message, "role": "system"}
        content = message.get("content")
        if not isinstance(content, list):
            if as_parts and isinstance(content, str):
                message = {**message, "content": [{"type": "text", "text": content}]}
            messages.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind, param = part.get("type"), f"messages.{i}.content.{j}"
            if kind == "image_pil":
                images.append(part["image_pil"])
            elif kind == "image_url":
                url = part["image_url"]
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise InvalidRequestError("an image_url part needs a URL", param=param)
                images.append(_load_image(url, param))
            else:
                parts.append(part)
                continue
            parts.append({"type": "image"})
        if not as_parts and all(p.get("type") == "text" for p in parts):  # joined, as the server
            messages.append({**message, "content": "\n".join(p["text"] for p in parts)})
        else:
            messages.append({**message, "content": parts})
    return messages, images


def _load_image(url: str, param: str) -> Any:
    """A data: URL, or an http(s) URL fetched (any host: the caller runs its own script, as
    with vLLM's LLM.chat; sizes and time still bounded), in a thread of its own so a caller
    already inside an event loop (a notebook) can call LLM.chat."""
    from tokenmill.multimodal.media import MediaPolicy, load_image_url

    policy = MediaPolicy(allow_any_domain=True, allow_private_addresses=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, load_image_url(url, policy, param)).result()


def _no_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise ValueError(
            "LoRA adapters are not supported; merge the adapter into the weights (peft's "
            "merge_and_unload) and load the merged directory"
        )


_NO_CLASSIFIERS = (
    "classification and reward models are not supported: tokenmill's pooling serves "
    "embeddings (LLM.embed, LLM.encode) and their cosine scores (LLM.score)"
)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]  # type: ignore[arg-type]
    return list(prompts)  # type: ignore[arg-type]


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams], count: int
) -> list[SamplingParams]:
    """One per prompt, each asking for the final output only (generate returns those: no
    snapshot is made at every step, as vLLM's LLM does); the caller's are not changed."""
    if isinstance(params, SamplingParams):
        return [_final_only(params)] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    made: dict[int, SamplingParams] = {}  # (one copy per distinct params object)
    for p in params:
        if id(p) not in made:
            made[id(p)] = _final_only(p)
    return [made[id(p)] for p in params]


def _final_only(params: SamplingParams) -> SamplingParams:
    if params.output_kind is RequestOutputKind.FINAL_ONLY:
        return params
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
