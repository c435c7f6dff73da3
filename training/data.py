"""Reading labelled text files and turning them into length-grouped, padded batches.

Three formats, chosen by file suffix: ``.tsv`` and ``.csv`` (a header line, then rows; by
default the first column is the text and the last the label) and ``.jsonl`` (one object a
line; by default keys ``text`` and ``label``). Labels in a file may be names or integer
indices into the label list, so SST-2's ``0``/``1`` map onto ``negative``/``positive``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


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
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise DataError(f"{path}: needs a header line with at least two columns, got {header!r}")
        text_index = _column_index(path, header, columns.text, default=0, role="text")
        label_index = _column_index(path, header, columns.label, default=len(header) - 1, role="label")
        examples = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: expected {len(header)} fields like the header, got {len(row)}")
            examples.append(RawExample(row[text_index], row[label_index].strip(), line))
            if limit is not None and len(examples) >= limit:
                break
    return examples


def _column_index(path: Path, header: list[str], name: str | None, default: int, role: str) -> int:
    if name is None:
        return default
    if name in header:
        return header.index(name)
    raise DataError(f"{path}: no {role} column {name!r}; the header has {header}")


def _read_jsonl(path: Path, columns: Columns, limit: int | None) -> list[RawExample]:
    text_key, label_key = columns.text or "text", columns.label or "label"
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
