"""runtime/heap.py: the serving processes' garbage-collector settings (no collection of the
startup heap in a request's path) and the collection timer."""

import gc

from enclaveml.runtime import heap
from enclaveml.timing import StageClock


def _restore(thresholds, monkeypatch):
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    monkeypatch.setitem(heap._state, "tuned", False)
    monkeypatch.setitem(heap._state, "frozen", False)


def test_settle_freezes_the_heap_only_once_configured(monkeypatch):
    before = gc.get_threshold()
    monkeypatch.setitem(heap._state, "tuned", False)
    monkeypatch.setitem(heap._state, "frozen", False)
    try:
        heap.settle()  # not configured (a test process, a library user): nothing changes
        assert gc.get_freeze_count() == 0
        monkeypatch.setenv("ENCLAVEML_GC", "0")
        assert heap.configure() is False and gc.get_threshold() == before
        heap.settle()
        assert gc.get_freeze_count() == 0
        monkeypatch.delenv("ENCLAVEML_GC")
        assert heap.configure() is True
        assert gc.get_threshold() == (heap.GEN0_THRESHOLD, before[1], before[2])
        heap.settle(again=True)  # a restore before the startup heap is frozen: nothing yet
        assert gc.get_freeze_count() == 0
        heap.settle()  # every live object moves to the permanent generation
        assert gc.get_freeze_count() > 1000
        assert len(gc.get_objects(2)) < gc.get_freeze_count()
        made_since = [[i] for i in range(100)]
        heap.settle(again=True)  # after a deploy: what came since joins the frozen heap
        assert gc.get_objects(2) == [] and made_since
    finally:
        _restore(before, monkeypatch)


def test_collections_are_timed_per_generation_and_a_new_observer_replaces_the_old():
    old = StageClock()
    clock = StageClock()
    try:
        heap.observe(old)
        heap.observe(clock)
        gc.collect(0)
        gc.collect(2)
        snap = clock.snapshot()
        assert snap["gc_gen0"]["n"] == 1 and snap["gc_gen2"]["n"] == 1
        assert snap["gc_gen2"]["wall_ns"] > 0
        assert old.snapshot() == {}
    finally:
        gc.callbacks.remove(heap._state["timer"])
        heap._state["timer"] = None
