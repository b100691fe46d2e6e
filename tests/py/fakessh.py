"""A stand-in for ssh, for tests of ranks on "other hosts" on one machine.

``fakessh.py [ssh options] HOST COMMAND...`` does what matters of
``ssh -T HOST COMMAND``, locally:

- it appends its arguments to the JSON-lines file ``$FAKESSH_LOG``;
- it runs COMMAND with ``/bin/sh -c`` in a new session, as sshd runs it for a
  login: not in this process's process group, so killing this process's
  group does not reach it, and with a login's environment (PATH, HOME, USER,
  LANG, and ``FAKESSH_TAG`` so a test can find what it started), none of the
  caller's, so what the command needs must be on its line;
- it relays stdin, stdout and stderr through pipes, as sshd relays the
  session's channel: when this process dies, the command's stdin ends and
  its writes to stdout fail, which is what a closed connection does;
- ``$FAKESSH_BANNER``, if set, is printed on stdout first, like a login
  script that prints;
- it exits with the command's status (255 when a signal ended it, as ssh
  does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

OPTS_WITH_ARG = set("BbcDEeFIiJLlmOopQRSWw")


def parse(argv: list[str]):
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        if a[1] in OPTS_WITH_ARG and len(a) == 2:
            i += 2
        else:
            i += 1
    return argv[i], " ".join(argv[i + 1:])


def pump(src: int, dst: int, close_dst: bool) -> None:
    try:
        while True:
            b = os.read(src, 65536)
            if not b:
                break
            view = memoryview(b)
            while view:
                view = view[os.write(dst, view):]
    except OSError:
        pass
    finally:
        if close_dst:
            os.close(dst)


def main() -> int:
    argv = sys.argv[1:]
    host, command = parse(argv)
    with open(os.environ["FAKESSH_LOG"], "a") as f:
        f.write(json.dumps({"argv": argv, "host": host, "command": command, "pid": os.getpid()}) + "\n")
    if os.environ.get("FAKESSH_BANNER"):
        os.write(1, os.environ["FAKESSH_BANNER"].encode())
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"),
           "USER": os.environ.get("USER", "nobody"), "LANG": "C.UTF-8",
           "FAKESSH_TAG": os.environ.get("FAKESSH_TAG", "")}
    child = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, start_new_session=True)
    ins = os.dup(child.stdin.fileno())
    child.stdin.close()
    threading.Thread(target=pump, args=(0, ins, True), daemon=True).start()
    outs = [threading.Thread(target=pump, args=(child.stdout.fileno(), 1, False)),
            threading.Thread(target=pump, args=(child.stderr.fileno(), 2, False))]
    for t in outs:
        t.start()
    code = child.wait()
    for t in outs:
        t.join()
    return 255 if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
