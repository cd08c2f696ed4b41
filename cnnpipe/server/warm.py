"""A warm worker: commands in a process that has imported Prefect, torch and MLflow already.

`cnnpipe server start` starts one beside the Prefect server and the MLflow UI. A command that
imports them (`WARM_COMMANDS`) then asks it for a process: the worker forks a child of
itself, which takes the command's standard input, output and error (passed over a Unix socket),
its working directory and its environment, runs the command as `cnnpipe` would, and sends its
exit status back. Importing the stack costs a command 1-3 s; a fork costs milliseconds.

The worker serves a command only where its child behaves as a new process would: the same Python,
the same code (the sources' modification times) and the same environment as the worker started
with, but for variables that describe only the terminal. Otherwise, or where no worker answers,
the command runs in its own process, as without one; a worker whose own sources changed then
starts again on the new code. Ctrl-C and other signals to the command are
passed on to the child, and the child dies with the command if the command is killed.

Imports only the standard library and `cnnpipe.settings` at load time: every command's `main`
calls `run_warm`.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

from cnnpipe.settings import home_of

# Those that import torch, Prefect or MLflow; the others start in a fraction of that already.
WARM_COMMANDS = frozenset({"ingest", "train", "retrain", "classify", "audit", "similar", "review"})
# The worker's module (`python -m`), which its command line holds.
WORKER_MODULE = "cnnpipe.cli.warm"
# Variables a child may differ in without behaving otherwise: what the shell, the terminal and make
# (`make demo` starts the server) say of themselves.
TERMINAL_VARIABLES = frozenset({
    "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR",
    "_", "PWD", "OLDPWD", "SHLVL", "TERM", "COLORTERM", "COLUMNS", "LINES", "TERM_PROGRAM", "TERM_PROGRAM_VERSION",
    "TERM_SESSION_ID", "WINDOWID", "DISPLAY", "TMUX", "TMUX_PANE", "STY", "WINDOW", "SSH_TTY", "SSH_CLIENT",
    "SSH_CONNECTION", "SSH_AUTH_SOCK", "PS1", "PROMPT_COMMAND", "LS_COLORS", "HISTFILE", "HISTSIZE", "HISTFILESIZE"})
PACKAGES = ("cnnpipe", "cnn", "tasks", "flows")
# Modules every flow command imports on its way; the worker imports them once.
PRELOADED = ("prefect", "torch", "mlflow", "flows.ingest", "flows.train", "flows.classify", "flows.audit")
# Passing descriptors over a Unix socket and forking: POSIX systems.
AVAILABLE = hasattr(socket, "send_fds") and hasattr(os, "fork")
# A worker that takes longer than this to answer is treated as absent.
CONNECT_TIMEOUT_SECONDS = 5.0
# The environment this command started with, before `cnnpipe` added its defaults: a worker that
# `cnnpipe server start` launches gets it, so that commands from the same shell match it.
launch_environment: dict[str, str] | None = None
CODE_CHANGED = "the code changed since the worker started"
# Sockets name at most 107 bytes; a longer path is reached through its folder's descriptor.
_SOCKET_PATH_LIMIT = 100


def run_warm(argv: list[str], environ: dict[str, str], socket_path: Path) -> int | None:
    """Run `cnnpipe argv` in the warm worker at `socket_path` and return its exit status, or None
    when it cannot or should not (then run it here). `environ` is the environment as the command
    started, before `cnnpipe` adds its defaults."""
    if (not AVAILABLE or environ.get("CNNPIPE_WARM") == "0" or not argv or argv[0] not in WARM_COMMANDS
            or {"-h", "--help"} & set(argv) or not socket_path.exists()):
        return None
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": environ, "python": sys.executable,
                          "code": code_fingerprint()}).encode()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(CONNECT_TIMEOUT_SECONDS)
        _at(socket_path, connection.connect)
        socket.send_fds(connection, [struct.pack("!I", len(request))], [0, 1, 2])
        connection.sendall(request)
        reply = _read_line(connection)
    except OSError:
        connection.close()
        return None
    if not reply.startswith("pid "):
        connection.close()
        return None
    child = int(reply.split()[1])
    connection.settimeout(None)
    forwarded: list[int] = []

    def forward(number: int, _frame) -> None:
        forwarded.append(number)
        try:
            os.kill(child, number)
        except ProcessLookupError:
            pass

    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, forward)
    with connection:
        try:
            reply = _read_line(connection)
        except OSError:
            reply = ""
    if reply.startswith("exit "):
        return int(reply.split()[1])
    if forwarded:  # ended by the signal it was sent, as the shell reports a process killed by one
        return 128 + forwarded[-1]
    print(f"Error: process {child} of the warm worker, which ran this command, ended without an exit status "
          "(killed?)", file=sys.stderr)
    return 1


def serve(socket_path: Path, prepare, run) -> None:
    """Import the stack, then fork a child for each command that connects. `prepare()` sets up the
    environment as `cnnpipe` does before importing; `run()` runs the command in `sys.argv`."""
    environ, cwd = dict(os.environ), os.getcwd()
    prepare()
    for module in PRELOADED:
        try:
            __import__(module)
        except ImportError:
            pass
    code = code_fingerprint()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path.unlink(missing_ok=True)
    previous_mask = os.umask(0o177)  # the socket runs commands as this user: for this user alone
    try:
        _at(socket_path, listener.bind)
    finally:
        os.umask(previous_mask)
    listener.listen(16)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def remove_socket() -> None:
        socket_path.unlink(missing_ok=True)

    atexit.register(remove_socket)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    _reap_children()  # of the worker this one replaced, those that ended while it started
    import gc

    gc.freeze()  # what the children share stays shared: the collector does not touch it
    print(f"warm worker {os.getpid()} ready at {socket_path}", flush=True)
    while True:
        connection, _ = listener.accept()
        descriptors: list[int] = []
        stale = False
        try:
            connection.settimeout(CONNECT_TIMEOUT_SECONDS)
            header, descriptors, _, _ = socket.recv_fds(connection, 4, 3)
            request = json.loads(_read_exactly(connection, struct.unpack("!I", header)[0]))
            reason = why_cold(request, environ, code, cwd) if len(descriptors) == 3 else "no standard streams"
            command = " ".join(["cnnpipe", *request["argv"]])
            if reason:
                connection.sendall(f"cold {reason}\n".encode())
                print(f"not served, as {reason}: {command}", flush=True)
                stale = reason == CODE_CHANGED and code_fingerprint() != code
            elif (child := os.fork()) == 0:
                atexit.unregister(remove_socket)
                _child(listener, connection, descriptors, request, run)
            else:
                print(f"serving in pid {child}: {command}", flush=True)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            print(f"warm worker: a request failed: {exc}", flush=True)
        finally:
            connection.close()
            for descriptor in descriptors:
                os.close(descriptor)
        if stale:
            # The sources changed under it (an upgrade, a `git pull`): the worker starts again as it was
            # started, on the new code, so that the commands after this one are served again. The same
            # PID, so `server stop` still finds it; its children run on, each with its own command.
            print("the code changed since the worker started: starting again on the new code", flush=True)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            remove_socket()  # until it listens again: commands run in their own process, and status says so
            os.chdir(cwd)
            os.execve(sys.executable, sys.orig_argv, environ)


def _reap_children() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _child(listener: socket.socket, connection: socket.socket, descriptors: list[int], request: dict, run) -> None:
    """Become the command's process: its streams, folder, environment and arguments; run it, say
    how it ended, and exit. Never returns."""
    status = 1
    try:
        listener.close()
        for number in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        # Ctrl-C is a KeyboardInterrupt, as in a new `cnnpipe` from a terminal, even when the worker was
        # started with SIGINT ignored (in the background, or by a process that ignores it): the client
        # forwards it, and an ignored one left the command running.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, descriptor in zip((0, 1, 2), descriptors):
            os.dup2(descriptor, target)
        for descriptor in set(descriptors) - {0, 1, 2}:
            os.close(descriptor)  # else the processes the command starts would hold the terminal too
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())  # as Python sets them up for a terminal
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["cnnpipe", *request["argv"]]
        connection.settimeout(None)
        connection.sendall(f"pid {os.getpid()}\n".encode())
        threading.Thread(target=_die_with, args=(connection,), daemon=True).start()
        status = _exit_status(run)
        atexit._run_exitfuncs()  # what a process ending normally runs: log handlers flushed, files closed
        sys.stdout.flush()
        sys.stderr.flush()
        connection.sendall(f"exit {status}\n".encode())
    finally:
        os._exit(status)


def _exit_status(run) -> int:
    try:
        run()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - a new process would print it and end so too
        import traceback

        traceback.print_exc()
        return 128 + signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1
    return 0


def _die_with(connection: socket.socket) -> None:
    """The command is gone (killed, even with SIGKILL) once its end of the socket closes: so is its work."""
    try:
        connection.recv(1)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def why_cold(request: dict, environ: dict[str, str], code: str, cwd: str) -> str | None:
    """Why a child of this worker (started in `cwd` with `environ`) would not behave as a new process
    for `request`; None if it would."""
    if request.get("python") != sys.executable:
        return f"another Python ({request.get('python')})"
    if request.get("code") != code:
        return CODE_CHANGED
    theirs, ours = _comparable(request.get("env") or {}, request.get("cwd") or "/"), _comparable(environ, cwd)
    differing = sorted(name for name in set(theirs) ^ set(ours) | {
        name for name in set(theirs) & set(ours) if theirs[name] != ours[name]})
    return f"the environment differs ({', '.join(differing[:3])})" if differing else None


def _comparable(environ: dict[str, str], cwd: str) -> dict[str, str]:
    """What of an environment decides how a command behaves; $CNNPIPE_HOME as the folder it names
    from `cwd` (unset, or relative, or absolute: the same home is the same)."""
    kept = {name: value for name, value in environ.items() if name not in TERMINAL_VARIABLES}
    kept["CNNPIPE_HOME"] = str(home_of(environ, cwd))
    return kept


def launch(socket_path: Path, log: Path) -> int:
    """Start a worker at `socket_path` in a session of its own, its output appended to `log`; its PID."""
    import subprocess

    socket_path.unlink(missing_ok=True)  # a killed worker's, which nothing answers on
    with open(log, "ab") as output:
        # -P: no module in the folder it starts in shadows one of the stack (Python 3.11 on).
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        return subprocess.Popen([sys.executable, *safe_path, "-m", WORKER_MODULE, str(socket_path)],
                                env=launch_environment or dict(os.environ), stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True).pid


def code_fingerprint() -> str:
    """The newest modification time and the count of the sources a command runs."""
    root = Path(__file__).resolve().parents[2]
    newest, count = 0, 0
    for package in PACKAGES:
        for folder, _, names in os.walk(root / package):
            for name in names:
                if name.endswith(".py"):
                    newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
                    count += 1
    return f"{newest}:{count}"


def _at(path: Path, action) -> None:
    if len(os.fsencode(path)) <= _SOCKET_PATH_LIMIT:
        action(str(path))
        return
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        action(f"/proc/self/fd/{folder}/{path.name}")
    finally:
        os.close(folder)


def _read_line(connection: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        received = connection.recv(1)
        if not received:
            break
        line += received
    return line.decode()


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        received = connection.recv(size - len(data))
        if not received:
            raise OSError("the command went away")
        data += received
    return bytes(data)
