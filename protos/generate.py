"""Regenerate the Python stubs for protos/*.proto (run from anywhere: python -m protos.generate)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# proto -> whether it gets gRPC stubs (*_pb2_grpc.py). The KVTransfer service's handlers are
# registered by hand (kv_transfer/control_server.py, kv_transfer/channels/): no stubs for it.
PROTO_FILES = {"protos/kv_transfer.proto": False, "protos/inference.proto": True}


def generate(out_dir: Path = ROOT) -> None:
    """Write *_pb2.py and *_pb2.pyi for every proto under out_dir/protos, and *_pb2_grpc.py for
    those whose service has generated stubs."""
    from grpc_tools import protoc

    for proto, with_grpc in PROTO_FILES.items():
        args = [
            "protoc",
            f"-I{ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            *([f"--grpc_python_out={out_dir}"] if with_grpc else []),
            str(ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
