"""Reading labelled text files and turning them into length-grouped, padded batches.

Three formats, chosen by file suffix: ``.tsv`` and ``.csv`` and ``.jsonl`` (one object a line).
Columns (TSV/CSV) and keys (JSONL) are found by name: the text in ``text`` or ``sentence``, the
label in ``label``, or the names given with ``--text-column`` / ``--label-column``. Only a file
without a header line (its first row looks like data) is read by position, the text first and the
label last. Labels in a file may be names or integer indices into the label list, so SST-2's
``0``/``1`` map onto ``negative``/``positive``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: Header names (and JSONL keys) read as the text and as the label when no column is named.
TEXT_NAMES: tuple[str, ...] = ("text", "sentence")
LABEL_NAMES: tuple[str, ...] = ("label",)
_HEADER_PROBE_ROWS = 1000


class DataError(ValueError):
    """Bad input data; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class RawExample:
    text: str
    label: str
    line: int
    """1-based line number in the source file, for error messages."""


@dataclass(frozen=True)
class Columns:
    """Which column (TSV/CSV header name) or key (JSONL) holds the text and the label.

    ``None`` means the format's default: first/last column, ``text``/``label`` key.
    """

    text: str | None = None
    label: str | None = None


def read_examples(path: str | Path, columns: Columns = Columns(), limit: int | None = None) -> list[RawExample]:
    """All (text, label) rows of a TSV, CSV or JSONL file, at most ``limit`` of them (first rows)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        examples = _read_delimited(path, "\t" if suffix == ".tsv" else ",", columns, limit)
    elif suffix in (".jsonl", ".json"):
        examples = _read_jsonl(path, columns, limit)
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; use .tsv, .csv or .jsonl")
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _read_delimited(path: Path, delimiter: str, columns: Columns, limit: int | None) -> list[RawExample]:
    with path.open(encoding="utf-8", newline="") as handle:
        # QUOTE_NONE for TSV: texts contain quotes that are part of the sentence, never field quoting.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        rows = [(line, row) for line, row in enumerate(csv.reader(handle, delimiter=delimiter, quoting=quoting), 1)]
    rows = [(line, row) for line, row in rows if row]
    if not rows:
        raise DataError(f"{path}: no examples")
    first_line, first = rows[0]
    if len(first) < 2:
        raise DataError(f"{path}:{first_line}: needs at least two columns (a text and a label), got {first!r}")
    if _is_header(first, rows[1 : 1 + _HEADER_PROBE_ROWS], columns):
        text_index, label_index = _columns_by_name(path, first, columns)
        body = rows[1:]
    elif columns.text or columns.label:
        raise DataError(f"{path}: columns are named on the command line, but the file has no header line")
    else:
        log.warning(
            "%s: no header line (the first row looks like data); reading the text from the first column and the "
            "label from the last",
            path,
        )
        text_index, label_index = 0, len(first) - 1
        body = rows
    examples = []
    for line, row in body:
        if len(row) != len(first):
            raise DataError(f"{path}:{line}: expected {len(first)} fields like line {first_line}, got {len(row)}")
        examples.append(RawExample(row[text_index], row[label_index].strip(), line))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _is_header(first: list[str], following: list[tuple[int, list[str]]], columns: Columns) -> bool:
    """Whether the first row names the columns: it holds a column asked for or a known name, or else its last
    field never occurs as a label below it (a data row's label does, in any file of more than a few rows)."""
    names = {cell.strip().lower() for cell in first}
    wanted = {name.lower() for name in (columns.text, columns.label) if name}
    if names & (wanted | set(TEXT_NAMES) | set(LABEL_NAMES)):
        return True
    labels = {row[-1].strip() for _, row in following if len(row) == len(first)}
    return first[-1].strip() not in labels


def _columns_by_name(path: Path, header: list[str], columns: Columns) -> tuple[int, int]:
    """``(text index, label index)`` from the header: the names asked for, else the known ones; a column
    that is neither is the text or the label only when it is the one column left."""
    label_index = _find_column(path, header, columns.label, LABEL_NAMES, "label", "--label-column")
    text_index = _find_column(path, header, columns.text, TEXT_NAMES, "text", "--text-column")
    if label_index is None and text_index is None:
        if len(header) != 2:
            raise DataError(
                f"{path}: the header {header} names no text ({'/'.join(TEXT_NAMES)}) and no label "
                f"({'/'.join(LABEL_NAMES)}) column; name them with --text-column and --label-column"
            )
        log.warning(
            "%s: the header %s names no text (%s) and no label (%s) column; reading the text from %r and the label "
            "from %r by position (name them with --text-column and --label-column)",
            path, header, "/".join(TEXT_NAMES), "/".join(LABEL_NAMES), header[0], header[1],
        )  # fmt: skip
        return 0, 1
    for role, flag, known in (("label", "--label-column", LABEL_NAMES), ("text", "--text-column", TEXT_NAMES)):
        found = label_index if role == "label" else text_index
        if found is not None:
            continue
        others = [index for index in range(len(header)) if index not in (label_index, text_index)]
        if len(others) != 1:
            raise DataError(
                f"{path}: the header {header} has no {role} column ({'/'.join(known)}); name it with {flag}"
            )
        if role == "label":
            label_index = others[0]
        else:
            text_index = others[0]
    if text_index == label_index:
        raise DataError(f"{path}: the text and the label are the same column {header[text_index]!r}")
    inferred = columns.text is None or columns.label is None
    if inferred and (text_index, label_index) != (0, len(header) - 1):  # a layout reading by position got wrong
        log.warning(
            "%s: the header %s does not put the text first and the label last; reading the text from %r "
            "(column %d) and the label from %r (column %d), by name",
            path, header, header[text_index], text_index + 1, header[label_index], label_index + 1,
        )  # fmt: skip
    return text_index, label_index


def _find_column(
    path: Path, header: list[str], asked: str | None, known: tuple[str, ...], role: str, flag: str
) -> int | None:
    """The index of the column ``asked`` for (an error if absent), else of the one known name present (an error
    if several are), else None."""
    if asked is not None:
        if asked in header:
            return header.index(asked)
        raise DataError(f"{path}: no {role} column {asked!r}; the header has {header}")
    found = [index for index, cell in enumerate(header) if cell.strip().lower() in known]
    if len(found) > 1:
        names = ", ".join(repr(header[index]) for index in found)
        raise DataError(f"{path}: the header has several {role} columns ({names}); choose one with {flag}")
    return found[0] if found else None


def _read_jsonl(path: Path, columns: Columns, limit: int | None) -> list[RawExample]:
    label_key = columns.label or LABEL_NAMES[0]
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line, content in enumerate(handle, start=1):
            if not content.strip():
                continue
            try:
                record = json.loads(content)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
            text_key = columns.text or next((name for name in TEXT_NAMES if name in record), TEXT_NAMES[0])
            for key in (text_key, label_key):
                if key not in record:
                    raise DataError(f"{path}:{line}: no key {key!r}; the object has {sorted(record)}")
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line}: {text_key!r} must be a string, got {type(text).__name__}")
            examples.append(RawExample(text, str(record[label_key]).strip(), line))
            if limit is not None and len(examples) >= limit:
                break
    return examples


