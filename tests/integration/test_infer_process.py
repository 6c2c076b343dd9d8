"""Process lifecycle of the engine: a process vLLM spawns must not outlive the worker that started it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.infer.engine import die_with_parent

ROOT = Path(__file__).resolve().parents[2]

# The "worker": spawns a child the way vLLM starts its engine core (multiprocessing, spawn) and waits forever.
PARENT = """
import multiprocessing, sys, time
from tests.integration.test_infer_process import engine_like_child
if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=engine_like_child, args=(sys.argv[1] == "1",))
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def engine_like_child(plugin: bool) -> None:
    if plugin:
        die_with_parent()  # what the vllm.general_plugins entry point runs in every vLLM process
    time.sleep(600)


def start_parent(plugin: bool) -> tuple[subprocess.Popen[str], psutil.Process]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT, "1" if plugin else "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    child = psutil.Process(int(proc.stdout.readline()))
    return proc, child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_spawned_engine_process_dies_with_its_worker() -> None:
    proc, child = start_parent(plugin=True)
    time.sleep(1.0)  # let the child import and run the plugin
    assert child.is_running()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()  # type: ignore[union-attr]
    _, alive = psutil.wait_procs([child], timeout=10)
    assert not alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_without_the_plugin_the_child_is_orphaned() -> None:
    proc, child = start_parent(plugin=False)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()  # type: ignore[union-attr]
    try:
        _, alive = psutil.wait_procs([child], timeout=2)
        assert alive == [child], "the control case: nothing else kills an orphaned child"
    finally:
        child.kill()
        child.wait(10)


def test_the_plugin_does_nothing_in_a_process_vllm_did_not_spawn() -> None:
    assert multiprocessing.parent_process() is None
    die_with_parent()  # in the worker itself (or pytest) it must not arm anything or exit
