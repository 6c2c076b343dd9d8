"""``costmesh up``'s supervisor with real child processes: prefixed logs, restart on crash, clean stop."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys

from services.cli.supervisor import ChildSpec, Supervisor

STEADY = """
import signal, sys, time
print("ready", flush=True)
signal.signal(signal.SIGTERM, lambda *a: (print("bye", flush=True), sys.exit(0)))
while True:
    time.sleep(0.05)
"""
CRASHER = "import sys\nprint('boom', flush=True)\nsys.exit(3)\n"
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


async def test_crashed_child_is_reported_and_restarted_and_stop_is_clean() -> None:
    out = io.StringIO()
    events: list[tuple[str, str]] = []
    sup = Supervisor(
        [ChildSpec("steady", [sys.executable, "-c", STEADY]), ChildSpec("crasher", [sys.executable, "-c", CRASHER])],
        out=out,
        grace_s=5,
        max_backoff_s=0.5,
        on_event=lambda name, what: events.append((name, what)),
    )
    run = asyncio.ensure_future(sup.run())
    for _ in range(100):
        await asyncio.sleep(0.05)
        if sup.restarts()["crasher"] >= 2:
            break
    pid = sup.pids()["steady"]
    sup.request_stop()
    await asyncio.wait_for(run, 10)
    text = out.getvalue()
    assert sup.restarts()["crasher"] >= 2 and sup.restarts()["steady"] == 0
    assert "crasher | boom" in text and "steady  | ready" in text and "steady  | bye" in text
    assert any(name == "crasher" and "exited with code 3" in what for name, what in events)
    assert pid is not None
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


async def test_child_ignoring_sigterm_is_killed_after_grace() -> None:
    out = io.StringIO()
    sup = Supervisor([ChildSpec("stubborn", [sys.executable, "-c", STUBBORN])], out=out, grace_s=0.5)
    run = asyncio.ensure_future(sup.run())
    for _ in range(100):
        await asyncio.sleep(0.05)
        if "ready" in out.getvalue():
            break
    os.kill(os.getpid(), signal.SIGTERM)  # what Ctrl-C / a container stop sends to `costmesh up`
    await asyncio.wait_for(run, 10)
    assert "did not stop in time; killing" in out.getvalue()
    assert "stopped (code -9)" in out.getvalue()
