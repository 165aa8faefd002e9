"""Verification's fresh process, forked from one that has already imported torch and transformers.

The verify stage reloads every folder it writes in a fresh ``python -c`` (``verify.run_user_code``), which spends
about 6.5 s of its life importing torch, transformers and their model-loading modules before it reads the folder;
the suite verifies some 40 folders. Under the tests, ``ForkServer.run`` takes its place: a server process (one
per pytest worker, started on first use) imports those modules once and forks a child per call, which runs the
same code with the same arguments, environment and working directory and then exits. The child never sees this
package (the server imports nothing from it, and the user code asserts so), it loads the folder's remote code
into its own module cache as a fresh process would, and its output, exit code and stderr come back the same
way. Tests marked ``fresh_verify`` use the real subprocess (conftest).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_SERVER = r"""
import importlib, importlib.util, json, os, sys, traceback
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
    if pid == 0:  # the child: what a fresh ``python -c code *argv`` in cwd with env would do
        status = 1
        try:
            os.chdir(job["cwd"])
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            os.environ.clear()
            os.environ.update(job["env"])
            cache = os.environ.get("HF_MODULES_CACHE")  # read at import: set where transformers keeps it
            if cache:
                transformers.utils.hub.HF_MODULES_CACHE = transformers.dynamic_module_utils.HF_MODULES_CACHE = cache
            if os.environ.get("OMP_NUM_THREADS"):
                torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
            sys.argv = ["-c", *job["argv"]]
            exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"})
            status = 0
        except SystemExit as err:
            status = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            if not isinstance(err.code, int) and err.code is not None:
                print(err.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
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
        self._lock = threading.Lock()

    def run(self, code: str, argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
        with self._lock, tempfile.TemporaryDirectory(prefix="fork-server-") as tmp:
            if self._proc is None or self._proc.poll() is not None:
                command = [sys.executable, "-c", _SERVER, json.dumps(self._modules)]
                self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env)
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            job = {"code": code, "argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
            self._proc.stdin.write((json.dumps(job) + "\n").encode())
            self._proc.stdin.flush()
            reply = self._proc.stdout.readline()
            if not reply:
                raise RuntimeError("the fork server died")
            returncode = json.loads(reply)
            return subprocess.CompletedProcess(
                [sys.executable, "-c", code, *argv], returncode, out.read_text(), err.read_text()
            )

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
