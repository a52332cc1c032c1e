"""The resumable prompt sampler: walks a fresh permutation of the examples each epoch.

Epoch e's order is a function of (seed, e) alone, whatever was drawn before and in what batch sizes.
The whole state is (epoch, position), so resuming is exact: a sampler restored from `state_dict()`
draws the same indices the original would have (design.md, checkpoint). A batch may span an epoch
boundary. Once `max_epochs` epochs are drawn, `next_indices` returns fewer indices than asked (maybe
none), which the caller reads as "data exhausted".
"""

from __future__ import annotations

import hashlib

import torch

_STATE_KEYS = ("num_examples", "seed", "shuffle", "epoch", "position")


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixed from (seed, epoch): nearby epochs and seeds get unrelated orders."""
    digest = hashlib.sha256(f"dapo-sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_int(name: str, value: object, minimum: int | None) -> int:
    """`value` if it is an int (not a bool) of at least `minimum`; otherwise ValueError naming `name`."""
    # bool is an int subclass; True as a size or seed is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}={value!r}: expected an integer{bound}")
    return value


class PromptSampler:
    """Deterministic, resumable order over `num_examples` examples, one permutation per epoch."""

    def __init__(
        self, num_examples: int, *, seed: int, shuffle: bool = True, max_epochs: int | None = None
    ) -> None:
        """`max_epochs=None` cycles forever; `shuffle=False` walks 0..num_examples-1 in order each epoch."""
        # An empty dataset would make every draw return nothing; fail where the cause is clear.
        self.num_examples = _check_int("num_examples", num_examples, 1)
        self.seed = _check_int("seed", seed, None)
        self.shuffle = bool(shuffle)
        self.max_epochs = None if max_epochs is None else _check_int("max_epochs", max_epochs, 1)
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def epoch(self) -> int:
        """The current epoch (0-based); equals `max_epochs` once exhausted."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many examples of the current epoch were drawn (always < num_examples)."""
        return self._position

    @property
    def exhausted(self) -> bool:
        """True once `max_epochs` full epochs were drawn."""
        return self.max_epochs is not None and self._epoch >= self.max_epochs

    def epoch_order(self, epoch: int) -> list[int]:
        """The order of example indices in `epoch`; depends only on (num_examples, seed, shuffle, epoch)."""
        _check_int("epoch", epoch, 0)
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return [int(i) for i in torch.randperm(self.num_examples, generator=generator).tolist()]

    def next_indices(self, n: int) -> list[int]:
        """The next `n` example indices, continuing into the next epoch; fewer (maybe none) once exhausted."""
        _check_int("n", n, 0)
        out: list[int] = []
        while len(out) < n and not self.exhausted:
            if self._order_epoch != self._epoch:
                # Cache the current epoch's permutation; it is recomputed only when the epoch changes.
                self._order = self.epoch_order(self._epoch)
                self._order_epoch = self._epoch
            take = min(n - len(out), self.num_examples - self._position)
            out.extend(self._order[self._position : self._position + take])
            self._position += take
            if self._position == self.num_examples:
                self._epoch += 1
                self._position = 0
        return out

    def state_dict(self) -> dict[str, int]:
        """What resuming needs: identity (num_examples, seed, shuffle) and place (epoch, position)."""
        return {
            "num_examples": self.num_examples,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()` output; ValueError for wrong keys or another dataset size/seed."""
        missing = [k for k in _STATE_KEYS if k not in state]
        unknown = [k for k in state if k not in _STATE_KEYS]
        # A partial or foreign dict would restore a silently different order.
        if missing or unknown:
            raise ValueError(
                f"PromptSampler state: missing keys {missing}, unknown keys {unknown}; "
                f"expected {list(_STATE_KEYS)}"
            )
        for key in ("num_examples", "seed", "shuffle"):
            mine = int(self.shuffle) if key == "shuffle" else getattr(self, key)
            # A position only means something for the same dataset size, seed and shuffling.
            if state[key] != mine:
                raise ValueError(
                    f"PromptSampler state has {key}={state[key]!r} but this sampler has {key}={mine!r}; "
                    "the state belongs to a different dataset or seed"
                )
        epoch = _check_int("PromptSampler state epoch", state["epoch"], 0)
        position = _check_int("PromptSampler state position", state["position"], 0)
        # A saved position is always < num_examples (the epoch advances instead of reaching it).
        if position >= self.num_examples:
            raise ValueError(f"PromptSampler state position={position}: must be < {self.num_examples}")
        self._epoch = epoch
        self._position = position
