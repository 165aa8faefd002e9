"""Verification's fresh process, forked from one that has already imported torch and transformers.

The verify stage reloads every folder it writes in a fresh ``python -c`` (``verify.run_user_code``), which spends
about 6.5 s of its life importing torch, transformers and their model-loading modules before it reads the folder;
the suite verifies some 40 folders. Under the tests, ``ForkServer.run`` takes its place: a server process (one
per pytest worker, started on first use) imports those modules once and forks a child per call, which runs the
same code with the same arguments, environment variables and working directory, in a ``__main__`` of its own,
runs the exit handlers and exits. The child never sees this package (the server imports nothing from it, and the
user code asserts so), it loads the folder's remote code into its own module cache as a fresh process would, and
its output, exit code and stderr come back the same way. What transformers, huggingface_hub and torch read at
import (HF_HOME, HF_ENDPOINT, logging verbosity, ...) is the server's, started with verification's own
HF_HUB_OFFLINE=1 and PYTHONPATH="" (verification loads a local folder: nothing else of it matters there), and
messages the server's imports printed are not repeated. Tests marked ``fresh_verify`` use the real subprocess
(conftest); test_publish pins the two against each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_SERVER = r"""
import atexit, importlib, importlib.util, json, os, sys, traceback, types
import torch, transformers
from transformers import AutoModelForImageTextToText
import transformers.dynamic_module_utils, transformers.generation.utils, transformers.masking_utils
import transformers.modeling_utils, transformers.utils.hub
for name in json.loads(sys.argv[1]):  # the families' modeling modules, which the remote code imports
    if importlib.util.find_spec(name.rsplit(".", 1)[0]) is not None:
        importlib.import_module(name)
assert "shortv_export" not in sys.modules
requests, replies = sys.stdin.buffer, sys.stdout.buffer
sys.stdout.flush(), sys.stderr.flush()
for line in requests:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: what a fresh ``python -c code *argv`` in cwd with env would do; it never leaves here
        status = 1
        try:
            try:
                os.chdir(job["cwd"])
                for fd, path in ((1, job["stdout"]), (2, job["stderr"])):  # sys.stdout/err keep their buffering
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                os.environ.clear()
                os.environ.update(job["env"])
                cache = os.environ.get("HF_MODULES_CACHE")  # read at import: set where transformers keeps it
                if cache:
                    transformers.utils.hub.HF_MODULES_CACHE = cache
                    transformers.dynamic_module_utils.HF_MODULES_CACHE = cache
                if os.environ.get("OMP_NUM_THREADS"):
                    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
                sys.argv = ["-c", *job["argv"]]
                main = types.ModuleType("__main__")
                sys.modules["__main__"] = main
                exec(compile(job["code"], "<string>", "exec"), main.__dict__)
                status = 0
            except SystemExit as err:
                status = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
                if not isinstance(err.code, int) and err.code is not None:
                    print(err.code, file=sys.stderr)
            except BaseException as err:  # the traceback from the user code's frames on, as python -c prints it
                traceback.print_exception(type(err), err, err.__traceback__.tb_next)
            finally:
                try:
                    atexit._run_exitfuncs()  # as interpreter shutdown does
                    sys.stdout.flush(), sys.stderr.flush()
                except BaseException:
                    pass
        finally:
            os._exit(status)
    _, wait = os.waitpid(pid, 0)
    replies.write((json.dumps(os.waitstatus_to_exitcode(wait)) + "\n").encode())
    replies.flush()
"""


class ForkServer:
    """``run(code, argv, env, cwd)`` as ``verify.run_user_code`` does it, forked from a warm server."""

    def __init__(self, modules: list[str], env: dict):
        self._modules, self._env = modules, env
        self._proc: subprocess.Popen | None = None
        self._log: Path | None = None  # the server's stderr
        self._lock = threading.Lock()

    def run(self, code: str, argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
        with self._lock, tempfile.TemporaryDirectory(prefix="fork-server-") as tmp:
            if self._proc is None or self._proc.poll() is not None:
                command = [sys.executable, "-c", _SERVER, json.dumps(self._modules)]
                self._log = Path(tempfile.mkstemp(prefix="fork-server-", suffix=".log")[1])
                with self._log.open("w") as log:
                    self._proc = subprocess.Popen(
                        command,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        env=self._env,
                        cwd=tempfile.gettempdir(),
                    )
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            job = {"code": code, "argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
            try:
                self._proc.stdin.write((json.dumps(job) + "\n").encode())
                self._proc.stdin.flush()
                reply = self._proc.stdout.readline()
            except BrokenPipeError:
                reply = b""
            if not reply:
                raise RuntimeError(f"the fork server died: {self._log.read_text()[-2000:]}")
            returncode = json.loads(reply)
            return subprocess.CompletedProcess(
                [sys.executable, "-c", code, *argv], returncode, out.read_text(), err.read_text()
            )

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._log is not None:
            self._log.unlink(missing_ok=True)
