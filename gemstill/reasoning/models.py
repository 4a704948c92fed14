"""What the reasoning methods talk to: a model that completes text prompts and scores continuations.

`SamplerModel` is a gemstill model on the batched KV-cache sampler; `ScriptedModel` is a plain function from
prompt to text, so verifiers and search are tested against answerers whose behaviour is known exactly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from gemstill.errors import GemstillError
from gemstill.reasoning.config import PromptStyle
from gemstill.sampler import SamplingParams


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # without the stop token
    tokens: int  # generated tokens, the stop token included
    stopped: bool = True  # ended by a stop token, not cut at max_new_tokens


class TextModel(Protocol):
    name: str

    def render(self, question: str, style: PromptStyle, prefix: str = "") -> str:
        """The prompt text for a question: a chat turn (the model's template) or plain text after `prefix`."""
        ...

    def complete(
        self, prompts: Sequence[str], params: SamplingParams, stop_at_newline: bool = False
    ) -> list[Completion]:
        """One completion per prompt, all in as few batched calls as the batch size allows."""
        ...

    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """log p(continuation | prompt), summed over the continuation's tokens."""
        ...


def plain_prompt(question: str, prefix: str = "") -> str:
    return f"{prefix}Question: {question}\nSolution:\n"


class SamplerModel:
    """A loaded gemstill model and its tokenizer, generating with `Sampler` and scoring with `Scorer`."""

    def __init__(self, name: str, model, tokenizer, chat_template: bool = True, batch_size: int = 64):
        from gemstill.sampler import Sampler
        from gemstill.scoring import Scorer

        self.name = name
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.batch_size = batch_size
        self._sampler = Sampler(model)
        self._scorer = Scorer(model)
        newline = tokenizer.encode("\n", add_bos=False)
        self._newline_id = newline[0] if len(newline) == 1 else None

    def render(self, question: str, style: PromptStyle, prefix: str = "") -> str:
        if style == "chat":
            if not self.chat_template:
                raise GemstillError(
                    f"model {self.name} has no chat template, so a chat prompt cannot be built; use --prompt few-shot"
                )
            content = f"{prefix}{question}" if prefix else question
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}])
        return plain_prompt(question, prefix)

    def _encode(self, text: str) -> list[int]:
        # a chat prompt starts with the template's own <bos>; plain text gets one
        return self.tokenizer.encode(text, add_bos=not text.startswith("<bos>"))

    def complete(
        self, prompts: Sequence[str], params: SamplingParams, stop_at_newline: bool = False
    ) -> list[Completion]:
        stops = list(self.tokenizer.stop_ids)
        if stop_at_newline and self._newline_id is not None:
            stops.append(self._newline_id)
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [self._encode(p) for p in prompts[start : start + self.batch_size]]
            batch_params = dataclasses.replace(params, seed=params.seed + start)
            # rows padded to a power of two (copies of the last prompt, dropped after): a search's levels of
            # 20, 37, 61 prompts reuse a few compiled shapes instead of compiling one each
            rows = min(max(8, 1 << (len(chunk) - 1).bit_length()), max(self.batch_size, len(chunk)))
            padded = chunk + [chunk[-1]] * (rows - len(chunk))
            for ids in self._sampler.generate(padded, batch_params, stop_ids=stops)[: len(chunk)]:
                kept = ids[:-1] if ids and ids[-1] in stops else ids
                # embedding rows past the tokenizer's pieces (a padded vocabulary) have no text
                text = self.tokenizer.decode([t for t in kept if t < self.tokenizer.vocab_size])
                out.append(Completion(text, len(ids), stopped=bool(ids) and ids[-1] in stops))
        return out

    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        sequences, starts = [], []
        for prompt, continuation in zip(prompts, continuations, strict=True):
            head = self._encode(prompt)
            sequences.append(head + self.tokenizer.encode(continuation, add_bos=False))
            starts.append(len(head))
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            for logprobs, head in zip(
                self._scorer.logprobs(chunk), starts[start : start + self.batch_size], strict=True
            ):
                scores.append(float(np.sum(logprobs[head - 1 :])))
        return scores


Script = Callable[[str, int], str]
"""A scripted answer: (prompt, index of this sample among the calls so far) -> text."""


class ScriptedModel:
    """A function from prompt to text standing in for a model: prompts are the bare question (no template),
    tokens are whitespace-separated words, and loglik asks `scorer` (or says 0.0 for every continuation)."""

    def __init__(self, name: str, script: Script, scorer: Callable[[str, str], float] | None = None):
        self.name = name
        self.script = script
        self.scorer = scorer
        self.calls = 0  # complete() calls: one per batched generate
        self.prompts_seen = 0

    def render(self, question: str, style: PromptStyle, prefix: str = "") -> str:
        return question if style == "chat" else plain_prompt(question, prefix)

    def complete(
        self, prompts: Sequence[str], params: SamplingParams, stop_at_newline: bool = False
    ) -> list[Completion]:
        self.calls += 1
        out = []
        for prompt in prompts:
            text = self.script(prompt, self.prompts_seen)
            self.prompts_seen += 1
            if stop_at_newline:
                text = text.split("\n", 1)[0]
            words = list(re.finditer(r"\S+", text))  # a word stands for a token
            stopped = len(words) < params.max_new_tokens
            words = words[: params.max_new_tokens]
            if words:
                text = text[: words[-1].end()]
            out.append(Completion(text, len(words) + stopped, stopped))
        return out

    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        return [self.scorer(p, c) if self.scorer else 0.0 for p, c in zip(prompts, continuations, strict=True)]
