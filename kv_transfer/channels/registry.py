"""The data channels by name: what `ConnectorConfig.channel` (and a producer's served channels)
choose from. Each entry pairs a channel's producer side with its consumer side."""

from __future__ import annotations

from dataclasses import dataclass

from kv_transfer.channels.base import ConsumerChannel, ProducerChannel
from kv_transfer.channels.bulk_tcp import BulkTcpConsumer, BulkTcpProducer
from kv_transfer.channels.collective_consumer import CollectiveConsumer
from kv_transfer.channels.collective_producer import CollectiveProducer
from kv_transfer.channels.grpc_stream import GrpcStreamConsumer, GrpcStreamProducer
from kv_transfer.kinds import ChannelName


@dataclass(frozen=True)
class ChannelKind:
    producer: type[ProducerChannel]
    consumer: type[ConsumerChannel]


CHANNELS: dict[ChannelName, ChannelKind] = {
    "grpc": ChannelKind(GrpcStreamProducer, GrpcStreamConsumer),
    "tcp": ChannelKind(BulkTcpProducer, BulkTcpConsumer),
    "nccl": ChannelKind(CollectiveProducer, CollectiveConsumer),
}
