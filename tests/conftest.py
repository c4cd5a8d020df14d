"""Shared test fixtures. Tests run offline (no Hub) and build their own data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gzip  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from paradec.models import train_tokenizer  # noqa: E402

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Architecturally, the school has a Catholic "
    "character. Atop the Main Building's gold dome is a golden statue of the Virgin Mary.",
    "Q: What is the color of Kelo?\nA: red\nQ: Who was the Norse leader?\nA: Rollo",
    "The color of Kelo is red. The fruit of Kelo is pear. The city of Vadu is Paris.",
    "Normandy is a region in France. The Normans gave their name to Normandy in the 10th and "
    "11th centuries. Denmark, Iceland and Norway. 1,234 people; 56.7% of them (in 2001).",
] * 20


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on a machine without a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer (eos = pad = <|endoftext|>), trained on a few sentences."""
    return train_tokenizer(TOKENIZER_CORPUS, 400)


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (gzipped when the name ends in .gz); returns the path."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path
