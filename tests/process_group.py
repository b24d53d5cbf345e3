"""Run multi-process (torchrun / accelerate launch) commands from tests without leaking workers.

``subprocess.run(timeout=...)`` kills only the launcher; its worker processes then wait
forever in the rendezvous. Running the launcher in its own session and killing the whole
process group on timeout keeps a slow CI machine from accumulating orphans.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Sequence


def run_group(cmd: Sequence[str], *, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; on timeout kill its whole process group and raise ``TimeoutExpired``."""
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
