"""Timing helpers of the benchmarks: steps paced as a training loop runs them, and sides
compared in turns."""

from __future__ import annotations

import time

import numpy as np


def pipelined_intervals(dispatch, wait, n: int) -> list[float]:
    """Seconds between the completions of n + 1 consecutive steps, each dispatched before the
    one ahead of it is waited for: a training loop's pace (train/loop.py reads a step's
    metrics after dispatching the next), host dispatch hidden behind device work as it is
    there. `dispatch()` starts a step and returns what `wait` blocks on."""
    pending = dispatch()
    completions = []
    for i in range(n + 1):
        following = dispatch() if i < n else None
        wait(pending)
        completions.append(time.perf_counter())
        pending = following
    return np.diff(completions).tolist()


def in_turns(timers: list, rounds: int) -> list[list[float]]:
    """Each timer's `rounds` measurements (a timer is called for one), taken in turns, one of
    each per round, so that drift in the machine's speed falls on all of them alike."""
    times = [[] for _ in timers]
    for _ in range(rounds):
        for timer, measured in zip(timers, times):
            measured.append(timer())
    return times


def call_timer(fn):
    """A timer for `in_turns`: calls `fn` once and returns the seconds it took."""
    def seconds() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return seconds
