"""Chain-of-thought distillation data (teacher_split) against a scripted teacher whose right and wrong answers
are known: rejection sampling keeps exactly the verified solutions, and everything else is accounted for."""

from __future__ import annotations

from gemstill.data.generated import basic_problems, verify
from gemstill.data.prepare import problem_messages
from gemstill.reasoning.config import TeacherGenerateConfig
from gemstill.reasoning.models import ScriptedModel
from gemstill.reasoning.teacher_solutions import teacher_split

SOLVED, UNSOLVED, SOLVED_LATE = basic_problems(3, seed=7)
FREE_PROMPT = "Say something."  # a chat without a verifier


def _examples():
    return [
        problem_messages(SOLVED),
        "plain text stays as it is",
        problem_messages(UNSOLVED),
        [{"role": "user", "content": FREE_PROMPT}, {"role": "model", "content": "reference words"}],
        problem_messages(SOLVED_LATE),
    ]


def _teacher(rounds_prompts: int) -> ScriptedModel:
    """SOLVED right in every round, SOLVED_LATE right only in the last of 3 rounds (and once cut short),
    UNSOLVED never; the free prompt gets a different text each round."""

    def script(prompt: str, index: int) -> str:
        round_ = index // rounds_prompts
        if prompt == SOLVED["question"]:
            return SOLVED["solution"]
        if prompt == SOLVED_LATE["question"]:
            if round_ == 1:
                return SOLVED_LATE["solution"] + "\n" + " more" * 50  # right, but cut at max_new_tokens
            return SOLVED_LATE["solution"] if round_ == 2 else "Answer: 12345"
        if prompt == UNSOLVED["question"]:
            return f"I guess.\nAnswer: {1000 + round_}"
        return f"free answer {round_}"

    return ScriptedModel("teacher", script)


VERIFIERS = {p["question"]: p for p in (SOLVED, UNSOLVED, SOLVED_LATE)}


def test_rejection_sampling_keeps_only_verified_finished_solutions() -> None:
    config = TeacherGenerateConfig(samples=3, max_new_tokens=40, per_prompt=2)
    teacher = _teacher(rounds_prompts=4)
    split = teacher_split(teacher, _examples(), VERIFIERS, config, log=lambda _: None)
    assert teacher.calls == 3  # one batched generate call per round, all prompts in it
    answers = {}
    for example in split.examples:
        if isinstance(example, list):
            answers.setdefault(example[0]["content"], []).append(example[1]["content"])
    assert answers[SOLVED["question"]] == [SOLVED["solution"]]  # the same text thrice is one example
    assert answers[SOLVED_LATE["question"]] == [SOLVED_LATE["solution"]]  # the cut one is not kept
    assert UNSOLVED["question"] not in answers  # dropped: no accepted solution
    assert answers[FREE_PROMPT] == ["free answer 0", "free answer 1"]  # no verifier: kept, up to per_prompt
    assert "plain text stays as it is" in split.examples
    for question, texts in answers.items():
        if question in VERIFIERS:
            assert all(verify(VERIFIERS[question], text) for text in texts)
    assert split.stats["samples"] == 12 and split.stats["prompts"] == 4
    assert split.stats["accepted_samples"] == 3 + 2  # SOLVED thrice, SOLVED_LATE in rounds 1 (cut) and 2
    assert split.stats["cut_samples"] == 1
    assert split.stats["prompts_dropped"] == 1 and split.stats["prompts_solved"] == 3
    kept = [g for g in split.generations if g.kept]
    assert len(kept) == split.stats["teacher_examples"] == 4


def test_unsolved_reference_keep_all_and_verifiable_only() -> None:
    examples = _examples()
    reference = teacher_split(
        _teacher(4), examples, VERIFIERS, TeacherGenerateConfig(samples=3, max_new_tokens=40, unsolved="reference")
    )
    assert problem_messages(UNSOLVED) in reference.examples
    everything = teacher_split(
        _teacher(4), examples, VERIFIERS, TeacherGenerateConfig(samples=1, max_new_tokens=40, keep="all")
    )
    assert [UNSOLVED["question"], "I guess.\nAnswer: 1000"] in [
        [e[0]["content"], e[1]["content"]] for e in everything.examples if isinstance(e, list)
    ]
    verifiable = teacher_split(
        _teacher(3), examples, VERIFIERS, TeacherGenerateConfig(samples=3, max_new_tokens=40, prompts="verifiable")
    )
    assert examples[3] in verifiable.examples  # the free prompt keeps its reference answer
    assert verifiable.stats["prompts"] == 3
