"""Entry point: ``python -m krserve_worker --model DIR [options]``.

The first statements protect the protocol channel (docs/protocol.md, *Channel
protection*), before anything else is imported: the protocol moves to private
fds, fd 0 becomes /dev/null and fd 1 a copy of stderr, so a stray ``print()``,
a C-level write to fd 1 or an ``input()`` prompt can never touch a frame.
"""

import os
import sys

proto_in = os.dup(0)
_devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(_devnull, 0)
os.close(_devnull)
proto_out = os.dup(1)
os.dup2(2, 1)

import faulthandler  # noqa: E402
import io  # noqa: E402

sys.stdout = io.TextIOWrapper(io.FileIO(os.dup(2), "w"), encoding="utf-8",
                              errors="replace", line_buffering=True, write_through=True)
faulthandler.enable(sys.stderr)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    from krserve_worker.worker import main as worker_main

    return worker_main(sys.argv[1:], proto_in, proto_out)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)
