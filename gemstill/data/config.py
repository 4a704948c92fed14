"""The `data` section of a profile, and the tokenizer trained for a from-scratch teacher."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gemstill.config import VOCAB_SIZE

# Distinct solvable Game-of-24 puzzles with numbers 1..13 number about 1,360; stay well below so sampling ends fast.
MAX_GAME24 = 1000


class GeneratedCorpusConfig(BaseModel):
    """Generated problems whose answers code can check, so a distilled student can be scored exactly."""

    model_config = ConfigDict(extra="forbid")
    arithmetic: int = Field(2000, ge=0, description="number of multi-step arithmetic word problems")
    game24: int = Field(500, ge=0, le=MAX_GAME24, description="number of distinct solvable Game-of-24 puzzles")
    basic: int = Field(0, ge=0, description="number of one- or two-step problems on single-digit numbers")
    tot_exercises: bool = Field(
        False,
        description="also teach the tree-of-thought language on each trained Game-of-24 puzzle: a propose "
        "exercise (next steps) and a value exercise (sure / impossible) per reached state",
    )
    seed: int = Field(0, description="seed of the generators; the same seed gives the same problems")
    heldout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of problems kept apart for evaluation and never trained on"
    )


class FilesConfig(BaseModel):
    """Local data files read through `datasets`, never from the network."""

    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, description="local files or glob patterns (** allowed)")
    format: Literal["json", "parquet", "text"] | None = Field(
        None, description="file format; None infers it from the extension (.json/.jsonl: json, .txt: text)"
    )
    text_field: str = Field("text", description="column holding plain text (one document per row)")
    messages_field: str | None = Field(
        None, description="column holding chat messages [{role, content}]; takes precedence over text_field when set"
    )


class PythonDocsConfig(BaseModel):
    """The docstrings of the Python standard library (gemstill.data.python_docs) as plain-text documents."""

    model_config = ConfigDict(extra="forbid")
    max_documents: int | None = Field(None, ge=1, description="cap on documents, in file order")
    min_chars: int = Field(200, ge=1, description="shorter docstrings are skipped")


class DataConfig(BaseModel):
    """Where the training text comes from and how it is cut into packed fixed-length sequences."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["generated", "files", "python-docs"] = Field(
        "generated", description="generated problems, local files, or the Python standard library's docstrings"
    )
    generated: GeneratedCorpusConfig = Field(
        default_factory=GeneratedCorpusConfig, description="the generated corpus (source: generated)"
    )
    files: FilesConfig | None = Field(None, description="the local files (required when source: files)")
    python_docs: PythonDocsConfig = Field(
        default_factory=PythonDocsConfig, description="the docstring corpus (source: python-docs)"
    )
    seq_len: int = Field(256, ge=16, description="tokens per packed sequence")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of documents held for validation")
    seed: int = Field(0, description="seed of the document shuffle before packing")
    max_sequences: int | None = Field(None, ge=1, description="cap on packed train sequences, for quick runs")
    chat_template: bool = Field(
        True, description="format question/answer pairs as Gemma chat turns with loss on the model turn only"
    )

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source == "files" and self.files is None:
            raise ValueError("data.source is 'files' but data.files is missing; add data.files.paths")
        return self


class TokenizerTrainingConfig(BaseModel):
    """A SentencePiece BPE model trained on the corpus, for a teacher trained from scratch."""

    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(
        1024, ge=300, le=VOCAB_SIZE, description="upper bound on pieces (fewer when the corpus has too few merges)"
    )
