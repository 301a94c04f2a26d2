"""The process around one training: its signal handlers while it runs, accelerate's
process-wide state after it, so a notebook can train again in the same kernel."""
from __future__ import annotations

import signal
from contextlib import contextmanager


@contextmanager
def cancel_on_signal():
    """SIGINT (Ctrl-C, a notebook's stop button) and SIGTERM ask the loop to stop at the next
    step and save, like the extension's Cancel button. A second Ctrl-C stops at once."""
    flag = {"cancel": False}

    def handler(signum, frame):
        if flag["cancel"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["cancel"] = True
        print(f"\n[dbnb] {signal.Signals(signum).name}: stopping after this step and saving "
              "(press Ctrl-C again to stop without saving).", flush=True)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def forget_accelerator_state() -> None:
    """accelerate keeps one process-wide state; a notebook that trains again with another
    mixed_precision would otherwise fail with 'AcceleratorState has already been initialized'."""
    # accelerate has no public reset (its own tests call this private one); it lives only here, and
    # tests/test_train.py's two trainings in one process fail if a release changes it.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
