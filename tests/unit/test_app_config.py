"""The deployment YAML: shipped configs load, pools must agree, mistakes name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from kv_transfer.config import ConnectorConfig, TransferSettings
from runtime.app_config import AppConfig, PoolConfig
from runtime.engine_config import TransferConfig
from runtime.engines import connector_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["tiny.yaml", "gpu-cluster.yaml"])
def test_shipped_configs_load(name):
    config = AppConfig.from_yaml(DEPLOY / name)
    assert config.prefill_engine.block_size == config.decode_engine.block_size
    assert "~" not in config.engine.model


def test_pool_overrides_apply_per_pool():
    config = AppConfig.model_validate({
        "engine": {"model": "m"}, "decode": {"engine": {"max_num_seqs": 8}}})
    assert config.decode_engine.max_num_seqs == 8 and config.prefill_engine.max_num_seqs == 64


@pytest.mark.parametrize("field", [("dtype", "bfloat16"), ("block_size", 16), ("model", "x")])
def test_pools_must_agree_on_what_the_kv_blocks_depend_on(field):
    name, value = field
    with pytest.raises(ValidationError, match=f"same {name}"):
        AppConfig.model_validate({"engine": {"model": "m"}, "decode": {"engine": {name: value}}})


def test_typos_are_refused_by_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("engine: {model: m}\nprefil: {replicas: 2}\n")
    with pytest.raises(ValidationError, match="prefil"):
        AppConfig.from_yaml(path)
    path.write_text("engine: {model: m}\ndecode: {engine: {blok_size: 16}}\n")
    with pytest.raises(ValidationError, match="blok_size"):
        AppConfig.from_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        AppConfig.from_yaml(path)


def test_command_line_api_key_overrides_the_config():
    from runtime.serve_cli import with_api_key

    config = AppConfig.model_validate({"engine": {"model": "m"}})
    keyed = with_api_key(config, "sk-123")
    assert keyed.server.api_key is not None
    assert keyed.server.api_key.get_secret_value() == "sk-123"
    assert keyed.transfer.auth_token == config.transfer.auth_token
    assert with_api_key(config, None) is config


def test_pool_cores_are_dealt_out_by_replica_rank():
    pool = PoolConfig(replicas=3, cpu_cores=["0", "1"])
    assert [pool.cores_for(rank) for rank in range(3)] == ["0", "1", "0"]
    assert PoolConfig().cores_for(0) is None


def test_serving_mode_is_validated_with_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="disaggregated.*colocated"):
        AppConfig.model_validate({"engine": {"model": "m"}, "serving": "hybrid"})


# Every setting of the engine's KV connector, as the app YAML sets it. A ConnectorConfig field
# missing here has no way in from the YAML: the test below fails until it gets one.
YAML_TRANSFER = """
transfer:
  transport: nccl
  gloo_test_mode: true
  bind_host: 0.0.0.0
  advertise_host: 10.1.2.3
  port: 7100
  auth_token: yaml-token-0123456789
  lease_s: 7.5
  pull_timeout_s: 12.0
  max_chunk_bytes: 8192
  handle_wait_s: 0.5
  num_pull_threads: 3
  data_channel: grpc
  num_streams: 3
  group_timeout_s: 4.0
  overlap: true
  max_prefetch_bytes: 1234
"""
CONNECTOR_FROM_YAML = {
    "transport": "nccl", "collective_backend": "gloo", "bind_host": "0.0.0.0",
    "advertise_host": "10.1.2.3", "port": 7100, "auth_token": "yaml-token-0123456789",
    "lease_s": 7.5, "pull_timeout_s": 12.0, "max_chunk_bytes": 8192, "handle_wait_s": 0.5,
    "num_pull_threads": 3, "data_channel": "grpc", "num_streams": 3, "group_timeout_s": 4.0,
    "overlap": True, "max_prefetch_bytes": 1234,
}


def test_every_connector_setting_is_reachable_from_the_app_yaml(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text("engine: {model: m}\n" + YAML_TRANSFER)
    connector = connector_config(AppConfig.from_yaml(path).transfer, "prefill")
    for name, field in ConnectorConfig.model_fields.items():
        assert name in CONNECTOR_FROM_YAML, f"ConnectorConfig.{name} cannot be set from YAML"
        value = getattr(connector, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        assert value == CONNECTOR_FROM_YAML[name] != field.default, name


def test_transfer_settings_are_defined_once():
    shared = set(TransferSettings.model_fields)
    assert shared <= set(TransferConfig.model_fields) and shared <= set(
        ConnectorConfig.model_fields)
    for name in shared:  # same definition (type, default, bounds) on both sides
        assert repr(TransferConfig.model_fields[name]) == repr(
            ConnectorConfig.model_fields[name]), name


def test_serve_runs_lean_unless_the_environment_says_otherwise(monkeypatch):
    """Serve's controller loop and metrics export are slowed for every replica (the env of
    their runtime_env); a value from the environment wins."""
    from runtime.app_config import AppConfig
    from runtime.serve_cli import LEAN_SERVE_ENV, serve_env

    config = AppConfig.model_validate({"engine": {"model": "m"}})
    monkeypatch.delenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", raising=False)
    env = serve_env(config)
    assert all(env[name] == value for name, value in LEAN_SERVE_ENV.items())
    assert float(env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]) > 0.1  # Serve's default
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.2")
    assert serve_env(config)["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.2"
