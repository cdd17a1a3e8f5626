import io
import tarfile

from sgl_slim.testbed import pipeline


def test_pack_splits_into_parts_that_concatenate_to_the_checkpoint(tmp_path, monkeypatch):
    src = tmp_path / "model"
    src.mkdir()
    payload = bytes(range(256)) * 400                         # 100 KiB
    (src / "model.safetensors").write_bytes(payload)
    (src / "config.json").write_text("{}")
    (tmp_path / "train_log.jsonl").write_text('{"loss": 1}\n')
    monkeypatch.setattr(pipeline, "PART_BYTES", 30_000)
    out = tmp_path / "out"
    out.mkdir()
    parts = pipeline.pack(src, [tmp_path / "train_log.jsonl", tmp_path / "missing.png"], out / "ckpt")
    assert len(parts) >= 4 and all(p.stat().st_size <= 30_000 for p in parts)
    assert [p.name for p in parts] == sorted(p.name for p in parts)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        assert tar.extractfile("model/model.safetensors").read() == payload
        assert sorted(tar.getnames()) == ["model", "model/config.json", "model/model.safetensors", "train_log.jsonl"]
