"""The Ray mode's weight broadcast group (`dapo.distributed.weight_group`, `broadcast_weights`) in one
process: member 0 and two receivers as threads on one TCPStore (gloo, CPU); the buckets the weights travel
in (`weight_buckets`)."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from dapo.distributed import (
    broadcast_weights,
    serve_store,
    weight_buckets,
    weight_group,
    weight_sync_device,
    weights_checksum,
)

SECRET = b"the run's secret"


def _members(
    modules: list[nn.Module],
    generation: int = 0,
    bucket_bytes: int = 512 << 20,
    source: Any = None,
    secrets: list[bytes] | None = None,
) -> list[Any]:
    """Run every member's `broadcast_weights` together (member 0 with ``bucket_bytes`` and ``source``),
    each joining with its secret (default: all the same); each member's (version, bytes) or its error."""
    timeout = datetime.timedelta(seconds=5)  # the sender of a refused sync waits this long
    server = serve_store("127.0.0.1", 5.0)
    results: list[Any] = [None] * len(modules)
    keys = secrets or [SECRET] * len(modules)

    def member(rank: int) -> None:
        store = server if rank == 0 else TCPStore("127.0.0.1", server.port, None, False, timeout)
        try:
            group = weight_group(store, rank, len(modules), generation, 5.0, torch.device("cpu"), keys[rank])
            if rank == 0:
                results[rank] = broadcast_weights(
                    group, modules[rank], version=7, bucket_bytes=bucket_bytes, source=source
                )
            else:
                results[rank] = broadcast_weights(group, modules[rank], version=0)
        except RuntimeError as e:
            results[rank] = e

    threads = [threading.Thread(target=member, args=(r,)) for r in range(len(modules))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_receivers_hold_the_senders_weights_and_version() -> None:
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)) for _ in range(3)]
    assert len({weights_checksum(m) for m in modules}) == 3
    results = _members(modules)
    size = sum(p.numel() * 4 for p in modules[0].parameters())
    assert results == [(7, size)] * 3
    assert len({weights_checksum(m) for m in modules}) == 1


def test_a_member_without_the_secret_is_refused_before_any_weight_moves() -> None:
    """A stranger that took a receiver's place in the rendezvous (the store is readable by anyone who
    reaches it, the secret comes through Ray): every member refuses the group, nothing is sent or loaded."""
    torch.manual_seed(0)
    modules = [nn.Linear(4, 3) for _ in range(3)]
    before = [weights_checksum(m) for m in modules]
    results = _members(modules, secrets=[SECRET, b"a guess", SECRET])
    for rank, r in enumerate(results):
        strangers = "[0, 2]" if rank == 1 else "[1]"  # the stranger's view: everyone else is one
        assert isinstance(r, RuntimeError) and f"member(s) {strangers} failed authentication" in str(r), r
    assert [weights_checksum(m) for m in modules] == before


def test_the_store_listens_on_its_address_only_on_a_port_it_chose() -> None:
    store = serve_store("127.0.0.1", 5.0)
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            host, port = local.split(":")
            listening.add((host, int(port, 16)))
    assert ("0100007F", store.port) in listening  # 127.0.0.1
    assert ("00000000", store.port) not in listening  # not 0.0.0.0


def test_a_receiver_with_another_model_fails_instead_of_loading() -> None:
    modules: list[nn.Module] = [nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), nn.Linear(4, 3)]
    before = weights_checksum(modules[1])
    results = _members(modules)
    assert isinstance(results[1], RuntimeError)
    with pytest.raises(RuntimeError, match="the sender has 4 parameters, this model 2"):
        raise results[1]
    assert weights_checksum(modules[1]) == before


def test_the_group_is_nccl_only_where_every_member_has_a_gpu_of_its_own() -> None:
    gpu = torch.device("cuda", 0)
    assert weight_sync_device(gpu, colocated=False) == gpu  # NCCL, device to device
    assert weight_sync_device(gpu, colocated=True) == torch.device(
        "cpu"
    )  # a shared GPU: gloo via host memory
    assert weight_sync_device(torch.device("cpu"), colocated=False) == torch.device("cpu")


def test_buckets_by_hand() -> None:
    f32 = [torch.zeros(n) for n in (3, 2, 5, 1, 1)]  # 12, 8, 20, 4, 4 bytes
    assert weight_buckets(f32, 20) == [range(0, 2), range(2, 3), range(3, 5)]
    assert weight_buckets(f32, 1) == [range(i, i + 1) for i in range(5)]  # each larger than a bucket: alone
    assert weight_buckets(f32, 1 << 20) == [range(0, 5)]
    mixed = [torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)]
    assert weight_buckets(mixed, 1 << 20) == [range(0, 1), range(1, 3)]  # one dtype per flat buffer
    assert weight_buckets([], 8) == []


@pytest.mark.parametrize("bucket_bytes", [1, 40, 1 << 20])
def test_any_bucket_size_delivers_the_same_weights(bucket_bytes: int) -> None:
    torch.manual_seed(1)
    modules = [nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)) for _ in range(3)]
    expected = weights_checksum(modules[0])
    size = sum(p.numel() * 4 for p in modules[0].parameters())
    assert _members(modules, bucket_bytes=bucket_bytes) == [(7, size)] * 3
    assert {weights_checksum(m) for m in modules} == {expected}


def test_a_streamed_source_reaches_the_receivers_and_the_senders_copy() -> None:
    """What trainer rank 0 does after an update: the gathered tensors (here another module's, as a
    stream), sent a bucket at a time and kept in its own copy."""
    torch.manual_seed(2)
    modules = [nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)) for _ in range(3)]
    new = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    stream = ((name, p.detach()) for name, p in new.named_parameters())
    _members(modules, bucket_bytes=24, source=stream)
    assert {weights_checksum(m) for m in modules} == {weights_checksum(new)}
