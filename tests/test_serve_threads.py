"""The lone-pass thread chooser (serve/threads.py): picks the faster of 1 and N threads by measuring,
re-measures a stale option, never uses more than one thread for big or concurrent passes, and sets
the thread count of the calling thread only."""

import threading

import torch

from enclaveml.serve.threads import LoneThreads


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_measures_both_then_keeps_the_faster_and_re_explores_when_stale():
    clock = Clock()
    lt = LoneThreads(best=2, base=1, explore_s=2.0, clock=clock)
    assert lt.pick(1) == 2  # nothing known: try the cores first
    lt.record(1, 2, 0.004)
    assert lt.pick(1) == 1  # then the single thread
    lt.record(1, 1, 0.002)
    assert lt.pick(1) == 1  # 1 thread was faster (a loaded machine)
    clock.t = 1.0
    assert lt.pick(1) == 1
    clock.t = 2.5  # the 2-thread figure is stale: measure it again
    assert lt.pick(1) == 2
    for _ in range(10):
        lt.record(1, 2, 0.001)  # the machine got quiet
    assert lt.pick(1) == 1  # 2 threads lead now; the 1-thread figure (t=0) is re-measured
    lt.record(1, 1, 0.002)  # it confirms 2 threads: the next re-measure waits twice as long
    assert lt.pick(1) == 2
    clock.t = 6.4
    assert lt.pick(1) == 2
    clock.t = 6.6
    assert lt.pick(1) == 1


def test_re_measures_back_off_while_they_confirm_the_choice():
    clock = Clock()
    lt = LoneThreads(best=2, base=1, explore_s=2.0, clock=clock)
    lt.record(1, 2, 0.050)  # a loaded machine: 2 threads are slow
    lt.record(1, 1, 0.005)
    waits = []
    for _ in range(5):
        t0 = clock.t
        while lt.pick(1) == 1:
            clock.t += 0.5
        waits.append(clock.t - t0)
        lt.record(1, 2, 0.050)  # the re-measure confirms: still slow
        lt.record(1, 1, 0.005)
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0]
    clock.t += 64.0
    assert lt.pick(1) == 2
    lt.record(1, 2, 0.001)  # now it wins: the choice flips and the interval resets
    assert lt._interval[1] == 2.0
    assert lt.pick(1) == 1  # the 1-thread figure is old: measured afresh
    lt.record(1, 1, 0.005)
    assert lt.pick(1) == 2


def test_big_busy_and_single_core_passes_use_the_thread_as_it_is():
    lt = LoneThreads(best=2, base=1)
    assert lt.pick(5) == 1  # more than LONE_MAX_ROWS rows
    assert lt.pick(0) == 1
    assert lt.pick(1, busy=True) == 1
    assert lt.pick(1, base=2) == 2  # the process already uses the cores
    assert LoneThreads(best=1, base=1).pick(1) == 1


def test_a_concurrent_pass_runs_at_one_thread_and_counts_are_per_thread():
    torch.set_num_threads(1)
    lt = LoneThreads(best=2, base=1)
    seen = {}
    with lt.run(1) as n:
        assert n == 2 and torch.get_num_threads() == 2
        def other():  # another pass, on another thread, while this one runs
            with lt.run(1) as m:
                seen["nested"] = (m, torch.get_num_threads())

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["nested"] == (1, 1)
    assert torch.get_num_threads() == 1  # restored
    assert (1, 2) in lt._stats and (1, 1) not in lt._stats  # the concurrent pass is not a sample


def test_env_overrides_the_core_count(monkeypatch):
    monkeypatch.setenv("ENCLAVEML_LONE_THREADS", "1")
    assert LoneThreads(base=1).pick(1) == 1
    monkeypatch.setenv("ENCLAVEML_LONE_THREADS", "3")
    assert LoneThreads().best == 3
