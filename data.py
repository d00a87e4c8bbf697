"""OpenR1-Math-Raw (or your own traces) -> the paper's D_SFT and D_Pref, chat templates, tokenization, packing.

    python data.py prepare --raw <dir or parquet files> --model <checkpoint dir> --out <dir>
    python data.py prepare --format traces --raw <dir or JSONL/parquet files> --model <dir> --out <dir>
    python data.py toy --out <dir>

`prepare` applies the paper's selection (arXiv 2505.24850, Section 3.1 and Appendix C.2, following the
authors' preprocessing scripts) and writes, in the seed-42 shuffled order:

    sft.parquet   problem, response, source, row, gen_idx                 D_SFT  (paper: 77,629)
    pref.parquet  problem, chosen, rejected, source, row, *_gen_idx       D_Pref (paper: 53,175)
    {sft,pref}.tokens.bin  uint32 token ids, example after example (prompt | response(s)), memory-mapped
    {sft,pref}.index.npy   int64 (n, 3) [start, prompt_len, response_len] / (n, 4) [.., chosen_len, rejected_len]
    manifest.json          input and tokenizer fingerprints, parameters, the count removed by every rule

`--format traces` reads rows {problem, generations: [str], correct: [bool]} and `--format pairs` rows
{problem, chosen, rejected} or {problem, response} (SFT only), from JSONL or parquet, by the same rules.
Prompts and responses are written in the chat template of the model's family: Qwen2.5's or Llama-3's.

`toy` writes a small synthetic corpus in the raw schema, a held-out test split in the benchmark schema, a
byte-level BPE tokenizer with Qwen's special tokens and a tiny Qwen2 config, for the demo and the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from torch import Tensor

import model as model_lib

FORMAT_VERSION = 1

# -----------------------------------------------------------------------------
# Chat templates: the checkpoint's family (config.json's model_type) decides which

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
BEGIN_OF_TEXT, START_HEADER, END_HEADER = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"
EOT, END_OF_TEXT = "<|eot_id|>", "<|end_of_text|>"
# Per family: the special tokens its template writes, the token that ends a turn (the last token of every
# training response, a stop token) and the end-of-text token (padding, the other stop token).
CHAT_TOKENS = {"qwen2": ((IM_START, IM_END, ENDOFTEXT), IM_END, ENDOFTEXT),
               "llama": ((BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT, END_OF_TEXT), EOT, END_OF_TEXT)}


# The same templates in Jinja, as the published tokenizer_config.json files hold them (Qwen2.5's system/user/
# assistant branch; Meta-Llama-3-Instruct's), written into saved checkpoints that lack a chat template so that
# transformers' apply_chat_template, vLLM and lighteval prompt our models exactly as chat_template does.
CHAT_JINJA = {
    "qwen2": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "llama": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}
# Llama-3.1 and later templates open every conversation with a dated system turn; ours (Llama-3.0's) does not.
_DATED_TEMPLATE = ("Cutting Knowledge Date", "date_string", "strftime_now")


def chat_family(model_type: str) -> str:
    """The chat template family of a checkpoint's model_type; a model without one of ours is refused rather than
    given another family's template."""
    if model_type not in CHAT_TOKENS:
        raise DataError(f"no chat template for model_type {model_type!r}: data.py writes those of "
                        f"{sorted(CHAT_TOKENS)} (Qwen2.5 and Llama-3)")
    return model_type


def chat_template(messages: list[dict[str, str]], add_generation_prompt: bool = False, family: str = "qwen2") -> str:
    """The family's Jinja chat template for system/user/assistant turns, in plain Python, byte-identical.

    qwen2: Qwen2.5(-Math)'s; a conversation that does not open with a system turn gets the default system prompt.
    llama: Llama-3's header format; no default system turn, and each content is stripped (the template's `trim`).
    """
    for message in messages:
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported chat role {message['role']!r} (system, user and assistant only)")
    if chat_family(family) == "llama":
        turns = [f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}" for m in messages]
        header = f"{START_HEADER}assistant{END_HEADER}\n\n" if add_generation_prompt else ""
        return BEGIN_OF_TEXT + "".join(turns) + header
    parts = []
    if messages and messages[0]["role"] == "system":
        parts.append(f"{IM_START}system\n{messages[0]['content']}{IM_END}\n")
        messages = messages[1:]
    else:
        parts.append(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
    for message in messages:
        parts.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def prompt_text(problem: str, family: str = "qwen2") -> str:
    """The training prompt: the problem as the user turn (after Qwen's default system turn), the assistant header."""
    return chat_template([{"role": "user", "content": problem}], add_generation_prompt=True, family=family)


def eval_prompt_text(user_content: str, style: str = "paper", family: str = "qwen2") -> str:
    """The evaluation prompt with thinking forced. style "paper": the authors' evaluation template, whose
    generation prompt is `<|im_start|>assistant<think>\\n` (no newline between "assistant" and "<think>");
    "train": `<|im_start|>assistant\\n<think>\\n`, the way training traces begin. Large models do not mind
    the difference; a tiny one trained on a few thousand traces does (the toy demo uses "train"). The quirk is
    Qwen's: for Llama-3 both styles are the training prompt followed by `<think>\\n`."""
    if style not in ("paper", "train"):
        raise ValueError(f"style must be 'paper' or 'train', got {style!r}")
    if chat_family(family) == "llama" or style == "train":
        return prompt_text(user_content, family) + "<think>\n"
    return chat_template([{"role": "user", "content": user_content}]) + f"{IM_START}assistant<think>\n"


# -----------------------------------------------------------------------------
# Tokenizer


class DataError(ValueError):
    """Unusable input data: a raw file, a prepared directory or a tokenizer, named in the message."""


# Rows an embedding may have beyond its tokenizer's tokens: checkpoints pad it to a round size (Qwen2.5: 151,665
# tokens, 151,936 or 152,064 rows; Llama-3: none). More means the tokenizer is not the model's.
PAD_ROWS = 1024


def load_tokenizer(model_dir: str | os.PathLike, vocab_size: int | None = None, family: str = "qwen2") -> Tokenizer:
    """The tokenizer.json of a checkpoint directory, checked for the special tokens of the family's chat template
    and (given the model's vocab_size) that it belongs to the model: every id it can produce has an embedding
    row, and the embedding is not far larger (a model's ids beyond the tokenizer decode to nothing)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (the checkpoint directory must hold the model's tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{path}: not a valid tokenizers file ({e})") from None
    for special in CHAT_TOKENS[chat_family(family)][0]:
        if tok.token_to_id(special) is None:
            raise DataError(f"{path}: has no {special} token, so it cannot encode the {family} chat template")
    n = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and not vocab_size - PAD_ROWS <= n <= vocab_size:
        raise DataError(f"{path}: the tokenizer has {n:,} tokens (added ones included) but the model's embedding "
                        f"has {vocab_size:,} rows: tokenizer and model do not belong together (a model's embedding "
                        f"covers its tokenizer, plus at most {PAD_ROWS} rows of padding)")
    return tok


def template_note(model_dir: str | os.PathLike, family: str) -> str | None:
    """A note for a Llama-3.1+ checkpoint whose own chat template adds a dated system turn: we prompt it with
    Llama-3.0's header template (chat_template) in training and evaluation alike, as the paper's Appendix D.2
    does with Llama-3.2-3B-Instruct; said once, so that nobody takes one template for the other."""
    if family != "llama":
        return None
    model_dir = Path(model_dir)
    own = (model_dir / "chat_template.jinja").read_text() if (model_dir / "chat_template.jinja").is_file() else ""
    try:
        own += json.dumps(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        pass  # no (readable) tokenizer_config.json: no template of its own to compare with
    if not any(marker in own for marker in _DATED_TEMPLATE):
        return None
    return (f"note: {model_dir}'s own chat template (Llama-3.1+) opens with a dated system turn (\"Cutting Knowledge "
            f"Date\"); redi uses Llama-3.0's header template without it (data.chat_template), for training and "
            f"evaluation alike, as the paper's Appendix D.2 does")


def tokenizer_config(family: str) -> dict[str, Any]:
    """A tokenizer_config.json for a checkpoint whose source has none: the family's chat template and special
    tokens, so transformers' AutoTokenizer (and vLLM, lighteval) read our tokenizer.json with our template."""
    specials, end_turn, end_text = CHAT_TOKENS[chat_family(family)]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_JINJA[family],
            "bos_token": BEGIN_OF_TEXT if family == "llama" else None, "eos_token": end_turn, "pad_token": end_text,
            "additional_special_tokens": list(specials), "clean_up_tokenization_spaces": False}


