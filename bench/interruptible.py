"""``python -m bench.interruptible MODULE ARGS...``: ``python -m MODULE ARGS`` with SIGINT raising KeyboardInterrupt.

A job that a non-interactive shell starts in the background inherits SIGINT *ignored*, and Python then installs no
KeyboardInterrupt handler: ``timeout -s INT`` (bench/gpu_check.sh's time boxes) would reach nothing, and pytest would
be killed at the grace's end without writing its junit report. This restores the default handler first (child
processes then start with SIGINT at its default again)."""
import runpy
import signal
import sys

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if len(sys.argv) < 2:
        sys.exit("usage: python -m bench.interruptible MODULE [ARGS...]")
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
