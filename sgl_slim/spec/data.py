"""Offline text: the Python standard library's own source, read deterministically.

``stdlib_texts(split)`` splits the library's .py files by a hash of their name, so the target's training text
("train") and the draft's prompts ("draft", "eval") never share a file.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

SPLITS = {"train": range(0, 70), "draft": range(70, 90), "eval": range(90, 100)}


def stdlib_files(split: str) -> list[Path]:
    """Sorted .py files of the stdlib (no tests, no site-packages) whose name hash falls in ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    buckets = SPLITS[split]
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages", "test/", "idlelib/idle_test", "lib2to3/tests")) or "/tests/" in rel:
            continue
        if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 in buckets:
            out.append(path)
    if not out:
        raise FileNotFoundError(f"no stdlib .py files under {root}")
    return out


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers`` tokenizer of a checkpoint (``tokenizer.json``)."""
    from tokenizers import Tokenizer  # noqa: PLC0415 (only needed when text is tokenized)

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json")
    return Tokenizer.from_file(str(path))


def token_stream(model_dir: str | Path, split: str, max_tokens: int) -> torch.Tensor:
    """Concatenated token ids of the split's files, in file order, cut at ``max_tokens`` -> [N] int64."""
    tok = load_tokenizer(model_dir)
    ids: list[int] = []
    files = stdlib_files(split)
    for i in range(0, len(files), 32):          # encode_batch: the same ids, encoded on all cores
        texts = [path.read_text(encoding="utf-8", errors="replace") for path in files[i: i + 32]]
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def sample_windows(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens at seeded random offsets -> [count, length]."""
    if stream.numel() <= length:
        raise ValueError(f"token stream of {stream.numel()} tokens is shorter than a window of {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length, (count,), generator=gen)
    return torch.stack([stream[s: s + length] for s in starts.tolist()])
