"""What tests/test_bad_inputs.py runs every case through: the real entry point as a subprocess in its own
session under a timeout, then the outcome a user sees (exit status, one line on stderr, no traceback), the files
that must be untouched, and nothing left running in the session."""
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
TIMEOUT = 120  # seconds; each case ends within seconds, the margin is for a loaded 2-core machine


def fingerprint(*paths: str) -> dict:
    """{path: (sha256, mtime)} of files, and of every file under folders: compare before and after a case."""
    found = {}
    for path in paths:
        walk = [(path, [], [""])] if not os.path.isdir(path) else os.walk(path)
        for folder, _, names in walk:
            for name in names:
                file = os.path.join(folder, name) if name else folder
                if os.path.isfile(file):
                    with open(file, "rb") as f:
                        found[file] = (hashlib.sha256(f.read()).hexdigest(), os.stat(file).st_mtime_ns)
                else:
                    found[file] = None
    return found


def session_alive(session: int) -> list[int]:
    """The processes still running in `session` (a process group id that started as a session's leader)."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields[3]: the session id
            alive.append(int(pid))
    return alive


def run(args: list[str], timeout: int = TIMEOUT, signal_after: tuple | None = None, signal_group: bool = False,
        input: str | None = None, cwd: str = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -u *args` in its own session; fails the test if it outlives `timeout` or leaves a process behind.
    signal_after: (when, signal[, seconds]) sent to the entry point alone (not its session), as a scheduler or a user
    does; `when` is seconds after the start, or a text to wait for in its output (stdout or stderr), then `seconds`
    more. signal_group: to its whole process group instead, as Ctrl-C in a terminal does. The result's `stopped_in`:
    seconds from the signal (without one, the start) to the end."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    process = subprocess.Popen([sys.executable, "-u", *args], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.PIPE if input is not None else None,
                               text=True, start_new_session=True)
    output = {"stdout": [], "stderr": []}
    seen = threading.Event()
    text = signal_after[0] if signal_after and isinstance(signal_after[0], str) else None

    def read(name: str) -> None:
        for line in getattr(process, name):
            output[name].append(line)
            if text is not None and text in line:
                seen.set()

    readers = [threading.Thread(target=read, args=(name,), daemon=True) for name in output]
    for reader in readers:
        reader.start()
    if input is not None:
        process.stdin.write(input)
        process.stdin.close()
    deadline = time.monotonic() + timeout
    try:
        if signal_after:
            if text is None:
                time.sleep(signal_after[0])
            else:
                while not seen.wait(0.05) and process.poll() is None and time.monotonic() < deadline:
                    pass
                time.sleep(signal_after[2] if len(signal_after) > 2 else 0)
            if process.poll() is None:
                (os.killpg if signal_group else os.kill)(process.pid, signal_after[1])
        signalled = time.monotonic()
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
        stopped_in = time.monotonic() - signalled
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for reader in readers:
            reader.join(5)
        pytest.fail(f"{' '.join(args)} did not end within {timeout} s (hung):\n"
                    f"{''.join(output['stdout'])[-2000:]}\n{''.join(output['stderr'])[-2000:]}")
    deadline = time.monotonic() + 10  # children get the parent-death signal; give them a moment to go
    while session_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = session_alive(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{' '.join(args)} left processes running: {left}")
    for reader in readers:
        reader.join(10)
    result = subprocess.CompletedProcess(args, process.returncode, "".join(output["stdout"]),
                                         "".join(output["stderr"]))
    result.stopped_in = stopped_in  # seconds from the signal (or the start) to the end
    return result


def refused(result: subprocess.CompletedProcess, *texts: str) -> str:
    """Assert a known failure: exit status 2, no traceback, one line on stderr containing each of `texts`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines, "nothing on stderr"
    message = lines[-1]
    for text in texts:
        assert text in message, f"{text!r} not in {message!r}"
    return message