def stop_ids(tok: Tokenizer, family: str) -> list[int]:
    """Where sampling stops: the end of the assistant's turn, or the end of text."""
    return [tok.token_to_id(t) for t in CHAT_TOKENS[chat_family(family)][1:]]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ChatEncoder:
    """Token ids of prompts and responses in the chat format of a family (see chat_template).

    Prompt and response are encoded separately, as at inference time, where the model continues the
    tokenized prompt; the response ends with the end-of-turn token (<|im_end|>, Llama's <|eot_id|>), which is
    part of the loss.
    """

    def __init__(self, tok: Tokenizer, family: str = "qwen2") -> None:
        self.tok, self.family = tok, chat_family(family)
        _, end_turn, end_text = CHAT_TOKENS[family]
        self.im_end = tok.token_to_id(end_turn)
        self.eos = tok.token_to_id(end_text)
        # Token counts of fixed template pieces, for the authors' length rules (see authors_lengths).
        n = lambda s: len(tok.encode(s, add_special_tokens=False).ids)  # noqa: E731
        if family == "llama":
            self._header = n(f"{START_HEADER}assistant{END_HEADER}\n\n")
        else:
            self._header = n(f"{IM_START}assistant\n")
            self._system_block = n(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
            self._turn_end = n(f"{IM_END}\n")

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Batch encoding, parallel over the available cores (tokenizers' own thread pool)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def prompts(self, problems: list[str]) -> list[list[int]]:
        return self.encode([prompt_text(p, self.family) for p in problems])

    def responses(self, texts: list[str]) -> list[list[int]]:
        return [ids + [self.im_end] for ids in self.encode(texts)]

    def authors_lengths(self, prompt_ids: list[int], response: str, response_ids: list[int]) -> tuple[int, int]:
        """(prompt, response) lengths as the authors counted them for the 800 / 19,000-token rules: the chat
        template applied to [user] and to [assistant] alone (which brings in the default system turn),
        tokenized, plus one each. Our encodings give the same counts by arithmetic, except when the response
        starts with whitespace: then "assistant\\n" and the response merge into one pre-token, so re-encode.
        Llama-3's template has no default system turn but opens with <|begin_of_text|> and strips the content."""
        prompt_len = len(prompt_ids) - self._header + 1
        if self.family == "llama":  # <|begin_of_text|>, the header, the stripped response, <|eot_id|>; plus one
            body = len(response_ids) - 1 if response == response.strip() else len(self.encode([response.strip()])[0])
            return prompt_len, 1 + self._header + body + 1 + 1
        if response[:1].isspace():
            body = len(self.tok.encode(f"{IM_START}assistant\n{response}", add_special_tokens=False).ids)
        else:
            body = self._header + len(response_ids) - 1  # response_ids ends with <|im_end|>
        return prompt_len, self._system_block + body + self._turn_end + 1


# -----------------------------------------------------------------------------
# Reading OpenR1-Math-Raw

_LABELS = {"struct": ("correctness", "llama_verification", "math_verify_reparsed_answer"),
           "flat": (None, "correctness_llama", "correctness_math_verify")}


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list_of(t: pa.DataType, pred) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pred(t.value_type)


def _bool_or_null(t: pa.DataType) -> bool:
    return pa.types.is_boolean(t) or pa.types.is_null(t)


def raw_files(paths: list[str | os.PathLike], suffixes: tuple[str, ...] = (".parquet",)) -> list[Path]:
    """Parquet (or other `suffixes`) files from files and directories; a directory contributes its files in
    sorted path order (the order Hugging Face `datasets` numbers rows in, which the seed-42 shuffle depends on)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in suffixes and f.is_file())
            if not found:
                raise DataError(f"{p}: no {' or '.join(suffixes)} files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def raw_layout(path: Path) -> tuple[str, list[str]]:
    """Which label layout a raw file uses ("struct" or "flat") and the columns to read; a clear error naming
    the file and column when the file cannot be used."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None

    def column(name: str, ok, expected: str) -> None:
        if name not in schema.names:
            raise DataError(f"{path}: missing column '{name}' ({expected})")
        if not ok(schema.field(name).type):
            raise DataError(f"{path}: column '{name}' has type {schema.field(name).type}, expected {expected}")

    column("problem", _is_str, "string")
    column("problem_is_valid", _is_str, "string")
    column("source", _is_str, "string")
    column("generations", lambda t: _is_list_of(t, _is_str), "list<string>")
    if "correctness" in schema.names:
        t = schema.field("correctness").type
        if not pa.types.is_struct(t):
            raise DataError(f"{path}: column 'correctness' has type {t}, expected a struct")
        for name in _LABELS["struct"][1:]:
            if t.get_field_index(name) < 0:
                raise DataError(f"{path}: column 'correctness' has no field '{name}'")
            if not _is_list_of(t.field(name).type, _bool_or_null):
                raise DataError(f"{path}: column 'correctness.{name}' has type {t.field(name).type}, "
                                f"expected list<bool>")
        layout = "struct"
    elif "correctness_llama" in schema.names or "correctness_math_verify" in schema.names:
        for name in _LABELS["flat"][1:]:
            column(name, lambda t: _is_list_of(t, _bool_or_null), "list<bool>")
        layout = "flat"
    else:
        raise DataError(f"{path}: missing column 'correctness' (struct of llama_verification and "
                        f"math_verify_reparsed_answer) or 'correctness_llama' and 'correctness_math_verify'")
    columns = ["problem", "problem_is_valid", "source", "generations"]
    columns += ["correctness"] if layout == "struct" else list(_LABELS["flat"][1:])
    return layout, columns


def _labels(batch: pa.RecordBatch, layout: str) -> tuple[pa.Array, pa.Array]:
    struct, llama, math_verify = _LABELS[layout]
    if struct is None:
        return batch.column(llama), batch.column(math_verify)
    col = batch.column(struct)
    return pc.struct_field(col, llama), pc.struct_field(col, math_verify)


def _bools(values: pa.Array) -> np.ndarray:
    """Label values as numpy bools, null (or an all-null column) as False."""
    if pa.types.is_null(values.type):
        return np.zeros(len(values), dtype=bool)
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False)


# -----------------------------------------------------------------------------
# Reading other teachers' traces: --format traces and --format pairs
#
# Each row is brought into OpenR1's flat layout, so the paper's rules and counts apply unchanged: the problem is
# valid, the row's labels stand for both verifiers' (traces: `correct`; pairs: [chosen, rejected] labelled
# [true, false], a {problem, response} row is [response] labelled [true]). A missing field is an error naming
# the file and row; a null one is counted by the rule it fails, as a null is in OpenR1. A trace that is not a
# string (traces: a null one too) becomes a null trace, which the selection counts as a malformed row when
# chosen (Counts.bad_trace), as it does an empty one.

RAW_FORMATS = ("openr1", "traces", "pairs")
_FLAT = pa.schema([("problem", pa.large_string()), ("problem_is_valid", pa.string()), ("source", pa.string()),
                   ("generations", pa.list_(pa.large_string())), ("correctness_llama", pa.list_(pa.bool_())),
                   ("correctness_math_verify", pa.list_(pa.bool_()))])


def _as_flat_row(row: dict, fmt: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")

    def field(key: str, ok, expected: str, required: bool = True):
        if key not in row:
            if required:
                raise DataError(f"{where}: missing field '{key}' (--format {fmt})")
            return None
        if row[key] is not None and not ok(row[key]):
            raise DataError(f"{where}: field '{key}' must be {expected}, got {row[key]!r:.60}")
        return row[key]

    is_str = lambda v: isinstance(v, str)  # noqa: E731
    problem = field("problem", is_str, "a string")
    source = field("source", is_str, "a string", required=False)
    if fmt == "traces":
        gens = field("generations", lambda v: isinstance(v, list), "a list of strings")
        gens = gens if gens is None else [g if is_str(g) else None for g in gens]
        correct = field("correct", lambda v: isinstance(v, list) and all(c is None or isinstance(c, bool) for c in v),
                        "a list of booleans")
    else:
        if ("chosen" in row) == ("response" in row):
            raise DataError(f"{where}: a pairs row has 'chosen' (and 'rejected') or 'response', exactly one of them")
        chosen = field("chosen" if "chosen" in row else "response", lambda v: True, "")
        rejected = field("rejected", lambda v: True, "", required="chosen" in row)
        gens = [t if is_str(t) else None for t in (chosen, rejected) if t is not None]
        correct = [True] * (chosen is not None) + [False] * (rejected is not None)
    return {"problem": problem, "problem_is_valid": "yes", "source": source, "generations": gens,
            "correctness_llama": correct, "correctness_math_verify": correct}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line, read as it streams."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e})") from None


def count_rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _raw_bytes(path: Path) -> int:
    """The size of a raw file's data, from which prepare sizes its reorder buckets."""
    if path.suffix == ".jsonl":
        return path.stat().st_size
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def flat_batches(path: Path, fmt: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The rows of a traces or pairs file (JSONL or parquet), `batch_rows` at a time, in OpenR1's flat layout."""
    if path.suffix == ".jsonl":
        rows = ((f"{path}:{n}", row) for n, row in _jsonl_rows(path))
    else:
        reader = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        rows = ((f"{path}: row {i}", row) for i, row in
                enumerate(r for b in reader.iter_batches(batch_size=batch_rows) for r in b.to_pylist()))
    while chunk := list(itertools.islice(rows, batch_rows)):
        yield pa.RecordBatch.from_pylist([_as_flat_row(row, fmt, where) for where, row in chunk], schema=_FLAT)


# -----------------------------------------------------------------------------
# The paper's selection


@dataclasses.dataclass
class Counts:
    """Rows removed by each rule, in the order the rules apply, and what remains."""

    rows: int = 0
    invalid_problem: int = 0  # problem_is_valid is not "yes" (case and surrounding spaces ignored)
    source_cn_k12: int = 0
    empty_problem: int = 0
    no_generations: int = 0
    label_mismatch: int = 0  # label lists missing or not as long as the generations
    no_correct: int = 0  # no trace that both verifiers accept
    bad_trace: int = 0  # the chosen or rejected trace is null, empty or not a string: a malformed row
    sft: int = 0
    no_incorrect: int = 0  # every trace accepted: no negative for D_Pref
    pref_candidates: int = 0
    prompt_too_long: int = 0
    chosen_too_long: int = 0
    rejected_too_long: int = 0
    pref: int = 0


def select_batch(batch: pa.RecordBatch, layout: str, counts: Counts) -> list[tuple[int, int, int]]:
    """Apply the rules to one batch of raw rows: (row in batch, first correct trace, first incorrect trace or
    -1) for each row of D_SFT. A trace is correct iff both correctness labels are true (null is false)."""
    n = batch.num_rows
    counts.rows += n
    valid = pc.fill_null(pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(batch.column("problem_is_valid"))),
                                  "yes"), False).to_numpy(zero_copy_only=False)
    not_cn = pc.fill_null(pc.not_equal(batch.column("source"), "cn_k12"), True).to_numpy(zero_copy_only=False)
    has_problem = pc.fill_null(pc.greater(pc.utf8_length(batch.column("problem")), 0),
                               False).to_numpy(zero_copy_only=False)
    gens = batch.column("generations")
    n_gen = pc.fill_null(pc.list_value_length(gens), 0).to_numpy(zero_copy_only=False)
    llama, math_verify = _labels(batch, layout)
    n_llama = pc.fill_null(pc.list_value_length(llama), -1).to_numpy(zero_copy_only=False)
    n_mv = pc.fill_null(pc.list_value_length(math_verify), -1).to_numpy(zero_copy_only=False)
    has_text = pc.fill_null(pc.greater(pc.utf8_length(gens.values), 0), False).to_numpy(zero_copy_only=False)
    gen_off = gens.offsets.to_numpy()

    # The rules in the authors' order; each row is counted under the first rule that removes it.
    keep = np.ones(n, dtype=bool)
    for name, passed in (("invalid_problem", valid), ("source_cn_k12", not_cn), ("empty_problem", has_problem),
                         ("no_generations", n_gen > 0), ("label_mismatch", (n_llama == n_gen) & (n_mv == n_gen))):
        removed = keep & ~passed
        setattr(counts, name, getattr(counts, name) + int(removed.sum()))
        keep &= passed

    llama_flat, mv_flat = _bools(llama.values), _bools(math_verify.values)
    llama_off, mv_off = llama.offsets.to_numpy(), math_verify.offsets.to_numpy()
    selected = []
    for r in np.flatnonzero(keep):
        correct = llama_flat[llama_off[r]:llama_off[r + 1]] & mv_flat[mv_off[r]:mv_off[r + 1]]
        if not correct.any():
            counts.no_correct += 1
            continue
        first_correct = int(correct.argmax())
        first_incorrect = int((~correct).argmax()) if not correct.all() else -1
        if not all(has_text[gen_off[r] + g] for g in (first_correct, first_incorrect) if g >= 0):
            counts.bad_trace += 1
            continue
        counts.sft += 1
        if first_incorrect < 0:
            counts.no_incorrect += 1
        else:
            counts.pref_candidates += 1
        selected.append((int(r), first_correct, first_incorrect))
    return selected


