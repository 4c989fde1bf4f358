"""The "grpc" data channel: a pull's chunks as a server stream of BlockChunks (PullBlocks).

  1. The consumer calls PullBlocks(PullRequest); the control plane checks it (control_server.py).
  2. The producer streams one BlockChunk per chunk, its payload gathered from the paged KV
     tensor behind a hand-written protobuf header (chunks.ChunkEncoder: no protobuf re-encode
     of the payload), and ends the stream with its wait for blocks still being computed in the
     trailing metadata "x-disagg-wait-us".
  3. The consumer parses each chunk in place (chunks.decode_chunk) and hands it to its sink.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from kv_transfer.channels.base import (
    ConsumerChannel,
    ControlMethod,
    ProducerChannel,
    PullMethod,
    ServedPull,
    remaining_s,
)
from kv_transfer.chunks import ChunkEncoder, decode_chunk, wait_us
from kv_transfer.control import method_path
from kv_transfer.sink import ChunkSink
from kv_transfer.transport import TransferError
from protos import kv_transfer_pb2 as pb

PULL_METHOD = method_path("PullBlocks")
WAIT_METADATA_KEY = "x-disagg-wait-us"


def _identity(message: bytes) -> bytes:
    return message


class GrpcStreamProducer(ProducerChannel):
    """Serves PullBlocks."""

    def methods(self) -> Sequence[PullMethod | ControlMethod]:
        return [PullMethod("PullBlocks", self._serve, pb.PullRequest.FromString, _identity)]

    def _serve(self, pull: ServedPull) -> Iterator[bytes]:
        encoder = ChunkEncoder(self.cache)
        context = pull.context
        for header, blocks in pull.source.chunks(pull.chunk_bytes, context.is_active):
            if not context.is_active():
                return
            yield encoder.encode(header, blocks)
        context.set_trailing_metadata(((WAIT_METADATA_KEY, str(wait_us(pull.source.waited_s))),))


class GrpcStreamConsumer(ConsumerChannel):
    """Calls PullBlocks, one call per part, on the part's own connection."""

    def receive(self, endpoint: str, request: pb.PullRequest, sink: ChunkSink,
                stream_index: int, deadline: float, should_stop: Callable[[], bool]) -> None:
        # raw bytes: decode_chunk reads them without a copy
        pull_blocks = self.control.stream(endpoint, PULL_METHOD, None, stream_index)
        call = pull_blocks(request, timeout=remaining_s(deadline), metadata=self.control.metadata)
        for message in call:
            if should_stop():
                call.cancel()
                raise TransferError(f"transfer from {endpoint} cancelled: request aborted")
            sink.put(*decode_chunk(message))
        trailing = dict(call.trailing_metadata() or ())
        sink.finish(int(trailing.get(WAIT_METADATA_KEY, 0)) / 1e6)

