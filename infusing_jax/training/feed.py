"""The train step's feed: host batches placed on the devices ahead of the step that
takes them, so that host-to-device copies overlap the steps before.

A run checkpoints its tf.data iterator and skip counts with its state, and a resumed
run must see the batches an uninterrupted one would have. So the feed reads ahead
only as far as the loop allows (`ahead`: the steps left before the next
checkpoint), and counts a batch's skipped examples when a step takes it, not when it
is read.
"""
import collections
from typing import Callable


class Feed:
    """next_host() -> this process's numpy batch; place(host batch) -> the device batch;
    counter: a pipeline.SkipCounter, updated as steps take batches; depth: how many
    batches to hold on the devices beyond the one a step takes (0: none)."""

    def __init__(self, next_host: Callable, place: Callable, counter, depth: int):
        self._next_host, self._place, self._counter = next_host, place, counter
        self.depth = depth
        self._held = collections.deque()  # (host batch, device batch), oldest first

    @property
    def held(self) -> int:
        """Batches read from the iterator that no step has taken yet."""
        return len(self._held)

    def next(self, ahead: int) -> dict:
        """The next step's device batch; then reads on until min(depth, ahead) batches
        are held (ahead: how many more batches the iterator may move past this one)."""
        if not self._held:
            self._read()
        host, batch = self._held.popleft()
        self._counter.update(host)
        while len(self._held) < min(self.depth, ahead):
            self._read()
        return batch

    def _read(self):
        host = self._next_host()
        self._held.append((host, self._place(host)))