# ---- labels -------------------------------------------------------------------------------------


def infer_label_names(examples: Sequence[RawExample]) -> list[str]:
    """Sorted unique label values: the label list when none is given."""
    names = sorted({example.label for example in examples})
    if len(names) < 2:
        raise DataError(f"need at least two distinct labels to train a classifier, found {names}")
    return names


def parse_label_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if len(names) < 2 or any(not name for name in names) or len(set(names)) != len(names):
        raise DataError(f"--label-names needs at least two distinct, non-empty, comma-separated names, got {text!r}")
    return names


def label_indices(examples: Sequence[RawExample], names: Sequence[str], source: str) -> list[int]:
    """Map each example's label to its index: a name in ``names``, or an integer index into it.

    Names win over indices, so a label list of ``["0", "1"]`` behaves as expected.
    """
    by_name = {name: index for index, name in enumerate(names)}
    indices = []
    for example in examples:
        index = by_name.get(example.label)
        if index is None:
            try:
                index = int(example.label)
            except ValueError:
                index = -1
            if not 0 <= index < len(names):
                raise DataError(
                    f"{source}:{example.line}: label {example.label!r} is neither one of {list(names)} "
                    f"nor an index 0..{len(names) - 1} into them"
                )
        indices.append(index)
    return indices


# ---- tokenised dataset and batches --------------------------------------------------------------


@dataclass
class EncodedDataset:
    """Token ids (unpadded, truncated to ``max_length``) and label indices of a labelled file."""

    input_ids: list[list[int]]
    labels: list[int]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def encode(
    examples: Sequence[RawExample], labels: Sequence[int], tokenizer, max_length: int, pad_token_id: int | None = None
) -> EncodedDataset:
    encoded = tokenizer([example.text for example in examples], truncation=True, max_length=max_length)
    pad = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id or 0)
    return EncodedDataset(input_ids=list(encoded["input_ids"]), labels=list(labels), pad_token_id=pad)


@dataclass
class Batch:
    indices: Tensor
    """Positions of the rows in the dataset (for putting per-example results back in order)."""
    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(tensor.to(device) for tensor in vars(self).values()))


def collate(dataset: EncodedDataset, indices: Sequence[int]) -> Batch:
    """Right-pad the rows to the longest one in the batch (dynamic padding)."""
    width = max(len(dataset.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), dataset.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, index in enumerate(indices):
        tokens = dataset.input_ids[index]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    labels = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long)
    # Single-sentence inputs: segment 0 everywhere, as the tokenizer would produce.
    return Batch(torch.tensor(list(indices)), ids, mask, torch.zeros_like(ids), labels)


def training_batches(dataset: EncodedDataset, batch_size: int, seed: int, bucket_batches: int = 50) -> list[list[int]]:
    """Length-grouped batches in random order, deterministic given ``seed``.

    Shuffle, cut into buckets of ``bucket_batches`` batches, sort each bucket by length, cut it
    into batches, shuffle the batches: little padding, and still a different mix every epoch.
    """
    rng = random.Random(seed)
    order = list(range(len(dataset)))
    rng.shuffle(order)
    lengths = dataset.lengths()
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def evaluation_batches(dataset: EncodedDataset, batch_size: int) -> list[list[int]]:
    """Batches of similar length in a fixed order (results do not depend on it: batch invariance)."""
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def iterate(dataset: EncodedDataset, batches: Sequence[Sequence[int]]) -> Iterator[Batch]:
    for indices in batches:
        yield collate(dataset, indices)


def encode_file(
    path: str | Path,
    columns: Columns,
    names: Sequence[str],
    tokenizer,
    max_length: int,
    limit: int | None = None,
) -> EncodedDataset:
    """Read and tokenise a labelled file against a fixed label list (a checkpoint's)."""
    examples = read_examples(path, columns, limit)
    return encode(examples, label_indices(examples, names, str(path)), tokenizer, max_length)
