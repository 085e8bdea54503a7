"""MiniLM encoder and its on-disk cache."""

from __future__ import annotations

import numpy as np

from rlsim.embeddings import TextEncoder, item_embeddings, item_text_vectors


def test_encoder_caches_by_text_hash(tmp_path, ml100k):
    enc = TextEncoder(cache_dir=tmp_path)
    texts = ["A heist film.", "A love story.", "A heist film."]
    v = enc.encode(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert np.array_equal(v[0], v[2])
    # Similar texts are closer than unrelated ones: the real model is loaded, not a stand-in.
    a, b, c = enc.encode(["a bank robbery thriller", "a heist crime movie", "a cooking recipe for soup"])
    assert a @ b > a @ c

    fresh = TextEncoder(cache_dir=tmp_path)

    class NoModel:
        def encode(self, *a, **k):
            raise AssertionError("model used although every text is cached")

    fresh._model = NoModel()
    assert np.array_equal(fresh.encode(texts), v)


def test_item_embeddings_align_with_items(cache_root, ml100k):
    enc = TextEncoder(cache_dir=cache_root)
    emb = item_embeddings(ml100k.items, enc)
    assert {k: v.shape for k, v in emb.items()} == {k: (len(ml100k.items), 384) for k in ("genre", "plot", "text")}
    # The similarity-search helper gives the same full-text vectors, from the same cache.
    assert np.array_equal(item_text_vectors(ml100k.items, "all-MiniLM-L6-v2", cache_root), emb["text"])
