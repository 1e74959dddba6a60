"""Ctrl-C during training: the first press checkpoints and stops at the next step boundary."""

from __future__ import annotations

import os
import signal
import sys
import time


class TrainingStopped(KeyboardInterrupt):
    """The user's Ctrl-C stopped the run after it wrote a checkpoint: an interrupt, not an error
    (the CLI prints the message, which says how to continue, and exits 130 like any interrupt)."""


class StopRequest:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step boundary; a second one aborts."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.requested_at = 0.0
        self.announce = announce  # every process gets the terminal's Ctrl-C; one says so

    def __enter__(self):
        self._pid = os.getpid()
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # Dataloader workers are forked with this handler and get the terminal's Ctrl-C too: they go on
        # serving batches, and the training process alone stops (and says so once).
        if os.getpid() != self._pid:
            return
        # Launchers forward the terminal's Ctrl-C, so one press can arrive twice within a moment.
        if self.requested and time.monotonic() - self.requested_at > 1.0:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested, self.requested_at = True, time.monotonic()
        if self.announce:
            print(
                "\nqllava: stopping after this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr
            )

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


class StopAtCheckpoint(Exception):
    """A condition the run cannot train through (a bad sample under data.on_bad_sample=stop, too many
    non-finite steps, memory): every process writes a checkpoint of the last completed step, then the run
    ends with this message and the command that resumes it."""
