# A Python that has imported torch once and forks a child for each command it is sent (DataLoader's workers are forked
# the same way): a tool that refuses its input in ~0.3 s of its own work no longer spends ~2.5 s importing torch
# first. The child runs `python SCRIPT ARGS` as the interpreter would: the script as __main__, its folder first on
# sys.path, the command's working folder and environment, stdin empty, stdout and stderr into the files it is given,
# and it exits as Python exits: 0, SystemExit's code (a message to stderr and 1), or a traceback and 1. torch is
# already imported, so what torch reads from the environment at import time (OMP_NUM_THREADS) stays the parent's.
# Protocol: a JSON line per command on stdin ({argv, cwd, env, stdout, stderr, timeout}), its exit status back on
# stdout (negative: killed by that signal; SIGALRM past the timeout). conftest.Prestarted drives it.
import atexit
import json
import os
import runpy
import signal
import sys
import traceback

import torch  # noqa: F401  (the point of this process)


def child(cmd: dict):
    signal.alarm(cmd["timeout"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, cmd["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(path, flags, 0o600), fd)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    os.chdir(cmd["cwd"])
    os.environ.clear()
    os.environ.update(cmd["env"])
    script = os.path.abspath(cmd["argv"][0])
    sys.argv, sys.path[0] = [cmd["argv"][0], *cmd["argv"][1:]], os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = 0 if e.code is None else e.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


for line in sys.stdin:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(json.loads(line))
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
