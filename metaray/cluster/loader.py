"""Tasks onto a worker's device, loaded ahead of the call that needs them (``ClusterConfig.prefetch``).

An actor runs its task calls one after another on its main thread. The dispatcher (dispatch.py) knows each
actor's queue, so when a call becomes the next one an actor will run, it sends that actor ``prefetch(keys)``.
That call runs on the actor's prefetch thread (the concurrency group ``PREFETCH``), beside the call computing
on the main thread, and loads the next call's tasks: sampled from the source, cast, and put on the device.
``TaskLoader.take(key)`` on the main thread then finds the task ready, or waits for it if it is still loading.
When no prefetch came in time (the first call of an actor's step, or a call that started before its hint
arrived), it samples the task itself. Sources sample from the key alone, so a task is the same tensors
whichever thread loaded it, and prefetching changes no bit of a result.

On a GPU, loading ahead is the whole host-to-device path. The task is sampled and cast on the host, copied into
pinned (page-locked) memory, and from there to the device by a non-blocking copy on a side CUDA stream, so
the copy overlaps the running call's kernels. ``take`` makes the compute stream wait for the copy's event
before the task is used. It also records the task's tensors on the compute stream, so the caching allocator
does not hand their memory out again while kernels still read them.

Sources that draw from the global RNG are safe to load on either thread, because every ``source.sample``
holds one lock. These are the augmentations seeded per key (``fewshot.py``) and learn2learn task sets
(``l2l.py``). metaray's solvers never draw from the global RNG.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

PREFETCH = "prefetch"  # the actors' concurrency group for prefetch calls: a thread of its own


def map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """``fn`` applied to every tensor in a task: a tensor, a dict, a list/tuple (not a named tuple) or a
    dataclass (its init fields), nested. Other objects (and other mappings) are returned as they are."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)((k, map_tensors(fn, v)) for k, v in obj.items()) if isinstance(obj, dict) else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(map_tensors(fn, v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors ``map_tensors`` would visit."""
    found: list[Tensor] = []
    map_tensors(lambda t: found.append(t) or t, obj)
    return iter(found)


def move(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The tensors of a task (floating ones cast to ``dtype``) on ``device``; integer tensors (class labels)
    keep their dtype."""
    return map_tensors(lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device), obj)


def _step_of(key: Any) -> tuple[Any, Any] | None:
    """(split, step) of a task key (split, step, index); None for anything else."""
    return (key[0], key[1]) if isinstance(key, tuple) and len(key) == 3 else None


class TaskLoader:
    """A worker's tasks on its device: ``take(key)`` on the main thread, ``fetch(keys)`` ahead of it on the
    prefetch thread.

    capacity: tasks kept loaded at most (the oldest are dropped first). A task loaded for a call that never
    ran (a cancelled straggler copy) is dropped when a task of a later step of its split is taken.
    """

    def __init__(self, source: Any, device: torch.device, dtype: torch.dtype, capacity: int = 64):
        self.source, self.device, self.dtype, self.capacity = source, device, dtype, capacity
        self._ready: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()
        self._loading: set = set()
        self._changed = threading.Condition()  # guards _ready and _loading; notified when a load ends
        self._sampling = threading.Lock()  # one source.sample at a time (sources may use the global RNG)
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.hits = 0    # tasks take() found loaded ahead (or loading)
        self.misses = 0  # tasks take() had to load itself
        self.ahead = 0   # tasks fetch() loaded

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "loaded_ahead": self.ahead}

    def load(self, key: Any) -> Any:
        """The task ``key`` names, sampled and moved now, on the calling thread."""
        with self._sampling:
            task = self.source.sample(key)
        return move(task, self.device, self.dtype)

    def fetch(self, keys: list) -> int:
        """Loads the tasks ``keys`` name that are not loaded yet (the prefetch thread); returns how many.

        A task whose loading fails is skipped: ``take`` then loads it on the main thread, where the error
        surfaces the way it does without prefetching."""
        n = 0
        for key in keys:
            with self._changed:
                if key in self._ready or key in self._loading:
                    continue
                self._loading.add(key)
            item = None
            try:
                item = self._load_ahead(key)
            except Exception:  # noqa: BLE001 (reported by take's own load, on the main thread)
                pass
            finally:
                with self._changed:
                    self._loading.discard(key)
                    if item is not None:
                        self._ready[key] = item
                        while len(self._ready) > self.capacity:
                            self._ready.popitem(last=False)
                        n += 1
                    self._changed.notify_all()
        self.ahead += n
        return n

    def take(self, key: Any) -> Any:
        """The task ``key`` names, ready for the compute stream: the one loaded ahead if there is one (waiting
        for its loading to end), else loaded now."""
        with self._changed:
            while key in self._loading:
                self._changed.wait()
            item = self._ready.pop(key, None)
            self._drop_earlier_steps(key)
        if item is None:
            self.misses += 1
            return self.load(key)
        self.hits += 1
        task, copied = item
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for t in tensors(task):
                t.record_stream(compute)
        return task

    def _drop_earlier_steps(self, key: Any) -> None:
        step = _step_of(key)
        if step is None:
            return
        for k in list(self._ready):
            s = _step_of(k)
            if s is None or s[0] != step[0]:
                continue
            try:
                earlier = s[1] < step[1]
            except TypeError:  # steps that do not compare: keep the task (capacity still bounds them)
                continue
            if earlier:
                del self._ready[k]

    def _load_ahead(self, key: Any) -> tuple[Any, Any]:
        """(task on the device, the CUDA event its copy records, or None on a CPU)."""
        with self._sampling:
            task = self.source.sample(key)
        if self._copies is None:
            return move(task, self.device, self.dtype), None
        host = move(task, torch.device("cpu"), self.dtype)  # cast on the host, off the main thread
        with torch.cuda.stream(self._copies):
            # pinned memory makes the copy asynchronous; the host allocator keeps the pinned buffer until the
            # copy that reads it has run, so it may be freed here
            task = map_tensors(lambda t: t.pin_memory().to(self.device, non_blocking=True), host)
            copied = torch.cuda.Event()
            copied.record(self._copies)
        return task, copied
