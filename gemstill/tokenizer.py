"""Gemma 3's SentencePiece tokenizer, loaded from a `tokenizer.model` or rebuilt from a GGUF's vocabulary.

A GGUF carries no `tokenizer.model`, only the vocabulary as metadata, so `from_gguf` rebuilds the
SentencePiece model from it. The rebuilt model gives exactly the ids of transformers' tokenizer for the
same GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), which the tests check.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from gguf import ReaderField
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemstill.checkpoints.gguf_file import open_gguf
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_write_bytes

_Piece = sp_pb2.ModelProto.SentencePiece

# llama.cpp's `tokenizer.ggml.token_type` codes, as SentencePiece piece types.
_GGUF_PIECE_TYPES = {
    1: _Piece.NORMAL,
    2: _Piece.UNKNOWN,
    3: _Piece.CONTROL,
    4: _Piece.USER_DEFINED,
    5: _Piece.UNUSED,
    6: _Piece.BYTE,
}
# Pieces that must stay whole when they appear in the text, as the reference tokenizer keeps them.
_LITERAL_TYPES = frozenset({_Piece.CONTROL, _Piece.UNKNOWN, _Piece.USER_DEFINED})
# Pieces that `decode(..., skip_special=True)` drops, as the reference drops its special tokens.
_SPECIAL_TYPES = frozenset({_Piece.CONTROL, _Piece.UNKNOWN})

_GGUF_KEYS = {
    "model": "tokenizer.ggml.model",
    "tokens": "tokenizer.ggml.tokens",
    "types": "tokenizer.ggml.token_type",
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}

MODEL_FILENAME = "tokenizer.model"
BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# Gemma 3's chat format as a Jinja template (what apply_chat_template writes), for exported tokenizers
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
Message = Mapping[str, str]
"""A chat message: {"role": "system" | "user" | "model" | "assistant", "content": text}."""
_ROLES = {"system": "system", "user": "user", "model": "model", "assistant": "model"}


class Tokenizer:
    """Text <-> token ids for Gemma 3, wrapping `sentencepiece.SentencePieceProcessor`."""

    def __init__(self, model_proto: bytes) -> None:
        """Load a serialized SentencePiece `ModelProto`; use `from_file` or `from_gguf` rather than this."""
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        pieces = sp_pb2.ModelProto.FromString(model_proto).pieces
        self._literal_ids = {p.piece: i for i, p in enumerate(pieces) if p.type in _LITERAL_TYPES}
        self._literal_re = re.compile(_longest_match_pattern(self._literal_ids))
        self._special_ids = frozenset(i for i, p in enumerate(pieces) if p.type in _SPECIAL_TYPES)
        missing = [p for p in (START_OF_TURN, END_OF_TURN) if p not in self._literal_ids]
        if missing:
            raise GemstillError(
                f"the tokenizer has no {' or '.join(missing)} piece, so it is not Gemma 3's; "
                "load the tokenizer that ships with the Gemma 3 model"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a `tokenizer.model`, or the one inside a directory (as `save` writes it)."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILENAME
        try:
            model_proto = path.read_bytes()
        except FileNotFoundError:
            raise GemstillError(
                f"tokenizer file not found: {path}; pass the tokenizer.model from the model's directory"
            ) from None
        try:
            return cls(model_proto)
        except RuntimeError as err:
            reason = " ".join(str(err).split())
            raise GemstillError(
                f"{path} is not a SentencePiece model ({reason}); pass the model's tokenizer.model file"
            ) from None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Rebuild the tokenizer from the vocabulary in a GGUF's metadata."""
        reader = open_gguf(path)
        return cls.from_gguf_metadata(reader.fields, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, ReaderField], source: str = "the GGUF") -> Tokenizer:
        """Rebuild the tokenizer from `gguf.GGUFReader(path).fields`; `source` names the file in errors."""
        missing = [key for key in _GGUF_KEYS.values() if key not in fields]
        if missing:
            raise GemstillError(
                f"{source} has no tokenizer metadata (missing {', '.join(missing)}); "
                "use a GGUF exported with its tokenizer, or load the model's tokenizer.model with from_file"
            )
        values = {name: fields[key].contents() for name, key in _GGUF_KEYS.items()}
        if (model := values["model"]) != "llama":
            raise GemstillError(f"{source} has a {model!r} tokenizer, not SentencePiece; use a Gemma 3 GGUF")
        try:
            model_proto = _model_proto(values)
        except KeyError as err:
            raise GemstillError(
                f"{source} has an unknown token type {err.args[0]} in tokenizer.ggml.token_type; "
                "use a GGUF written by llama.cpp's converter"
            ) from None
        return cls(model_proto.SerializeToString())

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `directory/tokenizer.model` atomically, so a crash never leaves a torn file; return its path.

        `from_file(directory)` loads it back.
        """
        return atomic_write_bytes(Path(directory) / MODEL_FILENAME, self._model_proto)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model: what `save` writes and checkpoints embed."""
        return self._model_proto

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def start_of_turn_id(self) -> int:
        return self._literal_ids[START_OF_TURN]

    @property
    def end_of_turn_id(self) -> int:
        return self._literal_ids[END_OF_TURN]

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Ids that end generation: `<eos>`, and `<end_of_turn>`, which closes every chat answer."""
        return (self.eos_id, self.end_of_turn_id)

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or `unk_id` when the vocabulary lacks it."""
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids for `text`, with `<bos>` first unless `add_bos` is False.

        Control and user-defined pieces written in the text (`<start_of_turn>`, `<eos>`, `<b>`, tab runs)
        become their single ids, as in the reference tokenizer. SentencePiece never matches control pieces
        itself, so the text is cut at them (longest match first) and only the rest goes to SentencePiece.
        Raises ValueError on text with lone surrogates, which has no UTF-8 form to tokenize.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"text has a lone surrogate {text[err.start]!r} at index {err.start} and so is not valid "
                "Unicode; read the text with errors='replace'"
            ) from None
        ids = [self.bos_id] if add_bos else []
        start = 0
        for match in self._literal_re.finditer(text):
            if match.start() > start:
                ids += self._sp.encode(text[start : match.start()])
            ids.append(self._literal_ids[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = True) -> list[list[int]]:
        """`encode` for each text, for callers that tokenize datasets."""
        return [self.encode(text, add_bos) for text in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text for `ids`; control pieces (`<bos>`, `<end_of_turn>`, ...) and `<unk>` are dropped when
        `skip_special`, else written out as their pieces.

        Streaming: decode the whole growing id list after each new token and print the part past what
        was printed before. The text of a prefix is a prefix of the text, except that a character whose
        UTF-8 bytes are split over byte-fallback tokens shows as U+FFFD until its last byte arrives, so
        hold back a trailing U+FFFD.
        """
        size = self.vocab_size
        parts: list[str] = []
        run: list[int] = []
        for token_id in map(int, ids):
            if not 0 <= token_id < size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (0..{size - 1})")
            if token_id not in self._special_ids:
                run.append(token_id)
            elif not skip_special:
                parts += [self._sp.decode(run), self._sp.id_to_piece(token_id)]
                run = []
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Gemma 3's chat format, as its official template writes it.

        `<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{text}<end_of_turn>\\n...`,
        then `<start_of_turn>model\\n` when `add_generation_prompt`. Gemma has no system role: a leading
        system message is prepended to the first user turn as `{system}\\n\\n{user}`. Turn texts are stripped
        of surrounding whitespace, like the official template does. Turns alternate user/model, starting
        with user ("assistant" is accepted for model). The result starts with `<bos>`: encode it with
        `add_bos=False`, or use `encode_chat`.
        """
        if not messages:
            raise ValueError("no messages; pass at least one {'role': 'user', 'content': ...} message")
        roles = [_role(message, index) for index, message in enumerate(messages)]
        first = 1 if roles[0] == "system" else 0
        if first == len(messages):
            raise ValueError("a system message needs a user message after it; add the user's turn")
        prefix = _content(messages[0], 0) + "\n\n" if first else ""
        parts = [BOS]
        for index in range(first, len(messages)):
            expected = "user" if (index - first) % 2 == 0 else "model"
            if roles[index] != expected:
                raise ValueError(
                    f"message {index} has role {messages[index]['role']!r} where {expected!r} was expected; "
                    "after an optional first system message, turns must alternate user, model, user, ..."
                )
            text = (prefix if index == first else "") + _content(messages[index], index).strip()
            parts.append(f"{START_OF_TURN}{roles[index]}\n{text}{END_OF_TURN}\n")
        if add_generation_prompt:
            parts.append(f"{START_OF_TURN}model\n")
        return "".join(parts)

    def gguf_fields(self, vocab_size: int | None = None) -> dict[str, Any]:
        """The tokenizer.ggml.* metadata llama.cpp reads (the inverse of from_gguf_metadata), with the chat template.

        Whitespace-run pieces go back to llama.cpp's convention (real spaces, user-defined), as in Google's GGUF.
        llama.cpp takes the vocabulary size from this list, so a model with more embedding rows than pieces
        (`vocab_size`) gets unused padding pieces that no text encodes to.
        """
        proto = sp_pb2.ModelProto.FromString(self._model_proto)
        codes = {piece_type: code for code, piece_type in _GGUF_PIECE_TYPES.items()}
        tokens, scores, types = [], [], []
        for piece in proto.pieces:
            text, code = piece.piece, codes[piece.type]
            if len(text) > 1 and not text.strip("▁"):
                text, code = " " * len(text), 4
            tokens.append(text)
            scores.append(float(piece.score))
            types.append(code)
        for index in range(len(tokens), vocab_size or 0):
            tokens.append(f"<gemstill_unused{index}>")
            scores.append(-1e9)
            types.append(5)
        trainer = proto.trainer_spec
        return {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": trainer.bos_id,
            "tokenizer.ggml.eos_token_id": trainer.eos_id,
            "tokenizer.ggml.unknown_token_id": trainer.unk_id,
            "tokenizer.ggml.padding_token_id": trainer.pad_id,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": False,
            "tokenizer.chat_template": CHAT_TEMPLATE,
        }

    def hf_files(self) -> dict[str, bytes]:
        """Files that let `AutoTokenizer.from_pretrained(dir)` load this tokenizer with no extra arguments."""
        piece = self._sp.id_to_piece
        config = {
            "tokenizer_class": "GemmaTokenizer",
            "bos_token": piece(self.bos_id),
            "eos_token": piece(self.eos_id),
            "unk_token": piece(self.unk_id),
            "pad_token": piece(self.pad_id),
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "model_max_length": 1_000_000,
            "chat_template": CHAT_TEMPLATE,
        }
        return {MODEL_FILENAME: self._model_proto, "tokenizer_config.json": json.dumps(config, indent=2).encode()}

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Ids for `apply_chat_template(messages)`, with the template's own `<bos>` and no second one."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


def _model_proto(values: Mapping[str, Any]) -> sp_pb2.ModelProto:
    """A BPE `ModelProto` for a GGUF's vocabulary that reproduces the reference tokenizer's ids.

    - Piece scores are minus the piece's position: Gemma's BPE merges in vocabulary order. The GGUF's own
      scores follow that order for normal pieces but not for the whitespace-run pieces.
    - The GGUF stores the runs of 2..31 spaces as user-defined pieces spelled with real spaces. They
      become normal pieces spelled with "▁" (what SentencePiece turns spaces into), so BPE merges them
      as the reference does; as user-defined pieces they would be matched greedily instead, which differs
      for runs of 32 or more spaces.
    - The unknown piece is marked UNKNOWN (the GGUF marks it control); SentencePiece needs exactly one.
    - Byte fallback, and identity normalization that keeps every space as "▁": no NFKC, no dummy
      prefix, no removal of extra whitespace.
    """
    model = sp_pb2.ModelProto()
    unk_id = values["unk"]
    for index, (piece, gguf_type) in enumerate(zip(values["tokens"], values["types"], strict=True)):
        piece_type = _GGUF_PIECE_TYPES[gguf_type]
        if piece and not piece.strip(" "):
            piece, piece_type = "▁" * len(piece), _Piece.NORMAL
        if index == unk_id:
            piece_type = _Piece.UNKNOWN
        model.pieces.add(piece=piece, score=-float(index), type=piece_type)

    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(model.pieces)
    trainer.byte_fallback = True
    # How Gemma's vocabulary was trained; SentencePiece only reads these two when training.
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    for name in ("bos", "eos", "unk", "pad"):
        setattr(trainer, f"{name}_id", values[name])
        setattr(trainer, f"{name}_piece", model.pieces[values[name]].piece)

    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model


def _longest_match_pattern(pieces: Iterable[str]) -> str:
    """A regex finding the leftmost, then longest, of `pieces` in a text.

    Written as a trie so each position costs one step per character rather than one try per piece:
    Gemma has over 6,000 control pieces, and a plain alternation of them is ~1000x slower on text
    full of "<".
    """
    trie: dict[str, dict] = {}
    for piece in pieces:
        node = trie
        for char in piece:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, dict]) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in node.items() if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


def _role(message: Message, index: int) -> str:
    role = message.get("role")
    if role not in _ROLES or (role == "system" and index > 0):
        raise ValueError(
            f"message {index} has role {role!r}; use 'user', 'model' (or 'assistant'), "
            "and 'system' only as the first message"
        )
    return _ROLES[role]


def _content(message: Message, index: int) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"message {index} has no text content; set 'content' to a string")
    return content
