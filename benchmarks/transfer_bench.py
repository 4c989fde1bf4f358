"""KV block transfer throughput between two processes on loopback, beside two references.

Rows printed (all measured in this run, same payload size):
  disagg gRPC / bulk TCP - our transport: lease check, gather from the producer's paged KV
                           tensors, chunks streamed over gRPC (or over the bulk TCP data channel
                           that gRPC authorizes), scatter into the consumer's paged KV tensors;
                           with 1 or 2 parallel streams per pull.
  bare gRPC stream       - the same message size as bytes over gRPC, nothing else.
  raw TCP socket         - sendall/recv_into of the same bytes on one loopback connection.

    python -m benchmarks.transfer_bench [--total-mib 512] [--layout flash|cpu] ...
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

import grpc
import torch

from kv_transfer.control_server import ControlServer
from kv_transfer.leases import LeaseTable
from kv_transfer.paged_kv import PagedKVCache
from kv_transfer.puller import KVPuller

BARE_METHOD = "/bench.Bare/Stream"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Shape:
    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    num_blocks: int

    def layer_shape(self) -> tuple[int, ...]:
        if self.layout == "cpu":  # vLLM CPU backend
            return (self.num_blocks, self.num_kv_heads, self.block_size, 2 * self.head_dim)
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def make_caches(self, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            f"model.layers.{i}.self_attn.attn": torch.randn(
                self.layer_shape(), generator=gen
            ).to(DTYPES[self.dtype])
            for i in range(self.num_layers)
        }

    @property
    def block_bytes(self) -> int:
        elem = torch.tensor([], dtype=DTYPES[self.dtype]).element_size()
        return 2 * self.num_kv_heads * self.block_size * self.head_dim * elem * self.num_layers


MAX_MESSAGE_BYTES = 16 << 20


def _producer(shape: Shape, token: str, ctl: Connection) -> None:
    caches = shape.make_caches(seed=1)
    leases = LeaseTable()
    server = ControlServer(PagedKVCache(caches, shape.num_blocks), leases, bind_host="127.0.0.1",
                           port=0, auth_token=token, max_chunk_bytes=MAX_MESSAGE_BYTES,
                           handle_wait_s=1.0)
    ctl.send(server.start())
    while (message := ctl.recv()) is not None:
        handle, block_ids = message
        leases.grant(handle, f"bench-{handle}", tuple(block_ids), lease_s=300)
        ctl.send("granted")
    server.stop(0)


def _bare_grpc_server(ctl: Connection) -> None:
    from concurrent.futures import ThreadPoolExecutor

    payloads: dict[int, bytes] = {}

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        size, count = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:], "little")
        payload = payloads.setdefault(size, secrets.token_bytes(size))
        for _ in range(count):
            yield payload

    server = grpc.server(ThreadPoolExecutor(4),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES + 4096)])
    handler = grpc.method_handlers_generic_handler("bench.Bare", {
        "Stream": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=None, response_serializer=None)
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ctl.send(f"127.0.0.1:{port}")
    ctl.recv()
    server.stop(0)


def _tcp_server(ctl: Connection) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ctl.send(listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        header = conn.recv(16)
        size, count = int.from_bytes(header[:8], "little"), int.from_bytes(header[8:], "little")
        if count == 0:
            conn.close()
            break
        payload = memoryview(secrets.token_bytes(size))
        for _ in range(count):
            conn.sendall(payload)
        conn.close()
    listener.close()


class Bench:
    """The three servers in their own processes, measured in turn on every repeat."""

    def __init__(self, shape: Shape) -> None:
        ctx = mp.get_context("spawn")
        self.shape = shape
        self.token = secrets.token_urlsafe(32)
        self._ctls = []
        self._procs = []
        for target, args in ((_producer, (shape, self.token)), (_bare_grpc_server, ()),
                             (_tcp_server, ())):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(*args, child), daemon=True)
            proc.start()
            self._ctls.append(parent)
            self._procs.append(proc)
        self._kv_endpoint, self._bare_endpoint, self._tcp_port = (c.recv() for c in self._ctls)
        self._bare_channel = grpc.insecure_channel(
            self._bare_endpoint,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + 4096)])

    def close(self) -> None:
        self._bare_channel.close()
        self._ctls[0].send(None)
        self._ctls[1].send(None)
        with socket.create_connection(("127.0.0.1", self._tcp_port)) as conn:
            conn.sendall(bytes(16))
        for proc in self._procs:
            proc.join(10)

    def disagg(self, client: KVPuller, num_blocks: int) -> float:
        handle = secrets.token_urlsafe(24)
        remote = list(range(num_blocks))
        local = list(range(self.shape.num_blocks - 1, self.shape.num_blocks - 1 - num_blocks, -1))
        self._ctls[0].send((handle, remote))
        self._ctls[0].recv()
        start = time.perf_counter()
        result = client.pull(self._kv_endpoint, handle, remote, local, timeout_s=120)
        elapsed = time.perf_counter() - start
        client.release(self._kv_endpoint, handle, timeout_s=5)
        return result.transfer_bytes / elapsed / 1e9

    def bare_grpc(self, message_bytes: int, num_messages: int) -> float:
        stream = self._bare_channel.unary_stream(BARE_METHOD, request_serializer=None,
                                                 response_deserializer=None)
        request = message_bytes.to_bytes(8, "little") + num_messages.to_bytes(8, "little")
        start = time.perf_counter()
        total = sum(len(m) for m in stream(request, timeout=120))
        return total / (time.perf_counter() - start) / 1e9

    def raw_tcp(self, message_bytes: int, num_messages: int) -> float:
        view = memoryview(bytearray(message_bytes))
        with socket.create_connection(("127.0.0.1", self._tcp_port)) as conn:
            start = time.perf_counter()
            conn.sendall(message_bytes.to_bytes(8, "little") + num_messages.to_bytes(8, "little"))
            total = 0
            while (n := conn.recv_into(view)) > 0:
                total += n
            return total / (time.perf_counter() - start) / 1e9


def _fmt(rates: list[float]) -> str:
    return f"{statistics.median(rates):6.3f} GB/s (min {min(rates):.3f}, max {max(rates):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-mib", type=int, default=512,
                        help="KV bytes moved per transfer (default 512 MiB)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per row, interleaved across rows (median printed)")
    parser.add_argument("--layout", choices=["flash", "cpu"], default="flash",
                        help="paged layout: flash-attention [2, blocks, ...] or vLLM CPU "
                             "[blocks, heads, block_size, 2*head_dim] (default flash)")
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[256, 1024],
                        help="chunk (and reference message) sizes in KiB (default 256 1024)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2],
                        help="parallel streams per pull for our transport (default 1 2)")
    parser.add_argument("--no-bulk", action="store_true",
                        help="skip our bulk TCP data channel rows")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.total_mib < 1 or any(c < 4 for c in args.chunk_kib):
        parser.error("--repeats and --total-mib must be >= 1, --chunk-kib >= 4")
    if any(n < 1 for n in args.streams):
        parser.error("--streams must be >= 1")

    probe = Shape(args.layout, args.num_layers, args.num_kv_heads, args.head_dim,
                  args.block_size, args.dtype, num_blocks=1)
    num_transfer_blocks = max(1, (args.total_mib << 20) // probe.block_bytes)
    shape = Shape(args.layout, args.num_layers, args.num_kv_heads, args.head_dim,
                  args.block_size, args.dtype, num_blocks=2 * num_transfer_blocks + 8)
    total_bytes = num_transfer_blocks * shape.block_bytes
    print(f"KV shape: {args.num_layers} layers x {args.num_kv_heads} kv heads x head_dim "
          f"{args.head_dim}, block {args.block_size} tokens, {args.dtype}, {args.layout} layout "
          f"-> {shape.block_bytes / 1024:.0f} KiB per block (all layers)")
    print(f"per transfer: {num_transfer_blocks} blocks = {total_bytes / (1 << 20):.0f} MiB "
          f"({num_transfer_blocks * args.block_size} tokens); {args.repeats} repeats", flush=True)
    bench = Bench(shape)
    consumer = PagedKVCache(shape.make_caches(seed=2), shape.num_blocks)
    try:
        for chunk_kib in args.chunk_kib:
            chunk_bytes = chunk_kib << 10
            num_messages = max(1, total_bytes // chunk_bytes)
            modes = [False] if args.no_bulk else [False, True]
            clients = {
                (bulk, n): KVPuller(consumer, "tcp" if bulk else "grpc", auth_token=bench.token,
                                    max_chunk_bytes=chunk_bytes, num_streams=n)
                for bulk in modes for n in args.streams
            }
            labels = {key: f"disagg {'bulk TCP' if key[0] else 'gRPC'}, {key[1]} stream"
                      + ("s" if key[1] > 1 else " ") for key in clients}
            rows: dict[str, list[float]] = {labels[key]: [] for key in clients}
            rows.update(bare=[], tcp=[])
            for rep in range(args.repeats + 1):  # repeat 0 warms connections up, untimed
                rates = [bench.disagg(client, num_transfer_blocks) for client in clients.values()]
                rates += [bench.bare_grpc(chunk_bytes, num_messages),
                          bench.raw_tcp(chunk_bytes, num_messages)]
                if rep:
                    for key, rate in zip(rows, rates, strict=True):
                        rows[key].append(rate)
                print(f"  chunk {chunk_kib} KiB: repeat {rep}/{args.repeats} done", flush=True)
            for client in clients.values():
                client.close()
            bare, tcp = statistics.median(rows["bare"]), statistics.median(rows["tcp"])
            print(f"\nchunk / message size {chunk_kib} KiB")
            for label in labels.values():
                ours = statistics.median(rows[label])
                print(f"  {label:<28}: {_fmt(rows[label])}  = {ours / bare:.2f} x bare gRPC, "
                      f"{ours / tcp:.2f} x raw TCP")
            print(f"  {'bare gRPC stream':<28}: {_fmt(rows['bare'])}")
            print(f"  {'raw TCP socket':<28}: {_fmt(rows['tcp'])}\n", flush=True)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
