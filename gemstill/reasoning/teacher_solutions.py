"""Chain-of-thought distillation data: the teacher writes the solutions its student learns from.

Every training chat of the form [user, model] is a prompt. The teacher samples `samples` solutions per prompt,
all prompts of a round in batched generate calls. Where code can check the answer (a generated problem), only
the solutions it accepts are kept: rejection sampling, as in STaR (Zelikman et al. 2022) and rejection-sampling
fine-tuning. Where nothing can check it, every finished solution is kept. A solution cut at max_new_tokens is
never kept. The other examples (plain text, longer chats) stay as written, so the split differs from the
reference split only in who wrote the answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm import tqdm

from gemstill.data.generated import Problem, verify
from gemstill.data.prepare import MODEL_ROLES
from gemstill.data.sources import Example
from gemstill.reasoning.config import TeacherGenerateConfig
from gemstill.reasoning.models import TextModel
from gemstill.sampler import SamplingParams


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled solution and what became of it: the record that makes the split auditable."""

    example: int  # index of the prompt's example in the reference examples
    sample: int
    question: str
    output: str
    tokens: int
    finished: bool  # ended by the end-of-turn token, not cut
    verified: bool | None  # None: no verifier for this prompt
    kept: bool


@dataclasses.dataclass(frozen=True)
class TeacherSplit:
    examples: list[Example]  # the new training examples
    generations: list[Generation]
    stats: dict[str, Any]


def prompt_of(example: Example) -> str | None:
    """The user text of a [user, model] chat: a prompt the teacher can answer anew; None for anything else."""
    if isinstance(example, str) or len(example) != 2:
        return None
    user, model = example
    return user["content"] if user["role"] == "user" and model["role"] in MODEL_ROLES else None


def teacher_split(
    model: TextModel,
    examples: Sequence[Example],
    verifiers: Mapping[str, Problem],
    config: TeacherGenerateConfig,
    log: Callable[[str], None] = print,
) -> TeacherSplit:
    """The training examples with the teacher's solutions in place of the reference ones.

    `verifiers` maps a prompt's user text to the generated problem that checks its answer.
    """
    prompts = [(i, q) for i, example in enumerate(examples) if (q := prompt_of(example)) is not None]
    if config.prompts == "verifiable":
        prompts = [(i, q) for i, q in prompts if q in verifiers]
    prompts = prompts[: config.max_prompts]
    rendered = [model.render(question, "chat") for _, question in prompts]
    params = SamplingParams(config.max_new_tokens, config.temperature, config.top_k, seed=config.seed)
    outputs: list[list[Any]] = [[] for _ in prompts]
    for sample in tqdm(range(config.samples), desc="teacher solutions", unit="round"):
        round_params = dataclasses.replace(params, seed=config.seed + sample * len(prompts))
        for slot, completion in enumerate(model.complete(rendered, round_params)):
            outputs[slot].append(completion)

    replaced: dict[int, list[str]] = {}
    generations: list[Generation] = []
    for (index, question), completions in zip(prompts, outputs, strict=True):
        problem = verifiers.get(question)
        kept: list[str] = []
        for sample, completion in enumerate(completions):
            text = completion.text.strip()
            verified = verify(problem, text) if problem is not None else None
            acceptable = completion.stopped and bool(text) and (verified is not False or config.keep == "all")
            keep = acceptable and text not in kept and len(kept) < config.per_prompt
            if keep:
                kept.append(text)
            generations.append(
                Generation(
                    index, sample, question, completion.text, completion.tokens, completion.stopped, verified, keep
                )
            )
        if kept or problem is None or config.unsolved == "drop":
            replaced[index] = kept
    out: list[Example] = []
    for i, example in enumerate(examples):
        if i not in replaced:
            out.append(example)
            continue
        user = example[0]
        out += [[user, {"role": "model", "content": text}] for text in replaced[i]]
    checked = [g for g in generations if g.verified is not None]
    teacher_examples = sum(len(texts) for texts in replaced.values())
    stats = {
        "prompts": len(prompts),
        "verified_prompts": sum(verifiers.get(q) is not None for _, q in prompts),
        "samples": len(generations),
        "accepted_samples": sum(bool(g.verified) for g in checked),
        "acceptance_rate": round(sum(bool(g.verified) for g in checked) / len(checked), 4) if checked else None,
        "cut_samples": sum(not g.finished for g in generations),
        "prompts_solved": sum(bool(replaced.get(i)) for i, _ in prompts),
        "prompts_dropped": sum(i in replaced and not replaced[i] for i, _ in prompts),
        "teacher_examples": teacher_examples,
        "reference_examples": len(out) - teacher_examples,
        "generated_tokens": sum(g.tokens for g in generations),
    }
    log(
        f"teacher_generate: {stats['prompts']} prompts x {config.samples} samples, "
        f"{stats['accepted_samples']}/{len(checked)} verified solutions accepted, "
        f"{stats['prompts_solved']} prompts solved, {stats['prompts_dropped']} dropped"
    )
    return TeacherSplit(out, generations, stats)
