"""The ``python -m training`` commands of the README, docs/training.md, docs/results.md and the model cards run as
written: their flags parse, their data are the documented shared files, the models they read exist or are
written by an earlier command of the same page, and ``cp`` into a model folder replaces its contents.

A synopsis line (``[--option]`` brackets, or ``...`` for "the rest as above") is not a command and is skipped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from training.cli import build_parser
from training.comparison import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "docs" / "training.md",
    ROOT / "docs" / "results.md",
    *sorted((ROOT / "models").glob("*/README.md")),
]
DATA_PREFIX = "../shared/data/"


def fenced_commands(page: Path) -> list[str]:
    """Every line of the page's shell blocks (fenced without a language, or as bash / sh / shell), continuation
    lines joined."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    shell = [body for language, body in blocks if language in ("", "bash", "sh", "shell", "console")]
    return [line.strip() for body in shell for line in re.sub(r"\\\n\s*", " ", body).splitlines() if line.strip()]


def training_argv(line: str) -> list[str] | None:
    if "-m training" not in line:
        return None
    words = shlex.split(line)
    if "-m" not in words or words[words.index("-m") + 1 : words.index("-m") + 2] != ["training"]:
        return None
    if "..." in line or re.search(r"\[--?\w", line):
        return None  # a synopsis
    return words[words.index("-m") + 2 :]


def _values(argv: list[str], flag: str) -> list[str]:
    """The values of ``flag`` (several for ``--model A B``)."""
    if flag not in argv:
        return []
    values = []
    for word in argv[argv.index(flag) + 1 :]:
        if word.startswith("--"):
            break
        values.append(word)
    return values


def commands() -> list[tuple[Path, list[tuple[str, list[str]]]]]:
    pages = []
    for page in PAGES:
        found = [(line, argv) for line in fenced_commands(page) if (argv := training_argv(line))]
        found += [(line, []) for line in fenced_commands(page) if line.startswith("cp ")]
        pages.append((page, found))
    return pages


@pytest.mark.parametrize(("page", "found"), commands(), ids=lambda value: getattr(value, "name", ""))
def test_documented_training_commands_run_as_written(page: Path, found, capsys) -> None:
    parser = build_parser()
    written: set[str] = set()
    problems = []
    for line, argv in found:
        if line.startswith("cp "):
            source, destination = shlex.split(line)[-2:]
            if (ROOT / destination).is_dir() and not source.rstrip("/").endswith("/."):
                problems.append(f"{line}: copies the run INTO the existing {destination}; copy {source}/. instead")
            continue
        if argv == ["--help"]:
            continue
        try:
            _, unknown = parser.parse_known_args(argv)
        except SystemExit:
            problems.append(f"{line}: does not parse: {capsys.readouterr().err.strip().splitlines()[-1]}")
            continue
        if unknown:
            problems.append(f"{line}: unrecognized arguments {unknown}")
            continue
        for flag in ("--train", "--dev", "--data"):
            for path in _values(argv, flag):
                if not path.startswith(DATA_PREFIX):
                    problems.append(f"{line}: {flag} {path} is not one of the shared data files ({DATA_PREFIX}...)")
                elif SHARED_DATA.is_dir() and not (SHARED_DATA / path.removeprefix(DATA_PREFIX)).is_file():
                    problems.append(f"{line}: {flag} {path} does not exist")
        for spec in _values(argv, "--model"):
            path = ModelSpec.parse(spec).path
            if path not in written and not (ROOT / path / "cogalora.json").is_file():
                problems.append(f"{line}: --model {path} is neither in the repository nor written above")
        for path in _values(argv, "--config"):
            if not (ROOT / path).is_file():
                problems.append(f"{line}: --config {path} does not exist")
        written.update(_values(argv, "--output"))
    assert not problems, "\n".join(problems)


def test_every_page_with_commands_is_checked() -> None:
    found = dict(commands())
    assert sum(1 for line, argv in found[ROOT / "README.md"] if argv) >= 3
    for card in (ROOT / "models").glob("*/README.md"):
        assert any(argv and argv[0] == "train" for _, argv in found[card]), f"{card}: no train command"
