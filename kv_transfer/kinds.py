"""The transfer layer's enumerations (no imports, so torch-only scripts can use them)."""

from __future__ import annotations

from typing import Literal

DataChannel = Literal["grpc", "tcp"]  # config: the payload path of transport "grpc"
TransportKind = Literal["grpc", "nccl"]
CollectiveBackend = Literal["nccl", "gloo"]
ChannelName = Literal["grpc", "tcp", "nccl"]  # the data channels (channels/registry.py)
