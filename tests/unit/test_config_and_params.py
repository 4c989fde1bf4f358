"""Configuration validation and the kv_transfer_params conversions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kv_transfer.config import ConnectorConfig
from kv_transfer.params import (
    TransferParams,
    consumer_request_params,
    is_consumer_request,
    is_producer_request,
    parse_transfer,
    producer_request_params,
    transfer_output_params,
)
from runtime.engine_config import EngineConfig, TransferConfig, core_set
from runtime.engines import omp_threads


def test_transfer_params_round_trip_through_vllm_dicts():
    transfer = TransferParams("10.0.0.1:7000", "abc", (4, 9), 20, 16, 10.0)
    assert parse_transfer(transfer_output_params(transfer)) == transfer
    request = consumer_request_params(transfer)
    assert is_consumer_request(request) and not is_producer_request(request)
    assert parse_transfer(request) == transfer
    assert is_producer_request(producer_request_params())


def test_transfer_params_must_cover_the_tokens():
    with pytest.raises(AssertionError, match="expected 2"):
        TransferParams("h:1", "abc", (4,), 20, 16, 10.0)


def test_connector_config_round_trips_and_refuses_bad_values():
    config = ConnectorConfig(port=1234, auth_token="s" * 20)
    again = ConnectorConfig.from_extra_config(config.to_extra_config())
    assert again == config and again.auth_token.get_secret_value() == "s" * 20
    assert "s" * 20 not in repr(config), "the token must not show in logs"
    with pytest.raises(ValidationError):
        ConnectorConfig(port=1234, auth_token="short")
    with pytest.raises(ValidationError, match="extra"):
        ConnectorConfig.from_extra_config({"auth_token": "s" * 20, "prot": 1})


def test_unknown_choices_fail_with_the_valid_ones_listed():
    with pytest.raises(ValidationError, match="'grpc' or 'tcp'"):
        TransferConfig(data_channel="udp")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="'fail' or 'recompute'"):
        TransferConfig(on_transfer_failure="retry")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="float32"):
        EngineConfig(model="m", dtype="int4")  # type: ignore[arg-type]


def test_each_transfer_config_gets_its_own_token():
    assert TransferConfig().auth_token != TransferConfig().auth_token


def test_engine_cores_take_vllms_syntax_and_bad_ones_are_refused():
    assert core_set("3") == {3}
    assert core_set("0-3") == {0, 1, 2, 3}
    assert core_set("0,2-3") == {0, 2, 3}
    assert core_set("4-5|6-7") == {4, 5}  # the first worker's list
    assert EngineConfig(model="m", cpu_threads_bind="auto").cpu_threads_bind == "auto"
    assert EngineConfig(model="m").executor == "uni"
    for bad in ("", "1-", "a", "0;1"):
        with pytest.raises(ValidationError, match="cpu_threads_bind"):
            EngineConfig(model="m", cpu_threads_bind=bad)


def test_engine_threads_follow_the_setting_then_the_bound_cores():
    # Ray gives a replica OMP_NUM_THREADS = its num_cpus (1 for 0): engine.cpu_threads is
    # how a replica's engine gets another count; None keeps the process's own
    assert omp_threads(EngineConfig(model="m"), None) is None
    assert omp_threads(EngineConfig(model="m", cpu_threads=2), None) == 2
    assert omp_threads(EngineConfig(model="m"), core_set("0-2")) == 3
    assert omp_threads(EngineConfig(model="m", cpu_threads=1), core_set("0-2")) == 1
    # vLLM binds an "mp" worker's threads to the cores itself
    assert omp_threads(EngineConfig(model="m", executor="mp"), core_set("0-2")) is None
    with pytest.raises(ValidationError, match="cpu_threads"):
        EngineConfig(model="m", cpu_threads=0)