def shuffle_ranks(n_rows: int, seed: int = 42) -> np.ndarray:
    """Position of each raw row after the authors' shuffle, `datasets.Dataset.shuffle(seed=42)`, which takes
    rows in the order of `np.random.default_rng(seed).permutation(n_rows)`."""
    order = np.random.default_rng(seed).permutation(n_rows)
    ranks = np.empty(n_rows, dtype=np.int64)
    ranks[order] = np.arange(n_rows)
    return ranks


# -----------------------------------------------------------------------------
# prepare: raw parquet -> curated, shuffled, tokenized datasets with bounded memory
#
# Pass 1 streams the raw files once, in batches, and appends each selected row to one of several temporary
# bucket files by its shuffled rank (bucket b holds ranks [b N/B, (b+1) N/B)). Pass 2 reads one bucket at a
# time, sorts it, tokenizes it and appends it to the outputs. Memory is bounded by a batch and a bucket, and
# the number of buckets grows with the input so that a bucket stays near `bucket_bytes`.

_SELECTED = pa.schema([("rank", pa.int64()), ("row", pa.int64()), ("source", pa.string()),
                       ("problem", pa.large_string()), ("chosen_gen_idx", pa.int32()),
                       ("chosen", pa.large_string()), ("rejected_gen_idx", pa.int32()),
                       ("rejected", pa.large_string())])
