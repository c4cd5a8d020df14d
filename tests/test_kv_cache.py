"""The decoders' KV cache (paradec.kv_cache) against transformers' DynamicCache: the same keys,
values and lengths through every operation the decoders and ``generate`` use."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from paradec.config import DecodeConfig
from paradec.decoding import decode_plain, decode_prefix
from paradec.kv_cache import ReservedLayer, reserved_cache
from tests.tiny import tiny_model


def _kv(batch, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, tokens, 8, generator=g),
            torch.randn(batch, 2, tokens, 8, generator=g))


def _same(reserved, dynamic):
    assert reserved.get_seq_length() == dynamic.get_seq_length()
    torch.testing.assert_close(reserved.keys, dynamic.keys, rtol=0, atol=0)
    torch.testing.assert_close(reserved.values, dynamic.values, rtol=0, atol=0)


@pytest.mark.parametrize("capacity", [0, 3, 12, 100])
def test_a_reserved_layer_holds_what_a_dynamic_layer_holds(capacity):
    """Updates of various widths, a crop, a batch repeat, a row selection and a reset, with a
    reserve too small (it grows), exact and larger."""
    reserved, dynamic = ReservedLayer(capacity), DynamicLayer()
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 0
    for seed, width in enumerate([5, 1, 2, 1]):
        k, v = _kv(1, width, seed)
        out_r, out_d = reserved.update(k, v), dynamic.update(k, v)
        torch.testing.assert_close(out_r, out_d, rtol=0, atol=0)
        _same(reserved, dynamic)
    reserved.crop(-2), dynamic.crop(-2)
    _same(reserved, dynamic)
    reserved.batch_repeat_interleave(3), dynamic.batch_repeat_interleave(3)
    _same(reserved, dynamic)
    k, v = _kv(3, 2, 9)
    torch.testing.assert_close(reserved.update(k, v), dynamic.update(k, v), rtol=0, atol=0)
    rows = torch.tensor([2, 0])
    reserved.batch_select_indices(rows), dynamic.batch_select_indices(rows)
    _same(reserved, dynamic)
    reserved.reset(), dynamic.reset()
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 0
    k, v = _kv(2, 4, 10)
    torch.testing.assert_close(reserved.update(k, v), dynamic.update(k, v), rtol=0, atol=0)


def test_within_its_reserve_a_layer_writes_in_place():
    """No step reallocates (nor copies what is cached): the returned keys are views of one
    buffer, the same for every update that fits."""
    layer = ReservedLayer(10)
    layer.update(*_kv(2, 4, 0))
    buffer = layer.keys.data_ptr()
    for seed in range(1, 7):
        keys, values = layer.update(*_kv(2, 1, seed))
        assert keys.data_ptr() == buffer and keys.shape[-2] == 4 + seed
    keys, _ = layer.update(*_kv(2, 1, 7))  # 11 > 10: it grows, and keeps what it held
    assert keys.shape[-2] == 11 and keys.data_ptr() != buffer


def test_bad_reserve_and_crop_are_refused():
    with pytest.raises(ValueError, match="reserve"):
        ReservedLayer(-1)
    layer = ReservedLayer(4)
    layer.update(*_kv(1, 2, 0))
    with pytest.raises(ValueError, match="negative"):
        layer.crop(1)


def test_every_attention_layer_of_a_model_is_reserved():
    model = tiny_model(layers=3)
    cache = reserved_cache(model, 32)
    assert len(cache.layers) == 3
    assert all(isinstance(layer, ReservedLayer) and layer.capacity == 32 for layer in cache.layers)


def test_generate_and_prefix_caching_on_the_reserved_cache_equal_dynamic_cache(monkeypatch):
    """decode_plain (generate with a cache passed in) and decode_prefix (a batch repeat of the
    prefilled context) give the answers a DynamicCache gives."""
    from transformers import DynamicCache

    import paradec.decoding as decoding

    model = tiny_model(vocab=61)
    rows = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 12], [5, 6, 7, 8, 9, 13, 14, 15]]
    cfg = DecodeConfig(max_new_tokens=6, ignore_eos=True)

    def run():
        plain = decode_plain(model, rows, eos_token_id=None, pad_token_id=0, cfg=cfg)
        prefix = decode_prefix(model, rows, eos_token_id=None, pad_token_id=0, cfg=cfg)
        return plain.tokens, prefix.tokens

    made = []

    def spy(model, tokens):
        made.append(reserved_cache(model, tokens))
        return made[-1]

    monkeypatch.setattr(decoding, "reserved_cache", spy)
    reserved = run()
    assert len(made) == 2 and all(c.get_seq_length() > 0 for c in made)  # both decoders used it
    monkeypatch.setattr(decoding, "reserved_cache",
                        lambda model, tokens: DynamicCache(config=model.config))
    assert run() == reserved
    assert reserved[0] == reserved[1]  # prefix caching answers what one row at a time does


def test_the_decoders_reserve_what_they_hold(monkeypatch):
    """Parallel, prefix and generate (plain) decoding never outgrow the reserve they ask for: no
    step reallocates the cache."""
    from paradec.decoding import decode_columnar
    from paradec.layout import Branch, BranchSample

    def refuse(self, needed):
        raise AssertionError(f"the cache grew past its reserve of {self.capacity} tokens")

    monkeypatch.setattr(ReservedLayer, "_grow", refuse)
    model = tiny_model(vocab=61, pair_indices=[2])
    cfg = DecodeConfig(max_new_tokens=6, ignore_eos=True)
    samples = [BranchSample([5, 6, 7, 8], [Branch([9, 10], []), Branch([11], []),
                                           Branch([12, 13, 14], [])]),
               BranchSample([5, 6], [Branch([15], [])])]
    result = decode_columnar(model, samples, eos_token_id=None, cfg=cfg)
    assert all(len(t) == 6 for sample in result.tokens for t in sample)
    rows = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 11], [5, 6, 7, 8, 12, 13, 14]]
    decode_prefix(model, rows, eos_token_id=None, pad_token_id=0, cfg=cfg)
    decode_plain(model, rows, eos_token_id=None, pad_token_id=0, cfg=cfg)
