"""Fill-in-the-middle: a model's FIM tokens found in its vocabulary, and FIM prompts built from
them (prefix, suffix, optional extra files) as token ids.

A model can infill when its vocabulary holds all three markers of one family: prefix, suffix
and middle. The families (spellings as their tokenizers store them):

| family     | prefix            | suffix            | middle            | ends the middle                      |
| ---        | ---               | ---               | ---               | ---                                  |
| qwen       | `<|fim_prefix|>`  | `<|fim_suffix|>`  | `<|fim_middle|>`  | `<|fim_pad|>`, `<|endoftext|>`, `<|file_sep|>`, `<|repo_name|>`, `<|im_end|>` |
| starcoder  | `<fim_prefix>`    | `<fim_suffix>`    | `<fim_middle>`    | `<fim_pad>`, `<|endoftext|>`, `<file_sep>` |
| santacoder | `<fim-prefix>`    | `<fim-suffix>`    | `<fim-middle>`    | `<fim-pad>`, `<|endoftext|>`         |
| deepseek   | `<｜fim▁begin｜>` | `<｜fim▁hole｜>`  | `<｜fim▁end｜>`   | `<|EOT|>`, `<｜end▁of▁sentence｜>`   |
| codellama  | `▁<PRE>`          | `▁<SUF>`          | `▁<MID>`          | `▁<EOT>`                             |
| codellama  | `<PRE>`           | `<SUF>`           | `<MID>`           | `<EOT>` (GGUF spellings)             |

The three markers themselves end the middle too (a model that emits one has left it). Ends
missing from a vocabulary are skipped; the tokenizer's EOS ends generation anyway.

Orders: PSM (the default of every family): `[prefix] P [suffix] S [middle]`; SPM:
`[suffix] S [prefix] P [middle]` (llama.cpp's `--spm-infill` layout).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

FimOrder = Literal["psm", "spm"]

# llama.cpp's placeholders for the repo-level layout (repository name, the current file)
REPO_NAME = "myproject"
CURRENT_FILE = "filename"


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    prefix: str
    suffix: str
    middle: str
    ends: tuple[str, ...]
    repo: str | None = None  # repository-name marker (repo-level prompts with extra files)
    file_sep: str | None = None  # file-separator marker


FAMILIES: tuple[_Family, ...] = (
    _Family(
        "qwen",
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        ("<|fim_pad|>", "<|endoftext|>", "<|file_sep|>", "<|repo_name|>", "<|im_end|>"),
        repo="<|repo_name|>",
        file_sep="<|file_sep|>",
    ),
    _Family(
        "starcoder",
        "<fim_prefix>",
        "<fim_suffix>",
        "<fim_middle>",
        ("<fim_pad>", "<|endoftext|>", "<file_sep>"),
        repo="<reponame>",
        file_sep="<file_sep>",
    ),
    _Family(
        "santacoder", "<fim-prefix>", "<fim-suffix>", "<fim-middle>", ("<fim-pad>", "<|endoftext|>")
    ),
    _Family(
        "deepseek",
        "<｜fim▁begin｜>",
        "<｜fim▁hole｜>",
        "<｜fim▁end｜>",
        ("<|EOT|>", "<｜end▁of▁sentence｜>"),
    ),
    _Family("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", ("▁<EOT>",)),
    _Family("codellama", "<PRE>", "<SUF>", "<MID>", ("<EOT>",)),
)

# what a 400 names when a model has none of them
MARKER_SPELLINGS = ", ".join(dict.fromkeys(f.prefix for f in FAMILIES))


@dataclass(frozen=True, slots=True)
class FimTokens:
    """One model's FIM markers as token ids, and the ids that end a generated middle."""

    family: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    end_ids: tuple[int, ...]
    repo_id: int | None = None
    file_sep_id: int | None = None

    def build(
        self,
        prefix_ids: Sequence[int],
        suffix_ids: Sequence[int],
        *,
        order: FimOrder = "psm",
        leading_ids: Sequence[int] = (),
        extra_ids: Sequence[int] = (),
        middle_ids: Sequence[int] = (),
    ) -> list[int]:
        """The prompt: leading ids (BOS), extra context, the markers around prefix and
        suffix in `order`, then text already given for the middle."""
        if order == "psm":
            body = [self.prefix_id, *prefix_ids, self.suffix_id, *suffix_ids]
        elif order == "spm":
            body = [self.suffix_id, *suffix_ids, self.prefix_id, *prefix_ids]
        else:
            raise ValueError(f"unknown FIM order {order!r}")
        return [*leading_ids, *extra_ids, *body, self.middle_id, *middle_ids]

    def extra_context(
        self, files: Sequence[tuple[str, str]], encode: Callable[[str], list[int]]
    ) -> list[int]:
        """Extra files (filename, text) before the FIM prefix. With repo and file-separator
        markers, llama.cpp's repo-level layout: `[repo]myproject\\n` then `[sep]name\\ntext`
        per file and `[sep]filename\\n` for the current one; without them, the texts alone."""
        if not files:
            return []
        if self.repo_id is None or self.file_sep_id is None:
            return [i for _, text in files for i in encode(text)]
        ids = [self.repo_id, *encode(f"{REPO_NAME}\n")]
        for name, text in files:
            ids += [self.file_sep_id, *encode(f"{name}\n{text}")]
        return [*ids, self.file_sep_id, *encode(f"{CURRENT_FILE}\n")]


def detect_fim(vocab: Mapping[str, int]) -> FimTokens | None:
    """The first family whose three markers are all in the vocabulary (token -> id)."""
    for family in FAMILIES:
        ids = [vocab.get(t) for t in (family.prefix, family.suffix, family.middle)]
        if any(i is None for i in ids):
            continue
        prefix_id, suffix_id, middle_id = (int(i) for i in ids if i is not None)
        ends = [vocab.get(t) for t in (*family.ends, family.prefix, family.suffix, family.middle)]
        end_ids = tuple(dict.fromkeys(int(i) for i in ends if i is not None))
        repo = vocab.get(family.repo) if family.repo else None
        sep = vocab.get(family.file_sep) if family.file_sep else None
        return FimTokens(family.name, prefix_id, suffix_id, middle_id, end_ids, repo, sep)
    return None


def leading_special_ids(encode: Callable[[str, bool], list[int]]) -> list[int]:
    """The ids a tokenizer puts before any text when asked to add special tokens (BOS), found
    by encoding the same text with and without them."""
    probe = "a"
    with_specials, without = encode(probe, True), encode(probe, False)
    if not without:
        return []
    for start in range(len(with_specials) - len(without) + 1):
        if with_specials[start : start + len(without)] == without:
            return with_specials[:start]
    return []
