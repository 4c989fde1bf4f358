"""The generated tiny model and the command line."""

from __future__ import annotations

import json

import pytest

from protos import generate
from runtime.cli import build_parser, main
from runtime.tiny_model import is_tiny_model, make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_is_deterministic(model_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again")
    weights = "model.safetensors"
    assert (again / weights).read_bytes() == (model_dir / weights).read_bytes()
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert (other / weights).read_bytes() != (model_dir / weights).read_bytes()


def test_tiny_model_is_a_long_context_llama_with_byte_tokenizer(model_dir):
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["max_position_embeddings"] >= 16384
    assert config["initializer_range"] >= 0.1
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "héllo, world"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode()) and tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "hi" in chat and chat.endswith("<|assistant|>")
    assert is_tiny_model(model_dir)


def test_generated_stubs_match_the_protos(tmp_path):
    (tmp_path / "protos").mkdir()
    generate.generate(tmp_path)
    stubs = [f"{name}{suffix}" for name in ("kv_transfer", "inference")
             for suffix in ("_pb2.py", "_pb2.pyi")] + ["inference_pb2_grpc.py"]
    assert not (tmp_path / "protos" / "kv_transfer_pb2_grpc.py").exists(), (
        "the KVTransfer service's handlers are registered by hand: it needs no gRPC stubs")
    for stub in stubs:
        committed = (generate.ROOT / "protos" / stub).read_text()
        assert (tmp_path / "protos" / stub).read_text() == committed, (
            f"protos/{stub} is stale: run python -m protos.generate"
        )


def test_cli_makes_a_tiny_model(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 0
    assert is_tiny_model(tmp_path / "m")
    assert "written" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--max-tokens", "0"])
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_demo_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nothing")]) == 2
    assert "no Hugging Face checkpoint" in capsys.readouterr().err
