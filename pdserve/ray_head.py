"""The embedded Ray head of a deployment, in a process of its own, so that the engines (detached
actors) outlive the router: ``pdserve serve`` starts it when no head of that deployment runs,
later ``pdserve serve`` processes attach to it, and ``pdserve stop`` ends it by its pid.

Run as ``python -m pdserve.ray_head NAME NUM_CPUS``. It starts Ray on loopback as the first
driver, writes the deployment's state file (``HeadState``), and on SIGTERM shuts Ray down (which
ends every process Ray started for it, the engines included) and removes the file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.base import env

START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class HeadState:
    """What a running head of a deployment publishes in its state file."""

    address: str
    """The Ray GCS address to ``ray.init`` with."""
    pid: int
    """The head process (``pdserve stop`` sends it SIGTERM)."""

    @staticmethod
    def path(name: str) -> Path:
        """The state file of deployment ``name``."""
        return env.state_dir() / f"{name}.head.json"

    @classmethod
    def read(cls, name: str) -> HeadState | None:
        """The live head of ``name``, or None (no file, or its process is gone)."""
        try:
            state = cls(**json.loads(cls.path(name).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return state if _alive(state.pid) else None


def start(name: str, num_cpus: int) -> HeadState:
    """Start a head for ``name`` in a new session (Ctrl-C of the caller does not reach it) and wait,
    bounded, for its state file."""
    HeadState.path(name).parent.mkdir(parents=True, exist_ok=True)
    HeadState.path(name).unlink(missing_ok=True)
    log = open(env.state_dir() / f"{name}.head.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.ray_head", name, str(num_cpus)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state = HeadState.read(name)
        if state is not None and state.pid == proc.pid:
            return state
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head of {name!r} exited ({proc.returncode}); see {log.name}")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the Ray head of {name!r} did not start within {START_TIMEOUT_S:g} s; see {log.name}")


def stop(state: HeadState, timeout_s: float = 60.0) -> bool:
    """SIGTERM the head (it shuts Ray down) and wait, bounded; True once it is gone."""
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(state.pid):
            return True
        time.sleep(0.2)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def main(name: str, num_cpus: int) -> None:
    env.apply(env.embedded_ray_env())
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             log_to_driver=False)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path = HeadState.path(name)
    path.write_text(json.dumps(asdict(HeadState(ray.get_runtime_context().gcs_address, os.getpid()))))
    stopped.wait()
    path.unlink(missing_ok=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