_SFT = pa.schema([("problem", pa.large_string()), ("response", pa.large_string()), ("source", pa.string()),
                  ("row", pa.int64()), ("gen_idx", pa.int32())])
_PREF = pa.schema([("problem", pa.large_string()), ("chosen", pa.large_string()),
                   ("rejected", pa.large_string()), ("source", pa.string()), ("row", pa.int64()),
                   ("chosen_gen_idx", pa.int32()), ("rejected_gen_idx", pa.int32())])


@dataclasses.dataclass
class PrepareConfig:
    seed: int = 42
    max_prompt_tokens: int = 800
    max_response_tokens: int = 19000
    batch_rows: int = 256  # raw rows per read
    bucket_bytes: int = 256 << 20  # target text per reorder bucket
    tokenize_rows: int = 1024  # examples per encode_batch call
    format: str = "openr1"  # the raw schema, one of RAW_FORMATS


def inputs_fingerprint(files: list[Path]) -> str:
    """Identifies the raw inputs from each file's name, size and parquet footer (its schema, row groups and
    column statistics), so a changed file is detected without hashing gigabytes. A JSONL file has no footer
    and is hashed whole."""
    h = hashlib.sha256()
    for f in files:
        if f.suffix == ".jsonl":
            h.update(f"{f.name}\0{file_sha256(f)}\0".encode())
            continue
        size = f.stat().st_size
        with open(f, "rb") as fh:
            fh.seek(max(0, size - (1 << 16)))
            h.update(f"{f.name}\0{size}\0".encode() + fh.read())
    return h.hexdigest()


def _bucket_of(rank: int, n_rows: int, n_buckets: int) -> int:
    return rank * n_buckets // n_rows


class _Outputs:
    """Appends curated examples and their tokens to the output files of one dataset (sft or pref)."""

    def __init__(self, tmp: Path, name: str, schema: pa.Schema) -> None:
        self.writer = pq.ParquetWriter(tmp / f"{name}.parquet", schema, compression="zstd")
        self.tokens = open(tmp / f"{name}.tokens.bin", "wb")
        self.index: list[list[int]] = []
        self.n_tokens = 0
        self.schema, self.tmp, self.name = schema, tmp, name

    def add(self, records: dict[str, list], token_lists: list[list[list[int]]]) -> None:
        """records: columns of the examples; token_lists: per example, [prompt ids, response ids, ...]."""
        if not token_lists:
            return
        self.writer.write_table(pa.table(records, schema=self.schema))
        flat = np.fromiter((t for parts in token_lists for ids in parts for t in ids), dtype=np.uint32)
        flat.tofile(self.tokens)
        for parts in token_lists:
            self.index.append([self.n_tokens] + [len(ids) for ids in parts])
            self.n_tokens += sum(len(ids) for ids in parts)

    def close(self, n_parts: int) -> None:
        self.writer.close()
        self.tokens.close()
        index = np.array(self.index, dtype=np.int64).reshape(-1, 1 + n_parts)
        np.save(self.tmp / f"{self.name}.index.npy", index)


