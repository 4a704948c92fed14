"""The prepare_data stage: examples -> tokenizer -> loss-masked documents -> train/validation packed parquet.

Deterministic: the same config (and tokenizer) gives byte-identical outputs, so the stage's cache key is honest.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from gemstill.config import VOCAB_SIZE
from gemstill.data.config import DataConfig, TokenizerTrainingConfig
from gemstill.data.format import SPLITS, write_split
from gemstill.data.generated import Problem, generate, is_heldout, stable_unit
from gemstill.data.python_docs import stdlib_documents
from gemstill.data.sources import Example, load_file_examples
from gemstill.errors import GemstillError
from gemstill.fingerprint import bytes_fingerprint
from gemstill.fsutil import atomic_write_bytes
from gemstill.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer

MODEL_ROLES = ("model", "assistant")  # chat roles whose turns are the targets


@dataclasses.dataclass(frozen=True)
class Document:
    """One example's token ids and loss mask (1: a target the model learns to predict)."""

    ids: np.ndarray  # int32
    loss: np.ndarray  # int8


def prepare_data(
    config: DataConfig,
    out_dir: Path,
    tokenizer: Tokenizer | None,
    train_tokenizer: TokenizerTrainingConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write tokenizer.model, train/validation.parquet, heldout.jsonl and data_stats.json to `out_dir`.

    With no `tokenizer`, a SentencePiece BPE model is trained on the corpus (`train_tokenizer`, else defaults).
    Returns the statistics also written to data_stats.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and tokenizer.vocab_size > VOCAB_SIZE:
        raise GemstillError(
            f"the tokenizer has {tokenizer.vocab_size} ids, more than Gemma 3's {VOCAB_SIZE}; use a Gemma 3 tokenizer"
        )
    examples, heldout = collect_examples(config, out_dir)
    log(f"prepare_data: {len(examples)} examples, {len(heldout)} held-out problems kept apart")
    if len(examples) < 2:
        raise GemstillError(f"only {len(examples)} example(s); train and validation need at least 2, so add data")
    if tokenizer is None:
        tokenizer = train_sentencepiece(corpus_lines(examples), train_tokenizer or TokenizerTrainingConfig())
        log(f"prepare_data: trained a {tokenizer.vocab_size}-piece SentencePiece BPE tokenizer on the corpus")
    documents = tokenize_all(examples, tokenizer, config)
    tokenizer_path = tokenizer.save(out_dir)
    is_validation = validation_mask(examples, config.validation_fraction)
    stats: dict[str, Any] = {
        "examples": len(examples),
        "heldout_problems": len(heldout),
        "seq_len": config.seq_len,
        "tokenizer": {
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": bytes_fingerprint(tokenizer_path.read_bytes()),
        },
    }
    for split in SPLITS:
        wanted = split == "validation"
        chosen = [doc for doc, in_validation in zip(documents, is_validation, strict=True) if in_validation == wanted]
        stats[split] = write_packed_split(out_dir, split, chosen, config)
        log(f"prepare_data: {split}: {stats[split]}")

    atomic_write_bytes(out_dir / "heldout.jsonl", "".join(json.dumps(p) + "\n" for p in heldout).encode())
    atomic_write_bytes(out_dir / "data_stats.json", (json.dumps(stats, indent=2) + "\n").encode())
    return stats


def prepare_scoring_corpus(config: DataConfig, tokenizer: Tokenizer, out_dir: Path) -> dict[str, Any]:
    """Every document of `config`'s corpus (generated held-out problems excepted) packed into one validation split
    in `out_dir`, tokenized with `tokenizer`: text to score models on, never to train on. Returns its statistics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    examples, _ = collect_examples(config, out_dir)
    if not examples:
        raise GemstillError(f"{out_dir}: the corpus to score has no documents; give it a source with text")
    return write_packed_split(out_dir, "validation", tokenize_all(examples, tokenizer, config), config)


def tokenize_all(examples: Sequence[Example], tokenizer: Tokenizer, config: DataConfig) -> list[Document]:
    return [
        tokenize(example, tokenizer, config.chat_template, config.seq_len, index)
        for index, example in enumerate(tqdm(examples, desc="tokenize", unit="doc"))
    ]


def write_packed_split(out_dir: Path, split: str, documents: Sequence[Document], config: DataConfig) -> dict[str, Any]:
    """Shuffle (seeded per split), pack and write one split; returns its statistics."""
    split_index = SPLITS.index(split)
    order = np.random.default_rng([config.seed, split_index]).permutation(len(documents))
    rows = pack([documents[i] for i in order], config.seq_len, split)
    cap = config.max_sequences if split == "train" and config.max_sequences is not None else len(rows)
    arrays = to_arrays(rows[:cap], config.seq_len)
    write_split(out_dir, split, **arrays)
    return split_stats(arrays, documents=len(documents), dropped=max(len(rows) - cap, 0))


def training_examples(config: DataConfig, scratch_dir: Path) -> tuple[list[Example], list[Problem]]:
    """The examples prepare_data packs into the train split, in its order (validation ones left out), and the
    generated problems they came from (none for other sources)."""
    examples, kept, _ = _collect(config, scratch_dir)
    is_validation = validation_mask(examples, config.validation_fraction)
    trained = [example for example, in_validation in zip(examples, is_validation, strict=True) if not in_validation]
    return trained, kept


def collect_examples(config: DataConfig, scratch_dir: Path) -> tuple[list[Example], list[Problem]]:
    """The training examples and, for generated data, the held-out problems (never among the examples)."""
    examples, _, heldout = _collect(config, scratch_dir)
    return examples, heldout


def _collect(config: DataConfig, scratch_dir: Path) -> tuple[list[Example], list[Problem], list[Problem]]:
    """(examples, the generated problems they hold, the held-out problems); problems only for generated data."""
    if config.source == "files":
        assert config.files is not None  # the config's validator guarantees it
        return load_file_examples(config.files, scratch_dir), [], []
    if config.source == "python-docs":
        docs = config.python_docs
        return list(stdlib_documents(docs.min_chars, docs.max_documents)), [], []
    problems = generate(config.generated)
    fraction = config.generated.heldout_fraction
    kept = [p for p in problems if not is_heldout(p, fraction)]
    heldout = [p for p in problems if is_heldout(p, fraction)]
    examples: list[Example] = [problem_messages(p) for p in kept]
    if config.generated.tot_exercises:
        from gemstill.data.game24_tot import exercises

        for problem in kept:
            if problem["kind"] == "game24":
                examples += exercises(problem, random.Random(f"exercises:{problem['id']}"))
    return examples, kept, heldout


def problem_messages(problem: Problem) -> list[dict[str, str]]:
    """A problem as a chat: the question from the user, the worked solution from the model."""
    return [{"role": "user", "content": problem["question"]}, {"role": "model", "content": problem["solution"]}]


def corpus_lines(examples: Sequence[Example]) -> Iterator[str]:
    """The corpus's text line by line, in example order, with the chat roles: what the tokenizer is trained on."""
    for example in examples:
        if isinstance(example, str):
            yield from (line for line in example.splitlines() if line)
            continue
        for message in example:
            if message["role"] != "system":  # a system text joins the first user turn
                yield "model" if message["role"] in MODEL_ROLES else "user"
            yield from (line for line in message["content"].splitlines() if line)


def train_sentencepiece(lines: Iterator[str], config: TokenizerTrainingConfig) -> Tokenizer:
    """A byte-fallback BPE model with Gemma's special ids and pieces, trained deterministically on `lines`.

    `vocab_size` is an upper bound (a small corpus may not have that many merges); every text still encodes,
    through byte pieces.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=config.vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            user_defined_symbols=[START_OF_TURN, END_OF_TURN],
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise GemstillError(
            f"training the tokenizer failed ({reason}); raise teacher.scratch.tokenizer.vocab_size or add text"
        ) from None
    return Tokenizer(model.getvalue())


def tokenize(example: Example, tokenizer: Tokenizer, chat_template: bool, seq_len: int, index: int) -> Document:
    """Token ids and loss mask of one example; `index` names it in errors.

    A chat (with `chat_template`) is Gemma's turn format with loss on each model turn's text and its
    <end_of_turn>. Each answer is tokenized apart from its prompt, exactly as a model sees it when it
    generates after `encode_chat(history, add_generation_prompt=True)`. Anything else is plain text:
    <bos> text <eos>, with loss on every token after <bos>.
    """
    if isinstance(example, str) or not chat_template:
        text = example if isinstance(example, str) else "\n\n".join(m["content"] for m in example)
        ids = [tokenizer.bos_id, *tokenizer.encode(text, add_bos=False), tokenizer.eos_id]
        return Document(np.asarray(ids, np.int32), np.asarray([0] + [1] * (len(ids) - 1), np.int8))
    try:
        tokenizer.apply_chat_template(example, add_generation_prompt=False)  # checks roles and turn order
    except ValueError as err:
        raise GemstillError(f"example {index}: {err}") from None
    ids: list[int] = []
    loss: list[int] = []
    rendered = ""
    for turn, message in enumerate(example):
        if message["role"] not in MODEL_ROLES:
            continue
        prompt = tokenizer.apply_chat_template(example[:turn], add_generation_prompt=True)
        new = tokenizer.encode(prompt[len(rendered) :], add_bos=False)
        answer = message["content"].strip()
        target = [*tokenizer.encode(answer, add_bos=False), tokenizer.end_of_turn_id]
        ids += new + target
        loss += [0] * len(new) + [1] * len(target)
        rendered = prompt + answer + END_OF_TURN
    if not ids:
        raise GemstillError(f"example {index} has no model turn to learn from; end each chat with a model message")
    if (prompt_len := loss.index(1)) >= seq_len:
        raise GemstillError(
            f"example {index}'s prompt is {prompt_len} tokens, so data.seq_len={seq_len} leaves no room for its "
            f"answer; raise data.seq_len above {prompt_len} or shorten the prompts"
        )
    return Document(np.asarray(ids, np.int32), np.asarray(loss, np.int8))


def validation_mask(examples: Sequence[Example], fraction: float) -> np.ndarray:
    """Which examples go to validation, by a hash of their content; both splits get at least one."""
    units = np.array([stable_unit("validation:" + json.dumps(example, sort_keys=True)) for example in examples])
    chosen = units < fraction
    if not chosen.any():
        chosen[np.argmin(units)] = True
    if chosen.all():
        chosen[np.argmax(units)] = False
    return chosen


def chunks(documents: Sequence[Document], seq_len: int) -> Iterator[Document]:
    """Documents cut into pieces of at most seq_len; a piece's first token is never a target (no context)."""
    for doc in documents:
        for start in range(0, len(doc.ids), seq_len):
            loss = doc.loss[start : start + seq_len].copy()
            loss[0] = 0
            yield Document(doc.ids[start : start + seq_len], loss)


def pack(documents: Sequence[Document], seq_len: int, desc: str = "pack") -> list[list[Document]]:
    """Rows of pieces, best fit: each piece goes into the open row with the least room left that still holds it
    (the earliest such row on ties), or starts a new row."""
    rows: list[list[Document]] = []
    open_rows: list[list[int]] = [[] for _ in range(seq_len)]  # room left -> heap of row numbers
    total = sum(-(-len(doc.ids) // seq_len) for doc in documents)
    for piece in tqdm(chunks(documents, seq_len), desc=desc, total=total, unit="chunk"):
        need = len(piece.ids)
        room = next((r for r in range(need, seq_len) if open_rows[r]), seq_len)
        if room == seq_len:
            row = len(rows)
            rows.append([])
        else:
            row = heapq.heappop(open_rows[room])
        rows[row].append(piece)
        if room > need:
            heapq.heappush(open_rows[room - need], row)
    return rows


def to_arrays(rows: Sequence[Sequence[Document]], seq_len: int) -> dict[str, np.ndarray]:
    """[rows, seq_len] tokens, positions, segment_ids and loss_mask, zero (padding) after each row's pieces."""
    shape = (len(rows), seq_len)
    arrays = {name: np.zeros(shape, np.int32) for name in ("tokens", "positions", "segment_ids")}
    arrays["loss_mask"] = np.zeros(shape, np.int8)
    for r, row in enumerate(rows):
        start = 0
        for segment, piece in enumerate(row, start=1):
            end = start + len(piece.ids)
            arrays["tokens"][r, start:end] = piece.ids
            arrays["positions"][r, start:end] = np.arange(len(piece.ids))
            arrays["segment_ids"][r, start:end] = segment
            arrays["loss_mask"][r, start:end] = piece.loss
            start = end
    return arrays


def split_stats(arrays: dict[str, np.ndarray], documents: int, dropped: int) -> dict[str, Any]:
    """Counts of a written split; `documents` were packed, `dropped` sequences then cut off by max_sequences."""
    real = arrays["segment_ids"] > 0
    return {
        "documents": documents,
        "sequences": len(real),
        "dropped_sequences": dropped,
        "tokens": int(real.sum()),
        "loss_tokens": int(arrays["loss_mask"].sum()),
        "padding_fraction": round(float(1 - real.mean()), 6) if real.size else 0.0,
    }
