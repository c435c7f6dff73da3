"""Every command of README.md, docs/*.md and the model cards names options that exist.

The pages' shell commands (fenced blocks without a language or as bash/sh/shell/console, ``$ `` lines of
sample output, and inline code that starts with ``python -m``) are split into simple commands. Each
``python -m <our module> [subcommand] --option ...`` (also under ``torchrun``, or as ``python <script>.py``)
is checked against that module's own ``--help``: the module must start, the subcommand must be one of its
subcommands, and every option the page uses must be in its usage. ``bash <script> --option`` needs the
script and the option in it. Any other program must be in :data:`NOT_OURS`, with the reason it is not
checked here, so a command of a new kind fails until someone decides how to treat it.

The ``--help`` of each module and subcommand runs once per session, in a subprocess, a few at a time.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "models").glob("**/README.md")])
OUR_PACKAGES = ("benchmarks", "cogalora", "service", "training")

#: Programs (and ``python -m`` modules) that are not this project's, each with why its options are not checked here.
NOT_OURS: dict[str, str] = {
    "curl": "an HTTP client: what the service answers is the API tests' business",
    "docker": "Docker's CLI; tests/test_docker.py builds and runs the image for real",
    "docker-compose": "Docker Compose; tests/test_docker.py starts docker/compose.yaml for real",
    "kubectl": "Kubernetes' CLI; the manifests are examples for a cluster",
    "serve": "Ray Serve's CLI; tests/test_ray_serve.py validates and builds deploy/ray/serve.yaml",
    "ray": "Ray's CLI, for a cluster",
    "wrk": "an external load generator",
    "pip": "the package installer",
    "pytest": "the test runner",
    "promtool": "Prometheus' rule tester; tests/test_deploy.py runs it",
    "git": "version control",
    "cp": "a shell utility",
    "mkdir": "a shell utility",
    "tar": "a shell utility",
    "zip": "a shell utility",
    "cd": "a shell built-in",
    "kill": "a shell built-in",
    ".": "a shell built-in (source)",
}
#: Words that run the command after them (their own options are skipped).
PREFIXES = ("nice", "time", "env")
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")
SEPARATORS = ("&&", "||", "|", ";", "&")
PYTHON_MODULE = re.compile(r"^(\S*/)?python3? -m \w")


@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    text: str

    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}: {self.text}"


# ---- finding the commands ---------------------------------------------------------------------------


def page_commands(page: Path) -> list[Command]:
    """The shell commands of a page: fenced shell lines (continuations joined, here-documents left out), ``$ ``
    lines of other fenced blocks, and inline code spans that run a Python module."""
    commands: list[Command] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    fence: str | None = None
    prose: list[tuple[int, str]] = []
    heredoc_end: str | None = None
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"^\s*```\s*([\w-]*)", line)
            if match:
                fence = match.group(1).lower()
                continue
            prose.append((number, line))
            continue
        if stripped.startswith("```"):
            fence, pending, heredoc_end = None, None, None
            continue
        if heredoc_end is not None:
            heredoc_end = None if stripped == heredoc_end else heredoc_end
            continue
        if pending is not None:
            start, text = pending
            text += " " + stripped
        elif fence in SHELL_LANGUAGES or stripped.startswith("$ "):
            start, text = number, stripped.removeprefix("$ ")
        else:
            continue
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
        if heredoc:
            heredoc_end = heredoc.group(1)
            text = text[: heredoc.start()]
        if text.strip():
            commands.append(Command(page, start, text.strip()))
    commands += _inline_commands(page, prose)
    return commands


def _inline_commands(page: Path, prose: list[tuple[int, str]]) -> list[Command]:
    text = "\n".join(line for _, line in prose)
    numbers = [number for number, _ in prose]
    found = []
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(match.group(1).split())
        if PYTHON_MODULE.match(span):
            found.append(Command(page, numbers[text.count("\n", 0, match.start())], span))
    return found


def simple_commands(words: list[str]) -> list[list[str]]:
    """``a && b | c > file`` -> ``[[a], [b], [c]]``: split at separators, redirections cut off."""
    commands: list[list[str]] = [[]]
    redirected = False
    for word in words:
        if word in SEPARATORS or word.endswith(";"):
            if word.endswith(";") and word != ";" and not redirected:
                commands[-1].append(word[:-1])
            commands.append([])
            redirected = False
        elif re.match(r"^\d?[<>]", word):
            redirected = True
        elif not redirected:
            commands[-1].append(word)
    return [command for command in commands if command]


# ---- asking our modules what they accept ------------------------------------------------------------


@functools.cache
def help_text(argv: tuple[str, ...]) -> tuple[bool, str]:
    """``(started, usage)`` of ``python *argv --help``, run once per argv (``usage``: the error when it failed)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COGALORA_")}
    done = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        return False, (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    # The usage paragraph, and each option's definition (where short aliases such as -c appear), not its prose.
    usage, _, rest = done.stdout.partition("\n\n")
    definitions = [re.split(r"\s{2,}", line.strip())[0] for line in rest.splitlines() if line.strip().startswith("-")]
    return True, "\n".join([usage, *definitions])


def options_in(usage: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", usage))


def is_subcommand(argv: tuple[str, ...], word: str) -> bool:
    """Whether ``word`` is a subcommand of ``python *argv``: its own ``--help`` names it in the usage line."""
    started, usage = help_text((*argv, word))
    program = re.escape(argv[-1].rsplit("/", 1)[-1])
    return started and re.search(rf"{program} {re.escape(word)}(\s|$)", usage.splitlines()[0]) is not None


def options_used(args: list[str]) -> list[str]:
    """The options among the arguments, ``[--x V]`` synopses included; ``--x=v`` counts as ``--x``."""
    used = []
    for word in args:
        word = word.strip("[]")
        if re.match(r"^--?[A-Za-z]", word):
            used.append(word.split("=", 1)[0])
    return used


def invocation(words: list[str]) -> tuple[str, tuple[str, ...], list[str]] | None:
    """``(program, help argv, arguments)``: help argv is ``("-m", module)`` or ``(script,)`` for Python, ``()``
    for other programs; None for ``python -`` and ``python -c``."""
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # environment assignments
        words = words[1:]
    while words and words[0] in PREFIXES:
        words = words[1:]
        while words and words[0].startswith("-"):  # the prefix's own options: nice -n 10
            words = words[2:] if words[0] in ("-n",) else words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if program == "torchrun":  # a launcher: its options, then -m module
        if "-m" not in words:
            return program, (), []
        at = words.index("-m")
        return "python", ("-m", words[at + 1]), words[at + 2 :]
    if re.fullmatch(r"python3?(\.\d+)?", program):
        if len(words) < 2 or words[1] in ("-", "-c"):
            return None
        if words[1] == "-m":
            return "python", ("-m", words[2]), words[3:]
        return "python", (words[1],), words[2:]
    return program, (), words[1:]


# ---- checking -----------------------------------------------------------------------------------------


def problems_of(commands: list[Command]) -> list[str]:
    """What is wrong with each command, one line each (empty: every command is fine)."""
    parsed: list[tuple[Command, str, tuple[str, ...], list[str]]] = []
    problems: list[str] = []
    for command in commands:
        try:
            words = shlex.split(command.text, comments=True)
        except ValueError as exc:
            problems.append(f"{command.where()}\n    is not a shell command ({exc})")
            continue
        for simple in simple_commands(words):
            found = invocation(simple)
            if found is not None:
                parsed.append((command, *found))
    _prefetch({argv for _, program, argv, _ in parsed if program == "python" and _ours(argv)})
    _prefetch(
        {
            (*argv, args[0])
            for _, program, argv, args in parsed
            if program == "python" and _ours(argv) and args and not args[0].startswith("-")
        }
    )
    for command, program, argv, args in parsed:
        problem = _check(program, argv, args)
        if problem:
            problems.append(f"{command.where()}\n    {problem}")
    return problems


def _ours(argv: tuple[str, ...]) -> bool:
    if argv[0] == "-m":
        return argv[1].split(".")[0] in OUR_PACKAGES
    return (ROOT / argv[0]).is_file()


def _prefetch(argvs: set[tuple[str, ...]]) -> None:
    """Run the ``--help`` calls needed next side by side (each is mostly a Python start-up)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        list(pool.map(help_text, sorted(argvs)))


def _check(program: str, argv: tuple[str, ...], args: list[str]) -> str | None:
    if program == "python":
        return _check_python(argv, args)
    if program in ("bash", "sh"):
        return _check_script(args)
    if program in NOT_OURS:
        return None
    return f"{program!r} is neither ours nor in NOT_OURS (add it there with the reason it is not checked)"


def _check_python(argv: tuple[str, ...], args: list[str]) -> str | None:
    if argv[0] == "-m" and argv[1].split(".")[0] not in OUR_PACKAGES:
        if argv[1] in NOT_OURS:
            return None
        return f"python -m {argv[1]} is neither ours nor in NOT_OURS"
    if argv[0] != "-m" and not (ROOT / argv[0]).is_file():
        return f"python {argv[0]}: no such file in the repository"
    shown = " ".join(("python", *argv))
    started, usage = help_text(argv)
    if not started:
        return f"`{shown} --help` fails: {usage}"
    if args and not args[0].startswith("-"):  # a subcommand, or a positional argument
        started, sub_usage = help_text((*argv, args[0]))
        if not started:
            return f"`{shown} {args[0]} --help` fails: {sub_usage}"
        if is_subcommand(argv, args[0]):
            argv, args, usage = (*argv, args[0]), args[1:], sub_usage
            shown = f"{shown} {argv[-1]}"
    known = options_in(usage) | {"-h", "--help"}
    unknown = [option for option in options_used(args) if option not in known]
    if unknown:
        return f"{shown} has no option {', '.join(unknown)} (see `{shown} --help`)"
    return None


def _check_script(args: list[str]) -> str | None:
    if not args or not (ROOT / args[0]).is_file():
        return f"no such script in the repository: {args[:1]}"
    text = (ROOT / args[0]).read_text(encoding="utf-8")
    unknown = [option for option in options_used(args[1:]) if option not in text]
    return f"{args[0]} does not handle {', '.join(unknown)}" if unknown else None


# ---- the tests ----------------------------------------------------------------------------------------


@functools.cache
def problems_by_page() -> dict[Path, list[str]]:
    """Every page checked at once, so that all the ``--help`` calls run side by side."""
    commands = {page: page_commands(page) for page in PAGES}
    problems = problems_of([command for page in PAGES for command in commands[page]])
    return {page: [p for p in problems if p.startswith(f"{page.relative_to(ROOT)}:")] for page in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_documented_commands_use_existing_options(page: Path) -> None:
    problems = problems_by_page()[page]
    assert not problems, "commands that do not run as written:\n" + "\n".join(problems)


def test_the_check_finds_wrong_options_subcommands_and_modules(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text(
        "Run `python -m service --prot 9000` and then:\n\n"
        "```bash\n"
        "python -m training evaluate --model models/sst2 --data dev.tsv \\\n"
        "    --label-names negative,positive --json   # a flag evaluate never had\n"
        "python -m training evalute --model models/sst2\n"
        "python -m benchmarks.no_such_benchmark --rows 3\n"
        "mysterytool --fast\n"
        "bash scripts/setup.sh --dve\n"
        "curl -s localhost:8000/health && .venv/bin/python -m service.keys check keys.toml --verbose\n"
        "python -m service --port 9000 --model-dir models   # all fine\n"
        "```\n",
        encoding="utf-8",
    )
    problems = "\n".join(problems_of(page_commands(page)))
    assert "--prot" in problems
    assert "python -m training evaluate has no option --label-names" in problems
    assert "invalid choice: 'evalute'" in problems
    assert "python -m benchmarks.no_such_benchmark --help` fails" in problems
    assert "'mysterytool' is neither ours nor in NOT_OURS" in problems
    assert "scripts/setup.sh does not handle --dve" in problems
    assert "python -m service.keys check has no option --verbose" in problems
    assert "--model-dir" not in problems and "9000 --model-dir" not in problems
    assert len(problems.splitlines()) == 2 * 7, problems


def test_the_pages_commands_are_found() -> None:
    """The extraction is not silently empty: the README's module commands and both set-up commands are seen."""
    readme = [command.text for command in page_commands(ROOT / "README.md")]
    assert "bash scripts/setup.sh && .venv/bin/python -m service" in readme
    assert "bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q" in readme
    modules = {re.search(r"-m ([\w.]+)", text).group(1) for text in readme if re.search(r"-m ([\w.]+)", text)}
    assert {"service", "training", "benchmarks.loadtest", "benchmarks.serving"} <= modules, modules


def test_ci_runs_the_readme_test_command() -> None:
    """CI installs and tests exactly as the README tells a user to."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    readme = [command.text for command in page_commands(ROOT / "README.md")]
    setup, tests = "bash scripts/setup.sh --dev", ".venv/bin/python -m pytest -q"
    assert f"{setup} && {tests}" in readme
    assert ci[ci.index(setup) + 1] == tests, "the line after the set-up in .ci/run must be the README's test command"
