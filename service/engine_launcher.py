"""How engine processes start: forked from one template process that has already imported their libraries.

An interpreter that imports torch and transformers holds about 280 MB of its own memory before it
loads a single weight (their code's relocations, op registries, module objects: measured as the
unique set size of ``import torch, transformers``), and each engine process used to pay that again.
Here the engine processes are forked from a template (multiprocessing's fork server, which imports
``service.engine_process`` and with it the engine's libraries once), so they share those pages
copy-on-write; each engine then owns only what it loads and computes. The template forks while it
is single-threaded, the way fork is safe.

:class:`EngineProcess` gives ``service.process_transport`` what it needs of a child process: start,
pid, an awaitable exit and kill.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook now, so that ours (later) runs first
import sys
from multiprocessing.context import BaseContext

#: The module the template imports: the engine process's own, whose imports are the engine's libraries
#: (the API process itself never imports it: it needs neither transformers' models nor the engine).
PRELOAD = "service.engine_process"


#: The engine processes' name in ``ps``, ``top`` and /proc/PID/comm (Linux; their command line is the template's).
ENGINE_PROCESS_NAME = "cogalora-engine"


def _run_engine(socket_path: str) -> None:
    """The engine process's target (in a forked engine its module is already imported)."""
    _name_this_process(ENGINE_PROCESS_NAME)
    from service.engine_process import run

    run(socket_path)


def _name_this_process(name: str) -> None:
    """Set this process's name as ``ps`` shows it (at most 15 bytes; Linux only, elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        pr_set_name = 15  # prctl(2)
        ctypes.CDLL(None).prctl(pr_set_name, name.encode()[:15], 0, 0, 0)


def _context() -> BaseContext:
    """Fork server where the platform has one (Linux, macOS); otherwise each engine imports on its own."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])
    return context


#: Engine processes started by this process and not yet exited (held here even when their owner is gone).
_running: set[EngineProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Kill engines still running when this process exits (it did not stop them: nobody is left to answer
    their requests). Without this, multiprocessing's exit hook would wait for them for ever: an engine
    ignores SIGTERM and only stops when told to, or when this process's socket closes, after that hook.
    (Exit hooks run last registered first: this one is registered after multiprocessing's.)"""
    for process in list(_running):
        process.kill()


class EngineProcess:
    """One engine process serving the API process's socket at ``socket_path``."""

    def __init__(self, socket_path: str) -> None:
        self._process = _context().Process(
            target=_run_engine, args=(socket_path,), name=ENGINE_PROCESS_NAME, daemon=True
        )
        self._exited: asyncio.Future | None = None

    async def start(self) -> None:
        """Start it (off the event loop: the first start waits for the template to import)."""
        await asyncio.to_thread(self._process.start)
        _running.add(self)
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        loop.add_reader(self._process.sentinel, self._on_exit, loop)

    def _on_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._process.sentinel)
        _running.discard(self)
        self._process.join()  # reads the exit status the sentinel announced
        if not self._exited.done():
            self._exited.set_result(self._process.exitcode)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def start_method(self) -> str:
        """``forkserver`` (forked from the template) or ``spawn`` (where there is no fork server)."""
        return self._process._start_method

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (``-N`` for signal ``N``), else None."""
        return self._process.exitcode if self._exited is not None and self._exited.done() else None

    async def wait(self) -> int:
        """Its exit status, once it exits."""
        assert self._exited is not None, "start() first"
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        self._process.kill()
