"""Run untrusted, model-generated Python in a contained subprocess.

Layers of containment, each enough for its threat on its own where the platform allows it:

- **process**: a fresh interpreter (`python -I -B`: no user site, no env-driven imports, no .pyc
  writes) in its own session, killed with its whole process group at the wall-clock timeout;
- **resources** (set by the child before the untrusted code runs): address space (RLIMIT_AS,
  memory bombs raise MemoryError), CPU seconds, file size, no core dumps;
- **network**: a new, empty network namespace (`unshare -rn`) when the kernel allows user
  namespaces, and in any case an audit hook that refuses every `socket.*` event;
- **file system**: the working directory is a fresh temporary folder (removed afterwards), and the
  audit hook refuses opening for writing, removing, renaming or chmod-ing anything outside it;
- **processes / native code**: the audit hook refuses subprocess, os.system/exec/spawn/fork/kill
  and ctypes (`sys.addaudithook` hooks cannot be removed by the code they watch).

A program passes when it exits with status 0 within the limits; anything else is a failure, with
`status` saying which (failed, timeout, error) and `detail` the tail of its stderr.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Runs in the child before the untrusted code; argv: memory_bytes cpu_seconds fsize_bytes.
_RUNNER = r"""
import os, resource, sys
mem, cpu, fsize = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
ROOT = os.path.realpath(os.getcwd())
with open("program.py", encoding="utf-8") as f:
    SOURCE = f.read()

BLOCKED = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.spawn", "webbrowser.open",
           "os.startfile", "os.setuid", "resource.setrlimit", "sys.addaudithook")
PATH_EVENTS = ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link",
               "os.symlink", "os.truncate", "shutil.rmtree", "shutil.move", "shutil.copyfile",
               "os.utime", "os.chflags", "os.mkfifo", "os.mknod")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    full = os.path.realpath(os.path.join(ROOT, os.fsdecode(path)))
    return full == ROOT or full.startswith(ROOT + os.sep)

def _hook(event, args):
    if event.startswith("socket.") or event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
    elif event in PATH_EVENTS:
        for arg in args[:2]:
            if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg):
                raise PermissionError(f"sandbox: {event} on {arg!r} outside the working directory")

sys.addaudithook(_hook)
exec(compile(SOURCE, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str = ""
    seconds: float = 0.0


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (unprivileged user + network namespace) works on this machine."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _child_env(workdir: str) -> dict[str, str]:
    """A minimal environment: no proxies, no tokens, single-threaded math libraries."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def run_program(
    program: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16
) -> ExecResult:
    """Execute `program` (Python source) in the sandbox; passed = exit status 0 within the limits."""
    workdir = tempfile.mkdtemp(prefix="astra-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        limits = [str(memory_mb << 20), str(int(timeout_s) + 1), str(max_file_mb << 20)]
        cmd = [sys.executable, "-I", "-B", "-c", _RUNNER, *limits]
        if network_namespace_available():
            cmd = ["unshare", "-rn", *cmd]
        return _run(cmd, workdir, timeout_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(cmd: list[str], workdir: str, timeout_s: float) -> ExecResult:
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=_child_env(workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so a timeout kills everything it started
    )
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return ExecResult(False, "timeout", f"no exit within {timeout_s:g}s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    tail = err.decode("utf-8", "replace")[-2000:]
    if proc.returncode == 0:
        return ExecResult(True, "passed", "", seconds)
    status = "failed" if "Error" in tail or "assert" in tail.lower() else "error"
    return ExecResult(False, status, tail or f"exit status {proc.returncode}", seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def run_programs(
    programs: Sequence[str], workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024
) -> list[ExecResult]:
    """`run_program` over many programs, `workers` at a time (each in its own subprocess)."""
    run = functools.partial(run_program, timeout_s=timeout_s, memory_mb=memory_mb)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(run, programs))