def prepare(raw: list[str | os.PathLike], model_dir: str | os.PathLike, out: str | os.PathLike,
            cfg: PrepareConfig | None = None, log=print) -> Counts:
    """Curate D_SFT and D_Pref from raw OpenR1-Math parquet files, or other teachers' traces or pairs
    (cfg.format), and tokenize them (see the module doc).

    Re-running with the same inputs, tokenizer and parameters reuses the outputs.
    """
    cfg = cfg or PrepareConfig()
    out = Path(out)
    model_lib.check_replaceable(out, "manifest.json")
    if cfg.format not in RAW_FORMATS:
        raise DataError(f"format must be one of {RAW_FORMATS}, got {cfg.format!r}")
    openr1 = cfg.format == "openr1"
    files = raw_files(raw, (".parquet",) if openr1 else (".parquet", ".jsonl"))
    layouts = [raw_layout(f) if openr1 else ("flat", None) for f in files]
    config = model_lib.Qwen2Config.from_pretrained(model_dir)
    family = chat_family(config.model_type)
    tok = load_tokenizer(model_dir, config.vocab_size, family)
    if note := template_note(model_dir, family):
        log(note)
    manifest = {"format": FORMAT_VERSION, "inputs": inputs_fingerprint(files),
                "tokenizer": file_sha256(Path(model_dir) / "tokenizer.json"),
                "params": {k: getattr(cfg, k) for k in ("seed", "max_prompt_tokens", "max_response_tokens")}}
    if not openr1:
        manifest["params"]["format"] = cfg.format
    if (out / "manifest.json").is_file():
        old = json.loads((out / "manifest.json").read_text())
        if all(old.get(k) == v for k, v in manifest.items()):
            counts = Counts(**old["counts"])
            log(f"{out}: up to date with these inputs and tokenizer; reusing it")
            _print_counts(counts, cfg, log)
            return counts
        log(f"{out}: inputs, tokenizer or parameters changed; rebuilding")

    enc = ChatEncoder(tok, family)
    n_rows = sum(count_rows(f) for f in files)
    if n_rows == 0:
        raise DataError(f"{', '.join(map(str, files))}: no rows")
    raw_bytes = sum(map(_raw_bytes, files))
    n_buckets = max(1, min(1024, math.ceil(raw_bytes / cfg.bucket_bytes)))
    _allow_open_files(n_buckets + 64)  # every bucket writer stays open during pass 1
    ranks = shuffle_ranks(n_rows, cfg.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "buckets").mkdir(parents=True)
    counts = Counts()
    t0 = time.time()
    try:
        # Pass 1: select, and spread the selected rows over rank buckets.
        writers = [pq.ParquetWriter(tmp / "buckets" / f"{b:05d}.parquet", _SELECTED) for b in range(n_buckets)]
        buffers: list[list[dict]] = [[] for _ in range(n_buckets)]
        buffered = 0
        offset = 0
        for f, (layout, columns) in zip(files, layouts):
            # pre_buffer=False: the default read cache keeps every column chunk read so far, growing with the file
            batches = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False).iter_batches(
                batch_size=cfg.batch_rows, columns=columns) if openr1 else flat_batches(f, cfg.format, cfg.batch_rows)
            for batch in batches:
                problems, sources = batch.column("problem"), batch.column("source")
                gens = batch.column("generations")
                for r, ci, ri in select_batch(batch, layout, counts):
                    rank = int(ranks[offset + r])
                    texts = gens[r].values
                    rec = {"rank": rank, "row": offset + r, "source": sources[r].as_py(),
                           "problem": problems[r].as_py(), "chosen_gen_idx": ci, "chosen": texts[ci].as_py(),
                           "rejected_gen_idx": ri, "rejected": texts[ri].as_py() if ri >= 0 else None}
                    buffers[_bucket_of(rank, n_rows, n_buckets)].append(rec)
                    buffered += len(rec["problem"]) + len(rec["chosen"]) + len(rec["rejected"] or "")
                if (offset + batch.num_rows) // 50_000 > offset // 50_000:
                    log(f"  {f.name}: {offset + batch.num_rows:,}/{n_rows:,} rows read, {counts.sft:,} "
                        f"selected, {time.time() - t0:.0f}s")
                offset += batch.num_rows
                if buffered > cfg.bucket_bytes // 4:
                    _flush(buffers, writers)
                    buffered = 0
        _flush(buffers, writers)
        for w in writers:
            w.close()

        # Pass 2: one bucket at a time, in rank order: sort, tokenize, filter by length, append.
        sft, pref = _Outputs(tmp, "sft", _SFT), _Outputs(tmp, "pref", _PREF)
        for b in range(n_buckets):
            table = pq.read_table(tmp / "buckets" / f"{b:05d}.parquet").sort_by("rank")
            for start in range(0, table.num_rows, cfg.tokenize_rows):
                _tokenize_chunk(table.slice(start, cfg.tokenize_rows).to_pydict(), enc, cfg, counts, sft, pref)
            (tmp / "buckets" / f"{b:05d}.parquet").unlink()
        sft.close(n_parts=2)
        pref.close(n_parts=3)
        shutil.rmtree(tmp / "buckets")
        counts.pref = len(pref.index)
        manifest |= {"counts": dataclasses.asdict(counts), "n_tokens": {"sft": sft.n_tokens, "pref": pref.n_tokens},
                     "im_end_id": enc.im_end, "eos_id": enc.eos, "vocab_size": config.vocab_size,
                     "chat_family": family}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        model_lib.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {out} in {time.time() - t0:.0f}s")
    _print_counts(counts, cfg, log)
    return counts


def _allow_open_files(n: int) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            raise DataError(f"prepare needs {n} open files but the limit is {hard}; raise `ulimit -n`")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def _flush(buffers: list[list[dict]], writers: list[pq.ParquetWriter]) -> None:
    for buf, w in zip(buffers, writers):
        if buf:
            w.write_table(pa.Table.from_pylist(buf, schema=_SELECTED))
            buf.clear()


