"""Loading a checkpoint onto data-parallel ranks: run by tests/test_distributed.py as
`torchrun --nproc-per-node 2 -m tests.dist_load CHECKPOINT OUT`.

Each rank loads the checkpoint sharded (`distributed.load_sharded`, no full copy) and records the growth of
its peak resident memory during the load, then loads it the plain way (`load_pretrained` + `parallelize`:
the whole model, a copy, the shards) and records that growth too, and whether the two give the same
weights. Rank r writes `<out>/rank<r>.json`.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from dapo import distributed
from dapo.models import load_pretrained


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    world = distributed.init_world(device="cpu")
    world.barrier()
    before = peak_rss_bytes()
    sharded, full = distributed.load_sharded(checkpoint, "float32", world, full_copy=False)
    sharded_growth = peak_rss_bytes() - before
    assert full is None
    plain_model = load_pretrained(checkpoint, dtype="float32")
    reference, _ = distributed.parallelize(plain_model, world)
    plain_growth = peak_rss_bytes() - before - sharded_growth
    equal = all(
        torch.equal(p.full_tensor(), q.full_tensor())  # type: ignore[operator]
        for (_, p), (_, q) in zip(sharded.named_parameters(), reference.named_parameters(), strict=True)
    )
    local = sum(p.to_local().numel() * 4 for p in sharded.parameters())  # type: ignore[operator]
    result = {"sharded_growth": sharded_growth, "plain_growth": plain_growth, "equal": equal, "local": local}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{world.rank}.json").write_text(json.dumps(result))
    world.close()


if __name__ == "__main__":
    main()
