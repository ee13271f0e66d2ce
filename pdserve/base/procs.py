"""Process-tree helpers (from /proc; no pdserve imports): the worker actors end their own engine
processes with them when replaced, and ``pdserve chaos`` injects its faults with them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def signal_tree(pid: int, sig: int, include_root: bool = True) -> None:
    """Send ``sig`` to ``pid``'s descendants, children first (for SIGSTOP's sake), then to ``pid``
    itself unless ``include_root`` is False."""
    tree = process_tree(pid)
    signal_pids(reversed(tree if include_root else tree[1:]), sig)


def signal_pids(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids`` in order, skipping those already gone."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def stderr_tail(max_lines: int = 12, max_bytes: int = 16384) -> str:
    """The last lines written to this process's stderr, which its child processes share, when
    stderr is a regular file (a Ray worker's log): the root cause a child's failure points to.
    Lines of traceback carets are left out; empty when stderr is a terminal or a pipe."""
    try:
        path = os.readlink("/proc/self/fd/2")
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip(" ^~")]
    return "\n".join(lines[-max_lines:])
