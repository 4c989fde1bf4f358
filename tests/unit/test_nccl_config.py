"""`transfer.transport: nccl` is validated when the config is parsed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runtime import engine_config
from runtime.engine_config import TransferConfig
from runtime.engines import connector_config


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_config, "_has_cuda", lambda: False)


def test_nccl_without_cuda_is_refused_with_the_way_out(no_cuda):
    with pytest.raises(ValidationError, match="needs CUDA GPUs.*gloo_test_mode: true"):
        TransferConfig.model_validate({"transport": "nccl"})


def test_nccl_in_gloo_test_mode_runs_on_gloo(no_cuda):
    config = TransferConfig.model_validate({"transport": "nccl", "gloo_test_mode": True})
    assert config.collective_backend == "gloo"
    connector = connector_config(config, "decode", 0)
    assert (connector.transport, connector.collective_backend) == ("nccl", "gloo")


def test_nccl_with_cuda_uses_the_nccl_backend(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(engine_config, "_has_cuda", lambda: True)
    config = TransferConfig(transport="nccl")
    assert connector_config(config, "prefill", 7000).collective_backend == "nccl"


def test_gloo_test_mode_without_nccl_and_unknown_transports_are_refused():
    with pytest.raises(ValidationError, match="applies to transport 'nccl' only"):
        TransferConfig(gloo_test_mode=True)
    with pytest.raises(ValidationError, match="'grpc' or 'nccl'"):
        TransferConfig.model_validate({"transport": "rdma"})
