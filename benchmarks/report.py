"""Write one benchmark's section of a results file (results/perf.md by default, or e.g.
results/reliability.md), keeping the other sections; run a measurement in a fresh process."""

from __future__ import annotations

import multiprocessing
import os
import platform
import re
import time
from pathlib import Path

from mt4ssl.utils.io import atomic_write_text
from mt4ssl.utils.precision import cpu_bf16_support

PERF = Path(__file__).resolve().parent.parent / "results" / "perf.md"
HEADER = "# Performance measurements\n\nEach section was printed by the command it names.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores ({cpu_bf16_support()[1]}), "
            f"Python {platform.python_version()}")


def write_section(name: str, command: str, body: str, path: Path = PERF, header: str = HEADER) -> None:
    """Replace (or append) section `name` of `path`; `header` starts a new file."""
    text = path.read_text() if path.exists() else header
    section = (f"<!-- begin {name} -->\n## {name}\n\nCommand: `{command}`  \n"
               f"Machine: {machine()}  \nDate: {time.strftime('%Y-%m-%d')}\n\n{body.strip()}\n"
               f"<!-- end {name} -->\n")
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n",
                         re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    atomic_write_text(path, text)


def _child(queue, fn, fn_args) -> None:
    try:
        queue.put(fn(*fn_args))
    except BaseException as e:  # the parent re-raises it (it would wait for a result forever)
        queue.put(RuntimeError(f"{type(e).__name__}: {e}"))
        raise


def in_fresh_process(fn, *fn_args):
    """fn(*fn_args) in a fresh spawned process (not a Pool's daemon: the trainer's DataLoader
    workers are its children)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, fn_args))
    proc.start()
    try:
        result = queue.get()
    finally:
        proc.join()
    if isinstance(result, Exception):
        raise result
    return result
