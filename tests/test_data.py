"""Data preparation: generated problems and their checkers, file sources, tokenization, packing, determinism."""

from __future__ import annotations

import ast
import functools
import itertools
import json
import operator
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from gemstill.data.config import DataConfig, FilesConfig, GeneratedCorpusConfig, TokenizerTrainingConfig
from gemstill.data.format import read_split
from gemstill.data.generated import (
    arithmetic_problems,
    final_answer,
    game24_numbers,
    game24_problems,
    generate,
    is_heldout,
    verify,
)
from gemstill.data.prepare import (
    collect_examples,
    corpus_lines,
    pack,
    prepare_data,
    tokenize,
    train_sentencepiece,
    validation_mask,
)
from gemstill.data.sources import load_file_examples
from gemstill.errors import GemstillError
from gemstill.fingerprint import bytes_fingerprint
from gemstill.tokenizer import Tokenizer

SMALL = DataConfig(
    generated=GeneratedCorpusConfig(arithmetic=150, game24=50, heldout_fraction=0.2),
    seq_len=128,  # short enough that some Game-of-24 traces are cut into chunks
    validation_fraction=0.2,
)
SPLITS = ("train", "validation")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_TRACE = re.compile(r"try (\S+) ([-+*/]) (\S+) = (\S+), left (.+) -> (possible|impossible|reached 24)")


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_data(SMALL, out, None, log=quiet)


