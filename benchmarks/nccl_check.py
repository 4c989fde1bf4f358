"""Check the NCCL KV path on a CUDA machine with PyTorch alone (no vLLM, no engine).

Two processes, one GPU each, hold synthetic paged KV caches in vLLM's GPU layout
([2, num_blocks, block_size, kv_heads, head_dim] per layer). They pair up exactly as the
connector's workers do (kv_transfer/channels/pair_group.py: producer TCPStore, two-rank
ProcessGroupNCCL, point-to-point send/recv), then move scattered blocks with the transport's
chunk plan: gather into a staging tensor on the producer's GPU, send, recv into a staging tensor
on the consumer's GPU, scatter. It checks every moved block byte for byte and prints GB/s for
the full path and for a bare contiguous send/recv of the same bytes.

    python -m benchmarks.nccl_check [--layers 32] [--blocks 256] [--iters 5]
    python -m benchmarks.nccl_check --backend gloo   # the same script on CPU (self-test)

Exits 0 with a message, and moves nothing, where CUDA or a second GPU is absent.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from kv_transfer.channels.pair_group import CONSUMER_RANK, PRODUCER_RANK, PairGroup, host_store
from kv_transfer.paged_kv import PagedKVCache

DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Setup:
    backend: str
    num_layers: int
    num_blocks: int  # blocks in each cache
    num_moved: int  # blocks moved per transfer
    block_size: int
    num_kv_heads: int
    head_dim: int
    chunk_bytes: int
    iters: int

    def device(self, rank: int) -> torch.device:
        return torch.device(f"cuda:{rank}") if self.backend == "nccl" else torch.device("cpu")

    def caches(self, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=gen)
                .to(DTYPE).to(device) for i in range(self.num_layers)}

    def block_ids(self) -> tuple[list[int], list[int]]:
        """Scattered source blocks (every other one, reversed) into other scattered blocks."""
        src = list(range(0, 2 * self.num_moved, 2))[::-1]
        dst = list(range(1, 2 * self.num_moved, 2))
        return src, dst


def _sync(setup: Setup) -> None:
    if setup.backend == "nccl":
        torch.cuda.synchronize()


def _run(rank: int, setup: Setup, ctl: Connection) -> None:
    device = setup.device(rank)
    if setup.backend == "nccl":
        torch.cuda.set_device(device)
    cache = PagedKVCache(setup.caches(seed=rank, device=device), setup.num_blocks)
    if rank == PRODUCER_RANK:
        store = host_store("127.0.0.1", timeout_s=60)
        ctl.send(store.port)
    else:
        store = torch.distributed.TCPStore("127.0.0.1", ctl.recv(), is_master=False)
    group = PairGroup("nccl-check", setup.backend, rank, store, timeout_s=60)  # type: ignore[arg-type]
    src_ids, dst_ids = setup.block_ids()
    plans = list(cache.plan_chunks(setup.num_moved, setup.chunk_bytes))
    total_bytes = sum(p.num_bytes for p in plans)
    staging = torch.empty(max(p.num_bytes for p in plans), dtype=torch.uint8, device=device)
    bare = torch.empty(total_bytes, dtype=torch.uint8, device=device)
    path_s, bare_s = [], []
    for _ in range(setup.iters + 1):  # the first round warms up (connection set-up)
        _sync(setup)
        start = time.perf_counter()
        for plan in plans:
            if rank == PRODUCER_RANK:
                blocks = src_ids[plan.first_block : plan.first_block + plan.num_blocks]
                n = cache.gather_tensor(plan.layer_index, blocks, staging)
                group.send(staging[:n])
            else:
                group.recv(staging[: plan.num_bytes])
                blocks = dst_ids[plan.first_block : plan.first_block + plan.num_blocks]
                cache.scatter_tensor(plan.layer_index, blocks, staging)
        _sync(setup)
        path_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        if rank == PRODUCER_RANK:
            group.send(bare)
        else:
            group.recv(bare)
        _sync(setup)
        bare_s.append(time.perf_counter() - start)
    if rank == CONSUMER_RANK:
        expected = PagedKVCache(setup.caches(seed=PRODUCER_RANK, device=device), setup.num_blocks)
        ok = _same_blocks(cache, expected, dst_ids, src_ids)
        ctl.send((ok, total_bytes, min(path_s[1:]), min(bare_s[1:])))
    group.close()


def _same_blocks(got: PagedKVCache, want: PagedKVCache, got_ids: list[int],
                 want_ids: list[int]) -> bool:
    for layer in range(got.num_layers):
        size = got.block_bytes_per_layer[layer]
        a = torch.empty(size * len(got_ids), dtype=torch.uint8, device=got.device)
        b = torch.empty_like(a)
        got.gather_tensor(layer, got_ids, a)
        want.gather_tensor(layer, want_ids, b)
        if not torch.equal(a, b):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=256, help="blocks moved per transfer")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--chunk-mib", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    if args.backend == "nccl":
        if not torch.cuda.is_available():
            print("nccl_check: skipped, CUDA is not available on this machine")
            return 0
        if torch.cuda.device_count() < 2:
            print(f"nccl_check: skipped, needs 2 GPUs, found {torch.cuda.device_count()}")
            return 0
    setup = Setup(args.backend, args.layers, 2 * args.blocks + 1, args.blocks, args.block_size,
                  args.kv_heads, args.head_dim, args.chunk_mib << 20, args.iters)
    ctx = mp.get_context("spawn")
    producer_end, consumer_end = ctx.Pipe()
    result_end, result_in = ctx.Pipe()
    procs = [ctx.Process(target=_run, args=(PRODUCER_RANK, setup, producer_end)),
             ctx.Process(target=_consumer, args=(setup, consumer_end, result_in))]
    for proc in procs:
        proc.start()
    ok, total_bytes, path_s, bare_s = result_end.recv()
    for proc in procs:
        proc.join(60)
    where = "cuda:0 -> cuda:1" if args.backend == "nccl" else "cpu -> cpu (gloo)"
    print(f"nccl_check ({args.backend}, {where}): {args.blocks} blocks x {args.layers} layers, "
          f"{total_bytes / 2**20:.1f} MiB per transfer, best of {args.iters}")
    print(f"  correct: {'yes' if ok else 'NO'}")
    print(f"  paged path (gather, send, recv, scatter): {total_bytes / path_s / 1e9:.2f} GB/s "
          f"({path_s * 1e3:.2f} ms)")
    print(f"  bare send/recv of the same bytes:          {total_bytes / bare_s / 1e9:.2f} GB/s "
          f"({bare_s * 1e3:.2f} ms)")
    return 0 if ok else 1


def _consumer(setup: Setup, ctl: Connection, result: Connection) -> None:
    class _Both:
        """The consumer reads the store port from the producer and reports to main."""

        def recv(self) -> int:
            return int(ctl.recv())

        def send(self, value: object) -> None:
            result.send(value)

    _run(CONSUMER_RANK, setup, _Both())  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
