"""Engine logprobs in OpenAI's shapes: Completions' parallel lists, Chat's content list."""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.engine.outputs import Logprob, PositionLogprobs, PromptLogprobs
from tokenmill.server.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
    PromptLogprob,
    PromptLogprobsList,
)
from tokenmill.tokenizer.detokenizer import TokenTexts

_MIN_LOGPROB = -9999.0  # what -inf becomes in JSON, as vLLM sends it


class LogprobFormatter:
    """Formats logprob entries; token texts and bytes come from a per-server cache.

    With `as_ids` (vLLM's return_tokens_as_token_ids) every token is named "token_id:{id}"
    instead of its text, and its bytes are that name's UTF-8 bytes.
    """

    def __init__(self, texts: TokenTexts):
        self.texts = texts

    def completion(
        self,
        token_ids: Sequence[int],
        entries: Sequence[PositionLogprobs | None],
        initial_offset: int = 0,
        as_ids: bool = False,
    ) -> CompletionLogProbs:
        """tokens / token_logprobs / top_logprobs / text_offset (None for an unscored token).

        top_logprobs holds the top-k and the chosen token (up to k + 1 entries, as OpenAI).
        text_offset advances by the length of each token as returned (as vLLM).
        """
        result = CompletionLogProbs()
        offset = initial_offset
        for token_id, entry in zip(token_ids, entries, strict=True):
            token = self._text(token_id, entry, as_ids)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_value(entry[token_id]))
            result.top_logprobs.append(
                {self._text(t, entry, as_ids): _value(lp) for t, lp in entry.items()}
            )
        return result

    def chat(
        self,
        token_ids: Sequence[int],
        entries: Sequence[PositionLogprobs],
        num_top: int,
        as_ids: bool = False,
    ) -> ChatCompletionLogProbs:
        """content: [{token, logprob, bytes, top_logprobs: the num_top most likely}]."""
        content = []
        for token_id, entry in zip(token_ids, entries, strict=True):
            top = sorted(
                ((t, lp) for t, lp in entry.items() if (lp.rank or 0) <= num_top),
                key=lambda item: item[1].rank or 0,
            )
            token = self._text(token_id, entry, as_ids)
            content.append(
                ChatCompletionLogProbsContent(
                    token=token,
                    logprob=_value(entry[token_id]),
                    bytes=self._bytes(token_id, token, as_ids),
                    top_logprobs=[self._chat_item(t, lp, as_ids) for t, lp in top[:num_top]],
                )
            )
        return ChatCompletionLogProbs(content=content)

    def prompt(self, prompt_logprobs: PromptLogprobs | None) -> PromptLogprobsList | None:
        """vLLM's prompt_logprobs: per prompt token None or {token id: logprob, rank, text}."""
        if prompt_logprobs is None:
            return None
        return [
            None
            if entry is None
            else {
                t: PromptLogprob(
                    logprob=_value(lp), rank=lp.rank, decoded_token=self._text(t, entry)
                )
                for t, lp in entry.items()
            }
            for entry in prompt_logprobs
        ]

    def _chat_item(self, token_id: int, logprob: Logprob, as_ids: bool) -> ChatCompletionLogProb:
        if as_ids:
            token = _token_id_name(token_id)
        else:
            token = logprob.decoded_token or self.texts.text(token_id)
        return ChatCompletionLogProb(
            token=token, logprob=_value(logprob), bytes=self._bytes(token_id, token, as_ids)
        )

    def _bytes(self, token_id: int, token: str, as_ids: bool) -> list[int]:
        return list(token.encode()) if as_ids else self.texts.bytes(token_id)

    def _text(self, token_id: int, entry: PositionLogprobs | None, as_ids: bool = False) -> str:
        if as_ids:
            return _token_id_name(token_id)
        logprob = entry.get(token_id) if entry else None
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.texts.text(token_id)


def _token_id_name(token_id: int) -> str:
    return f"token_id:{token_id}"


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _MIN_LOGPROB)