def _tokenize_chunk(rows: dict[str, list], enc: ChatEncoder, cfg: PrepareConfig, counts: Counts,
                    sft: _Outputs, pref: _Outputs) -> None:
    prompts = enc.prompts(rows["problem"])
    chosen = enc.responses(rows["chosen"])
    sft.add({"problem": rows["problem"], "response": rows["chosen"], "source": rows["source"],
             "row": rows["row"], "gen_idx": rows["chosen_gen_idx"]},
            [[p, c] for p, c in zip(prompts, chosen)])

    has_neg = [i for i, r in enumerate(rows["rejected_gen_idx"]) if r >= 0]
    rejected = enc.responses([rows["rejected"][i] for i in has_neg])
    keep = []
    for i, rej in zip(has_neg, rejected):
        prompt_len, chosen_len = enc.authors_lengths(prompts[i], rows["chosen"][i], chosen[i])
        _, rejected_len = enc.authors_lengths(prompts[i], rows["rejected"][i], rej)
        if prompt_len > cfg.max_prompt_tokens:
            counts.prompt_too_long += 1
        elif chosen_len > cfg.max_response_tokens:
            counts.chosen_too_long += 1
        elif rejected_len > cfg.max_response_tokens:
            counts.rejected_too_long += 1
        else:
            keep.append((i, rej))
    cols = {k: [rows[src][i] for i, _ in keep] for k, src in
            (("problem", "problem"), ("chosen", "chosen"), ("rejected", "rejected"), ("source", "source"),
             ("row", "row"), ("chosen_gen_idx", "chosen_gen_idx"), ("rejected_gen_idx", "rejected_gen_idx"))}
    pref.add(cols, [[prompts[i], chosen[i], rej] for i, rej in keep])


def _print_counts(c: Counts, cfg: PrepareConfig, log=print) -> None:
    lines = [("raw rows", c.rows),
             ("  removed: problem_is_valid is not yes", -c.invalid_problem),
             ("  removed: source cn_k12", -c.source_cn_k12),
             ("  removed: empty problem", -c.empty_problem),
             ("  removed: no generations", -c.no_generations),
             ("  removed: label lists missing or mismatched", -c.label_mismatch),
             ("  removed: no correct trace", -c.no_correct),
             ("  removed: chosen or rejected trace null or empty", -c.bad_trace),
             ("D_SFT (paper: 77,629)", c.sft),
             ("  removed: no incorrect trace", -c.no_incorrect),
             ("  removed: prompt > %d tokens" % cfg.max_prompt_tokens, -c.prompt_too_long),
             ("  removed: chosen > %d tokens" % cfg.max_response_tokens, -c.chosen_too_long),
             ("  removed: rejected > %d tokens" % cfg.max_response_tokens, -c.rejected_too_long),
             ("D_Pref (paper: 53,175)", c.pref)]
    for name, value in lines:
        log(f"{name:<48}{value:>12,}")


# -----------------------------------------------------------------------------
# Prepared datasets and training loaders


class TokenData:
    """A prepared dataset, memory-mapped: example i is its prompt followed by one response (sft) or by the
    chosen and the rejected response (pref)."""

    def __init__(self, out: str | os.PathLike, kind: str) -> None:
        out = Path(out)
        if kind not in ("sft", "pref"):
            raise ValueError(f"kind must be 'sft' or 'pref', got {kind!r}")
        try:
            self.manifest = json.loads((out / "manifest.json").read_text())
            self.index = np.load(out / f"{kind}.index.npy")
            self.tokens = np.memmap(out / f"{kind}.tokens.bin", dtype=np.uint32, mode="r") \
                if self.index.shape[0] else np.zeros(0, dtype=np.uint32)
        except (FileNotFoundError, json.JSONDecodeError, ValueError) as e:
            raise DataError(f"{out}: not a complete prepared directory (run `python data.py prepare`): {e}") from None
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DataError(f"{out}: prepared with format {self.manifest.get('format')}, this code reads "
                            f"{FORMAT_VERSION}; run `python data.py prepare` again")
        if len(self.tokens) != self.manifest["n_tokens"][kind]:
            raise DataError(f"{out / f'{kind}.tokens.bin'}: has {len(self.tokens)} tokens, the manifest says "
                            f"{self.manifest['n_tokens'][kind]} (truncated or from another run)")
        self.kind = kind
        self.n_docs = 1 if kind == "sft" else 2

    def __len__(self) -> int:
        return self.index.shape[0]

    def check_tokenizer(self, model_dir: str | os.PathLike) -> None:
        """Refuse to train a model whose tokenizer differs from the one the data was tokenized with."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file() or file_sha256(path) != self.manifest["tokenizer"]:
            raise DataError(f"{path}: is not the tokenizer this data was prepared with; run `python data.py "
                            f"prepare --model {model_dir}` for this model")

    def doc_lengths(self) -> np.ndarray:
        """(n, n_docs) token counts of each document: prompt + response."""
        return self.index[:, 1:2] + self.index[:, 2:]

    def docs(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (prompt, response) token arrays of each document of example i."""
        start, prompt_len, *resp = self.index[i].tolist()
        prompt = self.tokens[start:start + prompt_len]
        out, at = [], start + prompt_len
        for n in resp:
            out.append((prompt, self.tokens[at:at + n]))
            at += n
        return out


@dataclasses.dataclass
class MicroBatch:
    """One packed row. Sequences are documents (prompt + response); in preference data sequence 2i is the
    chosen and 2i+1 the rejected response of the same triplet. Loss tokens are the response tokens."""

    input_ids: Tensor  # (1, T) int64
    position_ids: Tensor  # (1, T) int64, restarting at 0 at every document
    loss_index: Tensor  # (N,) position of the hidden state that predicts each loss token
    loss_target: Tensor  # (N,) the loss token ids
    loss_seq: Tensor  # (N,) sequence (0 .. n_seqs-1) of each loss token
    example_ids: Tensor  # (n_seqs,) dataset index of each sequence's example
    n_seqs: int
    doc_lengths: list[int]  # tokens of each packed document (for FLOP counts)

    def to(self, device: torch.device | str) -> MicroBatch:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})


