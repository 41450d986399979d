"""Hand a large object (the tokenizer) to `datasets.map`'s worker processes without pickling it per job.

    with inherited(tokenizer) as shipped:
        ds.map(fn, num_proc=2, fn_kwargs={"tokenizer": shipped})   # each worker's fn gets the tokenizer

`datasets.map(num_proc=N)` pickles its fn_kwargs with dill, in the parent, once per worker's job and
one job after another, before that worker can start. dill walks a tokenizer's Python objects slowly:
0.4-0.5 s a job for Mistral's 32k vocabulary (the standard pickler takes 0.07 s), plus 0.15 s to
load it in each worker, so with two processes the map spent 1.4 s of a 5 s run before the
workers had their tokenizer (the map with a function that does nothing: 1.7 s against 0.2 s).

Where the pool's workers are forked (Linux's default), they are copies of the parent and already
hold the object: the stand-in pickles as a key, and the worker finds the object under it. Where they
are spawned or served by a fork server (macOS, Windows, Python 3.14's Linux default), they hold
nothing, so the stand-in carries the object pickled once by the standard pickler, and they load it.
"""

from __future__ import annotations

import itertools
import pickle
from contextlib import contextmanager

_HELD: dict[int, object] = {}  # key -> object, while its `inherited` block runs (a forked worker has a copy)
_keys = itertools.count()


@contextmanager
def inherited(obj):
    """A picklable stand-in for OBJ that unpickles to OBJ itself in a worker forked inside this block."""
    key = next(_keys)
    _HELD[key] = obj
    try:
        yield _StandIn(key, obj)
    finally:
        del _HELD[key]  # the object is not kept alive past the map


class _StandIn:
    def __init__(self, key: int, obj):
        self.key, self.obj, self.blob = key, obj, None

    def __reduce__(self):
        import multiprocess  # the library `datasets` takes its pool from

        if multiprocess.get_start_method() == "fork":
            return _restore, (self.key, None)
        if self.blob is None:
            self.blob = pickle.dumps(self.obj)  # once, however many jobs carry it
        return _restore, (self.key, self.blob)


def _restore(key: int, blob: bytes | None):
    if key in _HELD:
        return _HELD[key]  # a forked worker: the parent's object, copied with the process
    if blob is None:
        raise RuntimeError(
            "a worker process did not inherit the tokenizer it was handed (its pool was not forked); "
            "set data.num_proc: 1 to tokenize in one process"
        )
    return pickle.loads(blob)
