"""The tokenizer rebuilt from the real Gemma 3 270M GGUF against transformers' tokenizer for the same file.

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=...)`: ids (with and without BOS) and decoded
text must be identical on a fixed corpus of hard cases and on random text.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import AutoTokenizer

from gemstill.errors import GemstillError
from gemstill.tokenizer import Tokenizer

CORPUS = {
    "empty": "",
    "english": "The quick brown fox jumps over the lazy dog. Isn't it?",
    "leading-trailing-spaces": "  hello world   ",
    "single-space": " ",
    "tabs": "\tcol1\tcol2\t\t\tcol3\t",
    "newlines": "line one\nline two\n\nline four\r\nline five\r\n\r\n\n\n\nend\n",
    "carriage-return": "a\rb\r\r c",
    "digits": "0 7 42 2024-11-25 3.14159 1,000,000",
    "long-number": "123456789012345678901234567890",
    "code": "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n    return None  # done\n",
    "tab-code": 'func main() {\n\tfor {\n\t\tfmt.Println("hi")\n\t}\n}\n',
    "emoji": "I 👍 it 😂🎉 — and 👩‍👩‍👧‍👦 and 🏳️‍🌈 and 👋🏽",
    "cjk": "日本語のテキストと中文文本，还有한국어 텍스트。",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "accents-precomposed": "café naïve façade Ångström",
    "accents-combining": "cafe\u0301 nai\u0308ve fac\u0327ade A\u030angstro\u0308m",
    "control-tokens": "<start_of_turn>user\nHi<end_of_turn>\n",
    "control-tokens-inline": "x<bos>y<eos>z<pad><mask><unk><unused0><unused6241>",
    "control-token-lookalikes": "<start_of_turn <<end_of_turn>> <START_OF_TURN> <bos",
    "user-defined-pieces": "<table><tr><td>1</td></tr></table> <b>bold</b> [multimodal] <start_of_image>",
    "byte-piece-text": "<0x41> <0x0A>",
    "byte-fallback": "\ue000 \U00013000 \u0378 \U000e0001 \U0010fffd \u1f4a",
    "symbols": "«»‹› ‽ ⁂ ∮ ⟨x⟩ ☃ ♞ ⚠︎ \u200b\u200c\u200d\ufeff",
    "sentencepiece-space-char": "▁ hi ▁▁x ▁",
    "repeats": "aaaaaaaaaaaaaaaaaaaa ---------- ========== .......... ababababab",
    "nul-and-controls": "a\x00b\x01c\x1fd\x7f",
    **{f"spaces-{n}": f"a{' ' * n}b" for n in [*range(2, 17), 31, 32, 33, 40, 64, 100]},
    **{f"space-run-{n}": " " * n for n in [1, 2, 3, 16, 31, 32, 47]},
}

_FRAGMENTS = [" ", "  ", "\t", "\n", "\r\n", "▁", "<", ">", "/", "0", "12", "ab", "é", "e\u0301", "日本"]
_FRAGMENTS += ["<start_of_turn>", "<end_of_turn>", "<eos>", "<unk>", "<b>", "</b>", "<0x41>", "\ue000"]
_FRAGMENTS += ["👍", "\u200d"]
_ANY_CHAR = st.characters(codec="utf-8")  # no lone surrogates: they are not text (encode rejects them)
_TRICKY_TEXT = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), _ANY_CHAR), max_size=40).map("".join)


@pytest.fixture(scope="module")
def reference(gemma3_270m_gguf: Path):
    return AutoTokenizer.from_pretrained(str(gemma3_270m_gguf.parent), gguf_file=gemma3_270m_gguf.name)


@pytest.fixture(scope="module")
def tokenizer(gemma3_270m_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_270m_gguf)


def _assert_matches_reference(tokenizer: Tokenizer, reference, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False)
    for skip in (True, False):
        decoded = reference.decode(ids, skip_special_tokens=skip)
        assert tokenizer.decode(ids, skip_special=skip) == decoded
        if decoded == text:
            assert tokenizer.decode(tokenizer.encode(text), skip_special=skip) == text


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_corpus_matches_reference(tokenizer: Tokenizer, reference, text: str) -> None:
    _assert_matches_reference(tokenizer, reference, text)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(max_size=100))
def test_random_text_matches_reference(tokenizer: Tokenizer, reference, text: str) -> None:
    _assert_matches_reference(tokenizer, reference, text)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, database=None)
@given(text=_TRICKY_TEXT)
def test_random_tricky_text_matches_reference(tokenizer: Tokenizer, reference, text: str) -> None:
    """Random text built from the pieces that are hard to get right: whitespace, control tokens, bytes."""
    _assert_matches_reference(tokenizer, reference, text)


@pytest.mark.slow
def test_control_tokens_in_text_become_single_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>\n")
    assert ids[:2] == [tokenizer.bos_id, tokenizer.start_of_turn_id]
    assert ids[-2:] == [tokenizer.end_of_turn_id, tokenizer.piece_to_id("\n")]


@pytest.mark.slow
def test_lone_surrogate_raises(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        tokenizer.encode("a\ud800b")


@pytest.mark.slow
def test_special_ids(tokenizer: Tokenizer, reference) -> None:
    assert tokenizer.vocab_size == len(reference) == 262_144
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (105, 106)
    assert tokenizer.stop_ids == (1, 106)
    for token_id in (0, 1, 2, 3, 105, 106, 107, 138, 238, 494, 262_143):
        piece = reference.convert_ids_to_tokens(token_id)
        assert tokenizer.id_to_piece(token_id) == piece
        assert tokenizer.piece_to_id(piece) == token_id
    assert tokenizer.piece_to_id("no such piece") == tokenizer.unk_id


@pytest.mark.slow
def test_rebuilt_model_settings(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """The settings exactness depends on, as written to tokenizer.model."""
    model = sp_pb2.ModelProto.FromString(tokenizer.save(tmp_path).read_bytes())
    piece = sp_pb2.ModelProto.SentencePiece
    assert model.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    assert model.trainer_spec.byte_fallback
    assert model.normalizer_spec.name == "identity"
    assert not model.normalizer_spec.add_dummy_prefix
    assert not model.normalizer_spec.remove_extra_whitespaces
    types = {p.piece: p.type for p in model.pieces}
    assert types["<start_of_turn>"] == types["<bos>"] == piece.CONTROL
    assert types["<unk>"] == piece.UNKNOWN
    assert types["\t"] == types["\n\n"] == types["<b>"] == piece.USER_DEFINED
    assert types["▁▁"] == types["▁" * 31] == types["▁the"] == piece.NORMAL
    assert types["<0x41>"] == piece.BYTE
    assert [p.score for p in model.pieces[:3]] == [0.0, -1.0, -2.0]


@pytest.mark.slow
def test_save_and_from_file_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.model"
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed, not left behind
    for loaded in (Tokenizer.from_file(path), Tokenizer.from_file(path.parent)):
        assert loaded.save(tmp_path / "again").read_bytes() == path.read_bytes()
        for text in CORPUS.values():
            assert loaded.encode(text) == tokenizer.encode(text)


@pytest.mark.slow
def test_encode_batch(tokenizer: Tokenizer) -> None:
    texts = ["Hello", "", "<start_of_turn>"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, add_bos=False) == [tokenizer.encode(t, add_bos=False) for t in texts]


@pytest.mark.slow
def test_decode_specials(tokenizer: Tokenizer) -> None:
    ids = [2, 105, *tokenizer.encode("user\nHi", add_bos=False), 106, 3, 1]
    assert tokenizer.decode(ids) == "user\nHi"
    assert tokenizer.decode(ids, skip_special=False) == "<bos><start_of_turn>user\nHi<end_of_turn><unk><eos>"
    assert tokenizer.decode(np.array(ids)) == "user\nHi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([262_144])


@pytest.mark.slow
def test_streaming_decode(tokenizer: Tokenizer) -> None:
    """Decoding the growing id list and printing the new suffix (holding back a trailing U+FFFD) works."""
    text = "Stream 𓀀 and 日本語 and 👩‍👩‍👧 and Ὂ done."
    ids = tokenizer.encode(text, add_bos=False)
    assert any(tokenizer.id_to_piece(i).startswith("<0x") for i in ids)  # a character split over bytes
    printed = ""
    for end in range(1, len(ids) + 1):
        stable = tokenizer.decode(ids[:end]).rstrip("\ufffd")
        assert stable.startswith(printed)
        printed = stable
    assert printed == text


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": " And 3+3?\n"},
]
EXPECTED_CHAT = (
    "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n4.<end_of_turn>\n"
    "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
)


@pytest.mark.slow
def test_chat_template(tokenizer: Tokenizer, reference) -> None:
    assert tokenizer.apply_chat_template(CONVERSATION) == EXPECTED_CHAT + "<start_of_turn>model\n"
    assert tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False) == EXPECTED_CHAT
    ids = tokenizer.encode_chat(CONVERSATION)
    assert ids == reference.encode(EXPECTED_CHAT + "<start_of_turn>model\n", add_special_tokens=False)
    assert ids[:2] == [2, 105] and ids.count(2) == 1
    assert ids[-3:] == [105, tokenizer.piece_to_id("model"), tokenizer.piece_to_id("\n")]
    plain = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]
    expected = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    assert tokenizer.apply_chat_template(plain, add_generation_prompt=False) == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "no messages"),
        ([{"role": "robot", "content": "beep"}], "role 'robot'"),
        ([{"content": "no role"}], "role None"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "role 'system'"),
        ([{"role": "system", "content": "alone"}], "needs a user message"),
        ([{"role": "model", "content": "first"}], "'user' was expected"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'model' was expected"),
        ([{"role": "user", "content": ["parts"]}], "no text content"),
    ],
)
def test_chat_template_rejects_bad_messages(tokenizer: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        tokenizer.apply_chat_template(messages)
    assert "\n" not in str(err.value)


def test_missing_files_raise(tmp_path: Path) -> None:
    for load in (Tokenizer.from_file, Tokenizer.from_gguf):
        with pytest.raises(GemstillError, match="not found") as err:
            load(tmp_path / "missing")
        assert "\n" not in str(err.value)


def test_not_a_model_raises(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a model " * 10)
    with pytest.raises(GemstillError, match="not a SentencePiece model"):
        Tokenizer.from_file(junk)
    with pytest.raises(GemstillError, match="not a readable GGUF file"):
        Tokenizer.from_gguf(junk)


def test_gguf_without_tokenizer_raises(tmp_path: Path) -> None:
    path = tmp_path / "weights-only.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GemstillError, match="no tokenizer metadata") as err:
        Tokenizer.from_gguf(path)
    assert "\n" not in str(err.value)