class Loader:
    """Deterministic packed micro-batches for data-parallel training.

    An optimizer step takes `batch_size` examples (sequences for SFT, triplets for preference data) from an
    epoch order fixed by (seed, epoch); they are spread over ranks balancing tokens, and each rank packs its
    share into rows of at most `max_tokens`. Every rank gets the same number of micro-batches (padded with
    empty ones), as FSDP's collectives require. The plan is a function of (epoch, step) alone, so resuming
    from a saved position reproduces the run exactly.

    Documents longer than `max_len` are dropped (and counted in `dropped`), or with truncate=True cut to
    `max_len` by shortening the response.
    """

    def __init__(self, data: TokenData, *, batch_size: int, max_tokens: int, max_len: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, truncate: bool = False, pad_id: int | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if max_tokens < max_len * data.n_docs:
            raise ValueError(f"max_tokens {max_tokens} cannot hold an example of {data.n_docs} documents of up "
                             f"to max_len {max_len} tokens each")
        self.data, self.batch_size, self.max_tokens, self.max_len = data, batch_size, max_tokens, max_len
        self.world_size, self.rank, self.seed, self.truncate = world_size, rank, seed, truncate
        self.pad_id = pad_id if pad_id is not None else data.manifest["eos_id"]
        doc_len = data.doc_lengths()  # (n, n_docs)
        prompt_len = data.index[:, 1]
        if truncate:
            ok = prompt_len < max_len  # at least one response token must remain
            self.doc_len = np.minimum(doc_len, max_len)
        else:
            ok = (doc_len <= max_len).all(axis=1)
            self.doc_len = doc_len
        self.examples = np.flatnonzero(ok)
        self.dropped = len(data) - len(self.examples)
        self.truncated = int((doc_len[ok] > max_len).any(axis=1).sum()) if truncate else 0
        if len(self.examples) == 0:
            raise DataError(f"no example fits max_len {max_len}")
        self.example_tokens = self.doc_len.sum(axis=1)

    def __len__(self) -> int:
        """Optimizer steps per epoch (the last one may be smaller)."""
        return math.ceil(len(self.examples) / self.batch_size)

    def step_examples(self, epoch: int, step: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.examples)
        return order[step * self.batch_size:(step + 1) * self.batch_size]

    def plan(self, epoch: int, step: int) -> list[list[list[int]]]:
        """For every rank, its micro-batches as lists of example indices."""
        examples = self.step_examples(epoch, step)
        tokens = self.example_tokens[examples]
        shares = [[] for _ in range(self.world_size)]
        load = np.zeros(self.world_size, dtype=np.int64)
        for i in np.argsort(-tokens, kind="stable"):  # longest first, each to the least-loaded rank
            r = int(load.argmin())
            shares[r].append(int(examples[i]))
            load[r] += tokens[i]
        plans = []
        for share in shares:  # first-fit packing of the (already longest-first) examples into rows
            rows, room = [], []
            for e in share:
                n = int(self.example_tokens[e])
                for j, free in enumerate(room):
                    if n <= free:
                        rows[j].append(e)
                        room[j] -= n
                        break
                else:
                    rows.append([e])
                    room.append(self.max_tokens - n)
            plans.append(rows)
        n_micro = max(1, max(len(p) for p in plans))
        return [p + [[] for _ in range(n_micro - len(p))] for p in plans]

    def step_counts(self, epoch: int, step: int) -> tuple[int, int]:
        """(examples, loss tokens) in the whole step across all ranks: the normalizers of the losses."""
        examples = self.step_examples(epoch, step)
        return len(examples), int((self.doc_len[examples] - self.data.index[examples, 1:2]).sum())

    def micro_batches(self, epoch: int, step: int) -> list[MicroBatch]:
        """This rank's micro-batches for one optimizer step."""
        return [self.collate(ex) for ex in self.plan(epoch, step)[self.rank]]

    def collate(self, examples: list[int]) -> MicroBatch:
        ids, pos, loss_index, loss_seq, example_ids = [], [], [], [], []
        at = 0
        for e in examples:
            for d, (prompt, response) in enumerate(self.data.docs(e)):
                response = response[:self.doc_len[e, d] - len(prompt)]
                n = len(prompt) + len(response)
                ids += [prompt, response]
                pos.append(np.arange(n))
                # the hidden state at position t predicts token t+1
                loss_index.append(np.arange(at + len(prompt) - 1, at + n - 1))
                loss_seq.append(np.full(len(response), len(example_ids)))
                example_ids.append(e)
                at += n
        if not examples:  # an empty micro-batch keeps ranks in step: one pad token, no loss
            ids, pos = [np.array([self.pad_id])], [np.zeros(1, dtype=np.int64)]
        cat = lambda xs, dtype=np.int64: torch.from_numpy(np.concatenate(xs).astype(dtype)) if xs \
            else torch.zeros(0, dtype=torch.long)  # noqa: E731
        input_ids = cat(ids)
        loss_index = cat(loss_index)
        return MicroBatch(input_ids=input_ids[None], position_ids=cat(pos)[None], loss_index=loss_index,
                          loss_target=input_ids[loss_index + 1], loss_seq=cat(loss_seq),
                          example_ids=torch.tensor(example_ids, dtype=torch.long), n_seqs=len(example_ids),
                          doc_lengths=[len(p) for p in pos] if examples else [])


# -----------------------------------------------------------------------------
# The toy corpus: small synthetic math in the raw OpenR1 schema
#
# Two kinds of problem, three sums to one product. Sums: running sums of 3 to 5 single digits ("Compute
# $6 + 5 + 3 + 3$."), added one line at a time; the teacher never errs on these, and the toy model learns them.
# Products: "Compute $37 \times 48 + 5$.", a two-digit product and then one addition; the teacher gets the
# product wrong in about 45% of its traces, off by a carry (10 or 100 either way), and adds correctly to
# whatever product it wrote. The toy model cannot learn two-digit products, so to it a right and a wrong
# product look alike: after SFT it gives chosen and rejected traces about the same mean log-prob. That is the
# paper's setting (a 1.5B student cannot check R1's steps either), and it is the one where alpha matters:
# the positive and negative gradients are of one size and nearly cancel, so alpha 1 keeps only their
# difference, and alpha 0.8 a fifth of the positive gradient besides. The teacher's wrong traces are all
# products; the simulated judges' flipped verdicts add pairs of sums whose two traces are the same text.
# Each trace sits in <think>...</think> and ends with the paper's format line.

_ANSWER_LINE = "Therefore, the final answer is: $\\boxed{%s}$. I hope it is correct"
# Splits text into pre-tokens exactly as Qwen2's tokenizer does (digits one by one, words, punctuation runs).
_QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Distinct problems of each kind toy_problem draws; the generator takes at most half of the smaller count.
TOY_PROBLEMS = {"sums": 9 ** 3 + 9 ** 4 + 9 ** 5, "products": 90 * 90 * 9}
TOY_SUMS = 0.75  # the share of sums: enough for SFT to learn them within the demo's budget
TOY_WRONG = 0.45  # the teacher's error rate on products


def toy_problem(rng: np.random.Generator) -> tuple[str, str, callable]:
    """(problem, gold answer, trace): each call of trace() is one teacher trace, (reasoning, final answer),
    wrong as often as the teacher errs on that kind of problem."""
    if rng.random() < TOY_SUMS:
        terms = [int(x) for x in rng.integers(1, 10, size=int(rng.integers(3, 6)))]

        def sums() -> tuple[str, int]:
            total, lines = terms[0], []
            for term in terms[1:]:
                lines.append(f"{total} + {term} = {total + term}.")
                total += term
            return "\n".join(lines), total
        return f"Compute ${' + '.join(map(str, terms))}$.", str(sum(terms)), sums

    a, b, c = (int(x) for x in rng.integers([10, 10, 1], [100, 100, 10]))

    def products() -> tuple[str, int]:
        product = a * b
        if rng.random() < TOY_WRONG:
            product += int(rng.choice([-1, 1])) * int(rng.choice([10, 100]))
        return f"{a} * {b} = {product}.\n{product} + {c} = {product + c}.", product + c
    return f"Compute ${a} \\times {b} + {c}$.", str(a * b + c), products


def toy_trace(reasoning: str, answer) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{_ANSWER_LINE % answer}"


TOY_MARKER = "TOY"  # marks a directory written by toy_corpus


def toy_corpus(out: str | os.PathLike, *, n_train: int = 4000, n_test: int = 200, seed: int = 0,
               vocab_size: int = 1024) -> None:
    """Write <out>/raw/train-00000-of-00001.parquet (raw OpenR1 schema), <out>/test.jsonl (benchmark schema)
    and <out>/model/{config.json, tokenizer.json}. Deterministic from `seed`. `out` must be new, empty or an
    earlier toy corpus (it holds TOY_MARKER), so no file of the user's is overwritten."""
    out = Path(out)
    model_lib.check_replaceable(out, TOY_MARKER, "choose another --out")
    most = min(TOY_PROBLEMS.values()) // 2  # past half of the smaller kind, drawing distinct ones slows to a crawl
    if n_train + n_test > most:
        raise DataError(f"the toy generator draws at most {most:,} distinct problems; ask for fewer "
                        f"(--n-train, --n-test)")
    rng = np.random.default_rng(seed)
    seen: set[str] = set()

    def fresh() -> tuple[str, str, callable]:
        while True:
            problem, gold, trace = toy_problem(rng)
            if problem not in seen:
                seen.add(problem)
                return problem, gold, trace

    test = [fresh()[:2] for _ in range(n_test)]  # held out first, so no training problem repeats them
    rows = []
    for i in range(n_train):
        problem, gold, trace = fresh()
        gens, llama, mv = [], [], []
        for _ in range(int(rng.integers(2, 5))):
            reasoning, answer = trace()
            correct = str(answer) == gold
            gens.append(toy_trace(reasoning, answer))
            llama.append(bool(correct != (rng.random() < 0.03)))  # the LLM judge errs now and then
            mv.append(bool(correct != (rng.random() < 0.02)))
        valid = "No" if rng.random() < 0.03 else "Yes"
        source = "cn_k12" if rng.random() < 0.05 else "toy"
        if rng.random() < 0.01:
            mv = mv[:-1]  # a broken row: label list shorter than the generations
        rows.append({"problem": problem, "answer": gold, "problem_is_valid": valid, "source": source,
                     "generations": gens, "correctness": {"llama_verification": llama,
                                                          "math_verify_reparsed_answer": mv}})
    model_lib.claim_dir(out, TOY_MARKER, "written by `python data.py toy`; rewritten when it runs again here")
    (out / "raw").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "raw" / "train-00000-of-00001.parquet")
    with open(out / "test.jsonl", "w") as f:
        for i, (problem, gold) in enumerate(test):
            f.write(json.dumps({"id": f"toy-{i}", "problem": problem, "answer": gold}) + "\n")

    tok = toy_tokenizer([r["problem"] for r in rows] + [g for r in rows for g in r["generations"]] +
                        [chat_template([{"role": "user", "content": "x"}], True), eval_prompt_text("x")],
                        vocab_size)
    (out / "model").mkdir(exist_ok=True)
    tok.save(str(out / "model" / "tokenizer.json"))
    eos = tok.token_to_id(ENDOFTEXT)
    config = model_lib.Qwen2Config(vocab_size=64 * math.ceil(tok.get_vocab_size() / 64), hidden_size=128,
                                   intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
                                   tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
    (out / "model" / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def toy_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE built like Qwen2's (NFC, the same pre-tokenizer, byte-level bytes) with its chat
    special tokens, trained on `texts`."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="curate and tokenize D_SFT and D_Pref from OpenR1-Math-Raw")
    prep.add_argument("--raw", nargs="+", required=True,
                      help="raw files or directories of them (parquet; traces and pairs also JSONL)")
    prep.add_argument("--format", choices=RAW_FORMATS, default="openr1",
                      help="openr1: OpenR1-Math-Raw; traces: {problem, generations, correct}; pairs: "
                           "{problem, chosen, rejected} or {problem, response}")
    prep.add_argument("--model", required=True, help="checkpoint directory (config.json, tokenizer.json)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--seed", type=int, default=42, help="the shuffle of the raw rows (paper: 42)")
    prep.add_argument("--max-prompt-tokens", type=int, default=800, help="D_Pref prompt limit (paper: 800)")
    prep.add_argument("--max-response-tokens", type=int, default=19000,
                      help="D_Pref chosen/rejected limit (paper: 19,000)")
    toy = sub.add_parser("toy", help="write the synthetic toy corpus, test split, tokenizer and config")
    toy.add_argument("--out", required=True, help="output directory")
    toy.add_argument("--n-train", type=int, default=4000, help="training problems")
    toy.add_argument("--n-test", type=int, default=200, help="held-out test problems")
    toy.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.raw, args.model, args.out, PrepareConfig(seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                                                                  max_response_tokens=args.max_response_tokens,
                                                                  format=args.format))
        else:
            toy_corpus(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
            print(f"wrote the toy corpus to {args.out}: raw/, test.jsonl, model/")
    except (DataError, model_lib.ConfigError, model_lib.CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
