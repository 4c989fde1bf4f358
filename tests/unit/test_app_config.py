"""The deployment YAML: shipped configs load, pools must agree, mistakes name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.app_config import AppConfig, PoolConfig

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
