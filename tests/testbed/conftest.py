import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from sgl_slim.demo import train_tokenizer
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def stream(tokenizer):
    from sgl_slim.testbed.data import corpus_stream
    return corpus_stream(tokenizer, "eval", 60_000)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """An untrained tiny testbed model saved as a HF directory (bf16 safetensors)."""
    from sgl_slim.testbed.model import TINY, build_model, save_checkpoint
    model = build_model(TINY, tokenizer, seed=0)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model", record={"plan": "test"})


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from sgl_slim.testbed.model import load_model
    torch.manual_seed(0)
    return load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
