"""Runs several service processes as one unit: prefixed logs, restart on crash, clean stop on Ctrl-C/SIGTERM.

Used by ``costmesh up``. Each child is a separate ``python -m services.<svc>`` process with its own environment.
A child that exits while the supervisor is running is reported and restarted with exponential backoff; on stop,
every child gets SIGTERM and ``grace_s`` to finish before SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ChildState:
    spec: ChildSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


class Supervisor:
    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        out: TextIO | None = None,
        grace_s: float = 10.0,
        max_backoff_s: float = 30.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self._children = [ChildState(spec) for spec in children]
        self._out = out or sys.stdout
        self._grace_s = grace_s
        self._max_backoff_s = max_backoff_s
        self._stopping = asyncio.Event()
        self._on_event = on_event
        width = max((len(c.name) for c in children), default=0)
        self._width = width

    def _emit(self, name: str, line: str) -> None:
        self._out.write(f"{name:<{self._width}} | {line}\n")
        self._out.flush()

    def _event(self, name: str, what: str) -> None:
        self._emit(name, f"[costmesh up] {what}")
        if self._on_event is not None:
            self._on_event(name, what)

    async def _pump(self, name: str, stream: asyncio.StreamReader) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            self._emit(name, line.decode("utf-8", "replace").rstrip("\n"))

    async def _spawn(self, child: ChildState) -> None:
        env = {**os.environ, **child.spec.env, "PYTHONUNBUFFERED": "1"}
        child.proc = await asyncio.create_subprocess_exec(
            *child.spec.argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
        )
        child.started_at = time.monotonic()
        assert child.proc.stdout is not None
        child.pumps = [asyncio.ensure_future(self._pump(child.spec.name, child.proc.stdout))]
        self._event(child.spec.name, f"started pid {child.proc.pid}")

    async def _watch(self, child: ChildState) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            await self._spawn(child)
            assert child.proc is not None
            code = await child.proc.wait()
            await asyncio.gather(*child.pumps, return_exceptions=True)
            if self._stopping.is_set():
                return
            child.restarts += 1
            if time.monotonic() - child.started_at > 60:
                backoff = 0.5
            self._event(child.spec.name, f"exited with code {code}; restart #{child.restarts} in {backoff:.1f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    def request_stop(self) -> None:
        self._stopping.set()

    async def _terminate_all(self) -> None:
        live = [c for c in self._children if c.proc is not None and c.proc.returncode is None]
        for child in live:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s
        for child in live:
            assert child.proc is not None
            try:
                await asyncio.wait_for(child.proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                self._event(child.spec.name, "did not stop in time; killing")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)  # the child leads its group: its children go too
                await child.proc.wait()
            self._event(child.spec.name, f"stopped (code {child.proc.returncode})")

    async def run(self, until: asyncio.Future[object] | None = None) -> None:
        """Run until SIGTERM/SIGINT, ``request_stop()``, or ``until`` completes; then stop every child."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        watchers = [asyncio.ensure_future(self._watch(c)) for c in self._children]
        try:
            waits: set[asyncio.Future[object]] = {asyncio.ensure_future(self._stopping.wait())}
            if until is not None:
                waits.add(until)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stopping.set()
            await self._terminate_all()
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def restarts(self) -> dict[str, int]:
        return {c.spec.name: c.restarts for c in self._children}

    def pids(self) -> dict[str, int | None]:
        return {c.spec.name: (c.proc.pid if c.proc else None) for c in self._children}
