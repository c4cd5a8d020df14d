"""Shared test fixtures. Tests run offline (no Hub) and build their own data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Architecturally, the school has a Catholic "
    "character. Atop the Main Building's gold dome is a golden statue of the Virgin Mary.",
    "Q: What is the color of Kelo?\nA: red\nQ: Who was the Norse leader?\nA: Rollo",
    "The color of Kelo is red. The fruit of Kelo is pear. The city of Vadu is Paris.",
    "Normandy is a region in France. The Normans gave their name to Normandy in the 10th and "
    "11th centuries. Denmark, Iceland and Norway. 1,234 people; 56.7% of them (in 2001).",
] * 20


def _train_tokenizer(texts, vocab_size):
    try:
        from paradec.models import train_tokenizer
    except ImportError:  # fallback: a tiny byte-level BPE straight from `tokenizers`
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        def train_tokenizer(texts, vocab_size):
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=False)
            tok.train_from_iterator(texts, trainer)
            return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                           pad_token="<|endoftext|>")
    return train_tokenizer(texts, vocab_size)


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer (eos = pad = <|endoftext|>), trained on a few sentences."""
    return _train_tokenizer(TOKENIZER_CORPUS, 400)