def one_line_error(excinfo: pytest.ExceptionInfo[GemstillError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# --- generated problems ---------------------------------------------------------------------------------------


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """An independent evaluator (Python's own parser, exact fractions) for Game-of-24 answers."""
    numbers: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and type(node.value) is int, ast.dump(node)
        numbers.append(node.value)
        return Fraction(node.value)

    return walk(ast.parse(expression, mode="eval").body), sorted(numbers)


@functools.cache
def solvable(values: tuple[Fraction, ...]) -> bool:
    """Brute force over every ordered pair and operation, negative intermediates included."""
    if len(values) == 1:
        return values[0] == 24
    for i, j in itertools.permutations(range(len(values)), 2):
        a, b = values[i], values[j]
        rest = [values[k] for k in range(len(values)) if k not in (i, j)]
        results = [a + b, a - b, a * b] + ([a / b] if b else [])
        if any(solvable(tuple(sorted([*rest, value]))) for value in results):
            return True
    return False


def fraction(text: str) -> Fraction:
    return Fraction(text.strip("()"))


def test_arithmetic_solutions_are_right_step_by_step() -> None:
    problems = arithmetic_problems(400, seed=3)
    scenarios = ("buys", "travels", "shares", "saves", "garden", "pages", "baker")
    assert all(any(word in p["question"] for p in problems) for word in scenarios)
    assert Counter(len(p["solution"].splitlines()) - 1 for p in problems).keys() == {2, 3, 4}
    for problem in problems:
        *steps, last = problem["solution"].splitlines()
        assert 2 <= len(steps) <= 4, problem
        results = []
        for step in steps:
            a, op, b, c = re.fullmatch(r"[^:]+: (\d+) ([-+*/]) (\d+) = (\d+)", step).groups()
            assert _SYMBOLS[op](Fraction(a), int(b)) == int(c)
            results.append(int(c))
        assert last == f"Answer: {results[-1]}" and problem["answer"] == str(results[-1])
        assert all(value < 1000 for value in results)


def test_game24_answers_and_traces_are_right() -> None:
    problems = game24_problems(120, seed=5)
    for problem in problems:
        numbers = game24_numbers(problem)
        assert all(1 <= n <= 13 for n in numbers) and solvable(tuple(map(Fraction, numbers)))
        value, used = evaluate(problem["answer"])
        assert value == 24 and used == numbers, problem
        assert problem["solution"].splitlines()[-1] == f"Answer: {problem['answer']} = 24"
        lines = [m.groups() for m in map(_TRACE.fullmatch, problem["solution"].splitlines()) if m]
        assert lines and lines[-1][-1] == "reached 24"
        for a, op, b, c, left, verdict in lines:
            assert _SYMBOLS[op](fraction(a), fraction(b)) == fraction(c)
            remaining = tuple(sorted(map(fraction, left.split())))
            assert fraction(c) in remaining
            assert solvable(remaining) == (verdict != "impossible"), (problem["id"], left, verdict)


def test_verify_accepts_right_answers_and_rejects_wrong_ones() -> None:
    problems = generate(GeneratedCorpusConfig(arithmetic=100, game24=40, seed=1))
    for problem in problems:
        assert verify(problem, problem["solution"])
        assert verify(problem, "some reasoning\nAnswer: wrong\nAnswer: " + problem["answer"])
        assert not verify(problem, problem["solution"].rsplit("Answer:", 1)[0])  # no final answer line
        if problem["kind"] == "arithmetic":
            assert not verify(problem, f"Answer: {int(problem['answer']) + 1}")
            assert verify(problem, f"Answer: {problem['answer']}.")
    game = {
        "id": "game24-4-7-8-8",
        "kind": "game24",
        "question": "Use 4 7 8 8 to make 24.",
        "solution": "",
        "answer": "",
    }
    assert verify(game, "Answer: (7 - 8 / 8) * 4 = 24")
    assert verify(game, "Answer: (7-(8/8))*4")
    assert not verify(game, "Answer: (7 - 8 / 8) * 4 + 0 = 24")  # an extra number
    assert not verify(game, "Answer: (8 - 4) * 7 - 4 = 24")  # 4 twice, one 8 missing
    assert verify(game, "Answer: 7 * 8 - 8 * 4 = 24")  # any right expression, not only the reference one
    assert not verify(game, "Answer: 8 * 4 - 7 - 8 = 24")  # 17
    assert not verify(game, "Answer: 8 / (8 - 8) + 4 * 7 = 24")  # division by zero
    assert not verify(game, "Answer: __import__('os').system('true')")
    assert not verify(game, "Answer: (7 - 8 / 8) * 4 )")
    assert final_answer("x\nAnswer: 12\n") == "12" and final_answer("no answer") is None


def test_generation_is_deterministic_and_stable_when_counts_grow() -> None:
    config = GeneratedCorpusConfig(arithmetic=60, game24=20, seed=7)
    first, again = generate(config), generate(config)
    assert first == again
    more = generate(config.model_copy(update={"arithmetic": 90, "game24": 30}))
    assert more[:60] == first[:60] and more[90:110] == first[60:]
    assert generate(config.model_copy(update={"seed": 8})) != first
    ids = [p["id"] for p in more]
    assert len(set(ids)) == len(ids)
    assert len({p["question"] for p in more}) == len(more)


def test_heldout_depends_on_the_id_only() -> None:
    problems = generate(GeneratedCorpusConfig(arithmetic=1000, game24=200))
    heldout = [p for p in problems if is_heldout(p, 0.1)]
    assert 0.07 < len(heldout) / len(problems) < 0.13
    assert all(is_heldout(p, 0.1) == is_heldout(dict(p, question="changed"), 0.1) for p in problems[:50])
    assert {p["id"] for p in heldout} <= {p["id"] for p in problems if is_heldout(p, 0.2)}


# --- prepare_data -----------------------------------------------------------------------------------------------


def segments(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every packed piece of a split, as its own arrays."""
    pieces = []
    for row in range(len(data["tokens"])):
        for segment in range(1, int(data["segment_ids"][row].max()) + 1):
            where = data["segment_ids"][row] == segment
            pieces.append({name: data[name][row][where] for name in ("tokens", "positions", "loss_mask")})
    return pieces


def test_prepare_writes_the_documented_outputs(prepared: tuple[Path, dict]) -> None:
    out, stats = prepared
    assert json.loads((out / "data_stats.json").read_text()) == stats
    tokenizer = Tokenizer.from_file(out)
    assert stats["tokenizer"] == {
        "vocab_size": tokenizer.vocab_size,
        "fingerprint": bytes_fingerprint((out / "tokenizer.model").read_bytes()),
    }
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == stats["heldout_problems"] > 0
    assert stats["examples"] + len(heldout) == 200
    assert all(is_heldout(p, 0.2) and verify(p, p["solution"]) for p in heldout)
    for split in SPLITS:
        data = read_split(out, split)
        real = data["segment_ids"] > 0
        assert data["tokens"].shape == (stats[split]["sequences"], SMALL.seq_len)
        assert stats[split]["tokens"] == real.sum() and stats[split]["loss_tokens"] == data["loss_mask"].sum()
        assert stats[split]["padding_fraction"] == pytest.approx(1 - real.mean(), abs=1e-6)
    assert stats["train"]["documents"] + stats["validation"]["documents"] == stats["examples"]


def test_heldout_problems_never_reach_train_or_validation(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    tokenizer = Tokenizer.from_file(out)
    text = "\n".join(
        tokenizer.decode(piece["tokens"]) for split in SPLITS for piece in segments(read_split(out, split))
    )
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    kept = [p for p in generate(SMALL.generated) if not is_heldout(p, 0.2)]
    assert all(p["question"] in text for p in kept)  # the check below can see questions at all
    assert not any(p["question"] in text for p in heldout)


def test_packing_keeps_every_token_and_masks_only_answers(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    tokenizer = Tokenizer.from_file(out)
    examples, _ = collect_examples(SMALL, out)
    documents = [tokenize(example, tokenizer, True, SMALL.seq_len, i) for i, example in enumerate(examples)]
    in_validation = validation_mask(examples, SMALL.validation_fraction)
    model_header = tokenizer.encode("<start_of_turn>model\n", add_bos=False)
    cut = 0
    for split in SPLITS:
        data = read_split(out, split)
        pad = data["segment_ids"] == 0
        for name in ("tokens", "positions", "loss_mask"):
            assert not data[name][pad].any()
        for row in data["segment_ids"]:  # segments 1, 2, ... in order, padding only at the end
            real = row[row > 0]
            assert real[0] == 1 and set(np.diff(real)) <= {0, 1} and not row[len(real) :].any()
        pieces = segments(data)
        wanted = [
            doc for doc, validation in zip(documents, in_validation, strict=True) if validation == (split != "train")
        ]
        expected = Counter(
            tuple(doc.ids[start : start + SMALL.seq_len])
            for doc in wanted
            for start in range(0, len(doc.ids), SMALL.seq_len)
        )
        assert Counter(tuple(piece["tokens"]) for piece in pieces) == expected  # no token lost, none duplicated
        assert (~pad).sum() == sum(len(doc.ids) for doc in wanted)
        for piece in pieces:
            tokens, loss = piece["tokens"], piece["loss_mask"]
            assert np.array_equal(piece["positions"], np.arange(len(tokens)))
            assert loss[0] == 0  # the first token of a piece has nothing to be predicted from
            if tokens[0] != tokenizer.bos_id:  # a later piece of a cut document: the answer goes on
                cut += 1
                assert loss[1:].all()
                continue
            (targets,) = np.nonzero(loss)
            assert np.array_equal(targets, np.arange(targets[0], len(tokens)))  # one answer, to the piece's end
            assert list(tokens[targets[0] - len(model_header) : targets[0]]) == model_header
            if len(tokens) < SMALL.seq_len:  # a whole document
                assert tokens[-1] == tokenizer.end_of_turn_id
    assert cut > 0  # some documents were longer than seq_len and were cut


def test_prepare_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    config = SMALL.model_copy(update={"max_sequences": 20})
    for run in ("a", "b"):
        stats = prepare_data(config, tmp_path / run, None, TokenizerTrainingConfig(vocab_size=500), log=quiet)
    assert stats["train"]["sequences"] == 20 and stats["train"]["dropped_sequences"] > 0
    assert stats["tokenizer"]["vocab_size"] <= 500
    for name in ("train.parquet", "validation.parquet", "tokenizer.model", "heldout.jsonl", "data_stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = prepare_data(config.model_copy(update={"seed": 1}), tmp_path / "c", None, log=quiet)
    assert (tmp_path / "c" / "train.parquet").read_bytes() != (tmp_path / "a" / "train.parquet").read_bytes()
    assert other["examples"] == stats["examples"]


def test_trained_tokenizer_round_trips_the_corpus(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    tokenizer = Tokenizer.from_file(out)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.id_to_piece(tokenizer.start_of_turn_id) == "<start_of_turn>"
    assert tokenizer.encode("<start_of_turn>model\n", add_bos=False)[0] == tokenizer.piece_to_id("<start_of_turn>")
    examples, _ = collect_examples(SMALL, out)
    texts = [message["content"] for example in examples for message in example]
    texts += ["café naïve 日本語 ✓ tabs\tand  spaces ", "12345 + 0.5"]
    for text in texts:
        ids = tokenizer.encode(text, add_bos=False)
        assert tokenizer.unk_id not in ids and tokenizer.decode(ids) == text
    chat = examples[0]
    assert tokenizer.decode(tokenizer.encode_chat(chat, add_generation_prompt=False), skip_special=False).startswith(
        "<bos><start_of_turn>user\n"
    )


def test_too_small_vocabulary_is_refused() -> None:
    examples, _ = collect_examples(SMALL, Path("unused"))
    with pytest.raises(GemstillError) as excinfo:
        train_sentencepiece(corpus_lines(examples), TokenizerTrainingConfig(vocab_size=300))
    assert "vocab_size" in one_line_error(excinfo)
    with pytest.raises(ValidationError):
        TokenizerTrainingConfig(vocab_size=262_145)


def test_chat_tokens_match_what_the_model_sees_when_generating(prepared: tuple[Path, dict]) -> None:
    tokenizer = Tokenizer.from_file(prepared[0])
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": " 5 \n"},
        {"role": "user", "content": "And 4 * 4?"},
        {"role": "model", "content": "16"},
        {"role": "user", "content": "Thanks"},
    ]
    doc = tokenize(chat, tokenizer, True, 64, 0)
    ids, loss = list(doc.ids), list(doc.loss)
    first = tokenizer.encode_chat(chat[:2], add_generation_prompt=True)
    answer = [*tokenizer.encode("5", add_bos=False), tokenizer.end_of_turn_id]
    assert ids[: len(first) + len(answer)] == first + answer
    second = [*tokenizer.encode("16", add_bos=False), tokenizer.end_of_turn_id]
    model_header = tokenizer.encode("<start_of_turn>model\n", add_bos=False)
    assert ids[-len(second) - len(model_header) :] == model_header + second
    targets = [token for token, weight in zip(ids, loss, strict=True) if weight]
    assert tokenizer.decode(targets, skip_special=False) == "5<end_of_turn>16<end_of_turn>"
    expected_text = tokenizer.apply_chat_template(chat[:5], add_generation_prompt=False).removesuffix("\n")
    assert tokenizer.decode(ids, skip_special=False) == expected_text  # the trailing user turn has nothing to learn

    plain = tokenize("Just text.", tokenizer, True, 64, 1)
    assert plain.ids[0] == tokenizer.bos_id and plain.ids[-1] == tokenizer.eos_id
    assert list(plain.loss) == [0] + [1] * (len(plain.ids) - 1)
    flat = tokenize(chat[1:3], tokenizer, False, 64, 2)  # chat_template off: the turns as plain text
    assert tokenizer.decode(flat.ids) == "What is 2 + 3?\n\n 5 \n" and flat.loss.sum() == len(flat.ids) - 1

    with pytest.raises(GemstillError, match="no room for its answer") as excinfo:
        tokenize(chat, tokenizer, True, 8, 3)
    one_line_error(excinfo)
    for bad in ([{"role": "user", "content": "hi"}], [{"role": "model", "content": "hi"}], [chat[1], chat[1]]):
        with pytest.raises(GemstillError, match="example 4") as excinfo:
            tokenize(bad, tokenizer, True, 64, 4)
        one_line_error(excinfo)


def test_pack_best_fit_and_chunks() -> None:
    from gemstill.data.prepare import Document

    def doc(length: int, start: int) -> Document:
        return Document(np.arange(start, start + length, dtype=np.int32), np.ones(length, np.int8))

    rows = pack([doc(6, 100), doc(3, 200), doc(7, 300), doc(2, 400), doc(19, 500)], seq_len=8)
    # the 19-token document is cut into 8 + 8 + 3; each piece goes where it leaves the least room
    assert [[int(piece.ids[0]) for piece in row] for row in rows] == [[100, 400], [200, 516], [300], [500], [508]]
    assert [[len(piece.ids) for piece in row] for row in rows] == [[6, 2], [3, 3], [7], [8], [8]]
    assert all(piece.loss[0] == 0 and piece.loss[1:].all() for row in rows for piece in row)


def test_refusals_before_heavy_work(tmp_path: Path) -> None:
    class Huge:
        vocab_size = 262_145

    with pytest.raises(GemstillError, match="262145") as excinfo:
        prepare_data(SMALL, tmp_path, Huge(), log=quiet)  # type: ignore[arg-type]
    one_line_error(excinfo)
    with pytest.raises(GemstillError, match="seq_len=16") as excinfo:
        prepare_data(SMALL.model_copy(update={"seq_len": 16}), tmp_path, None, log=quiet)
    one_line_error(excinfo)
    assert not (tmp_path / "train.parquet").exists()
    with pytest.raises(ValidationError, match=r"data\.files"):
        DataConfig(source="files")
    with pytest.raises(ValidationError):
        DataConfig(seq_len=8)
    with pytest.raises(ValidationError):
        DataConfig(validation_fraction=0.5)
    with pytest.raises(ValidationError):
        DataConfig(unknown=1)


# --- file sources -----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CHATS = [
    [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}] for i in range(12)
]


def test_file_sources_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    write_jsonl(tmp_path / "texts" / "a.jsonl", [{"text": "first doc", "n": 1}, {"text": "second doc", "n": 2}])
    write_jsonl(tmp_path / "texts" / "b.json", [{"text": "third doc", "n": 3}])
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat} for chat in CHATS])
    pq.write_table(pa.table({"body": ["p1", "p2"], "messages": CHATS[:2]}), tmp_path / "data.parquet")
    (tmp_path / "book.txt").write_text("Para one,\nline two.\n\nPara two.\n\n\n")
    scratch = tmp_path / "scratch"
    texts = FilesConfig(paths=[str(tmp_path / "texts" / "*.json*"), str(tmp_path / "texts" / "a.jsonl")])
    assert load_file_examples(texts, scratch) == ["first doc", "second doc", "third doc"]
    assert (
        load_file_examples(FilesConfig(paths=[str(tmp_path / "chats.jsonl")], messages_field="messages"), scratch)
        == CHATS
    )
    parquet = str(tmp_path / "data.parquet")
    assert load_file_examples(FilesConfig(paths=[parquet], text_field="body"), scratch) == ["p1", "p2"]
    assert load_file_examples(FilesConfig(paths=[parquet], messages_field="messages"), scratch) == CHATS[:2]
    assert load_file_examples(FilesConfig(paths=[str(tmp_path / "book.txt")]), scratch) == [
        "Para one,\nline two.",
        "Para two.",
    ]
    assert load_file_examples(FilesConfig(paths=[str(tmp_path / "book.txt")], format="text"), scratch)
    assert list(scratch.iterdir()) == []  # the datasets cache is temporary


def test_file_source_errors_are_one_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "doc", "n": 1}])
    write_jsonl(tmp_path / "bad_chat.jsonl", [{"messages": [{"role": "user"}]}])
    write_jsonl(tmp_path / "empty_text.jsonl", [{"text": "  "}])
    (tmp_path / "broken.jsonl").write_text('{"text": oops\n')
    (tmp_path / "data.csv").write_text("text\nx\n")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "x.parquet")
    cases = {
        "no file matches": FilesConfig(paths=[str(tmp_path / "missing.jsonl")]),
        "no file matches '.*nothing": FilesConfig(paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "nothing*")]),
        "field 'body' is not in .*columns: text, n": FilesConfig(paths=[str(tmp_path / "a.jsonl")], text_field="body"),
        "'content'": FilesConfig(paths=[str(tmp_path / "bad_chat.jsonl")], messages_field="messages"),
        "not a non-empty list of messages": FilesConfig(paths=[str(tmp_path / "a.jsonl")], messages_field="text"),
        "all empty": FilesConfig(paths=[str(tmp_path / "empty_text.jsonl")]),
        "cannot read": FilesConfig(paths=[str(tmp_path / "broken.jsonl")]),
        "set data.files.format": FilesConfig(paths=[str(tmp_path / "data.csv")]),
        "mix formats": FilesConfig(paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "x.parquet")]),
    }
    for pattern, files in cases.items():
        with pytest.raises(GemstillError, match=pattern) as excinfo:
            load_file_examples(files, tmp_path / "scratch")
        one_line_error(excinfo)


def test_prepare_from_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat} for chat in CHATS])
    files = FilesConfig(paths=[str(tmp_path / "chats.jsonl")], messages_field="messages")
    config = DataConfig(source="files", files=files, seq_len=32, validation_fraction=0.25)
    stats = prepare_data(config, tmp_path / "out", None, TokenizerTrainingConfig(vocab_size=400), log=quiet)
    assert (tmp_path / "out" / "heldout.jsonl").read_bytes() == b""
    assert stats["examples"] == 12 and stats["heldout_problems"] == 0
    assert stats["train"]["documents"] >= 1 and stats["validation"]["documents"] >= 1
    tokenizer = Tokenizer.from_file(tmp_path / "out")
    data = read_split(tmp_path / "out", "train")
    answers = tokenizer.decode(data["tokens"][data["loss_mask"] == 1], skip_special=False)
    assert re.fullmatch(r"(Answer \d+\.<end_of_turn>)+", answers)


# --- the real Gemma 3 tokenizer ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_with_the_gemma3_tokenizer(gemma3_270m_gguf: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_gguf(gemma3_270m_gguf)
    config = DataConfig(generated=GeneratedCorpusConfig(arithmetic=30, game24=10), seq_len=256)
    stats = prepare_data(config, tmp_path, tokenizer, log=quiet)
    assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer.model_proto
    assert stats["tokenizer"]["vocab_size"] == 262_144
    data = read_split(tmp_path, "train")
    problems = {p["question"]: p for p in generate(config.generated)}
    whole = [piece for piece in segments(data) if piece["tokens"][0] == tokenizer.bos_id]
    assert len(whole) == stats["train"]["documents"]  # none cut at seq_len 256
    for piece in whole[:10]:
        tokens, loss = list(piece["tokens"]), piece["loss_mask"]
        start = int(np.argmax(loss))
        question = tokenizer.decode(tokens[:start]).removeprefix("user\n").removesuffix("\nmodel\n")
        problem = problems[question]
        user = [{"role": "user", "content": problem["question"]}]
        assert tokens[:start] == tokenizer.encode_chat(user, add_generation_prompt=True)
        assert tokenizer.decode(tokens[start:], skip_special=False) == problem["solution"] + "<end_of_turn>"
        assert verify(problem, tokenizer.decode(tokens[start:]))


def test_python_docs_source_gives_deterministic_prose():
    from gemstill.data.config import DataConfig
    from gemstill.data.prepare import collect_examples
    from gemstill.data.python_docs import stdlib_documents

    config = DataConfig(source="python-docs", python_docs={"max_documents": 50, "min_chars": 300})
    examples, heldout = collect_examples(config, Path("/nonexistent"))
    assert heldout == [] and len(examples) == 50
    assert all(isinstance(text, str) and len(text) >= 300 for text in examples)
    assert examples == stdlib_documents(300, 50)  # same machine, same Python: same corpus
    assert len(stdlib_documents(200)) > 1000  # the full corpus is large enough for real runs
