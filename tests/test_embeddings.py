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


# ---------------------------------------------------------------- backends, cache keys, one pass per text

import pytest  # noqa: E402

from rlsim.embeddings import BACKENDS, resolve_backend, split_model_name  # noqa: E402
from rlsim.errors import ConfigError  # noqa: E402


class CountingModel:
    """A stand-in sentence-transformers model: records every batch, returns hash-seeded vectors."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts, **kw):
        self.calls.append(list(texts))
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_each_distinct_text_is_encoded_once(tmp_path, ml100k):
    enc = TextEncoder(cache_dir=tmp_path, backend="torch")
    enc._model = CountingModel()
    emb = item_embeddings(ml100k.items, enc)
    seen = [t for call in enc._model.calls for t in call]
    assert len(seen) == len(set(seen))  # no text twice
    from rlsim.data.text import item_texts

    t = item_texts(ml100k.items)
    distinct = set(t.genre_text) | set(t.plot_text) | set(t.text)
    assert set(seen) == distinct and enc.encoded == len(distinct)
    assert len(distinct) < 3 * len(ml100k.items)  # genre strings are shared by many items
    assert {k: v.shape[0] for k, v in emb.items()} == {k: len(ml100k.items) for k in ("genre", "plot", "text")}
    # Identical texts get identical rows.
    g = t["genre_text"].to_numpy()
    same = np.flatnonzero(g == g[0])
    assert len(same) > 1 and np.allclose(emb["genre"][same], emb["genre"][same[0]])
    # A second call encodes nothing.
    enc._model.calls.clear()
    item_embeddings(ml100k.items, enc)
    assert enc._model.calls == []


def test_backend_is_part_of_the_cache_key(tmp_path):
    files = {b: TextEncoder(cache_dir=tmp_path, backend=b).cache_file.name for b in BACKENDS if b != "auto"}
    assert len(set(files.values())) == len(files)
    # The float32 reference keeps the historical file name, so existing caches stay valid.
    assert files["torch"] == "all-MiniLM-L6-v2.parquet"
    assert TextEncoder("all-MiniLM-L6-v2@onnx-int8", tmp_path).cache_file.name == files["onnx-int8"]
    assert TextEncoder(cache_dir=tmp_path, backend="torch", max_seq_length=128).cache_file.name != files["torch"]
    assert resolve_backend("auto") in ("torch", "torch-bf16", "openvino")
    assert split_model_name("m@torch") == ("m", "torch") and split_model_name("m") == ("m", None)
    with pytest.raises(ConfigError, match="unknown text backend"):
        TextEncoder("all-MiniLM-L6-v2@gpu9")


TEXTS = ["Toy Story (1995). Genres: Animation, Children's, Comedy. A cowboy doll is threatened by a new toy.",
         "Genres: Drama, War", "Heat (1995). A group of professional bank robbers feel the heat from the police.",
         "Casablanca (1942)", "A cooking recipe for tomato soup."]


def _agreement(backend: str, tmp_path) -> float:
    ref = TextEncoder(backend="torch").encode(TEXTS)
    fast = TextEncoder(cache_dir=tmp_path, backend=backend).encode(TEXTS)
    assert fast.shape == ref.shape and fast.dtype == np.float32
    assert np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-4)
    return float((fast * ref).sum(1).min())


def test_bf16_agrees_with_float32(tmp_path):
    assert _agreement("torch-bf16", tmp_path) > 0.999


def test_openvino_agrees_with_float32(tmp_path):
    pytest.importorskip("openvino")
    assert _agreement("openvino", tmp_path) > 0.999
    # The compiled model is kept in the cache and reused.
    assert (tmp_path / "models" / "all-MiniLM-L6-v2-openvino" / "model.xml").is_file()


def test_onnx_int8_agrees_with_float32(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    assert _agreement("onnx-int8", tmp_path) > 0.97


def test_missing_texts_are_encoded_in_a_child_process(tmp_path):
    """The model runs in a child (its ~0.5 GB leaves with it): the same vectors as in this process,
    chunk by chunk, and this process never loads it."""
    texts = ["A heist film.", "A love story in Paris.", "Space pirates.", "A heist film.", "Dinosaurs escape."]
    child = TextEncoder(cache_dir=tmp_path / "child", backend="torch", chunk_size=2)
    here = TextEncoder(cache_dir=tmp_path / "here", backend="torch", chunk_size=2, in_child=False)
    v = child.encode(texts)
    assert child._model is None and child.encoded == 4
    assert np.array_equal(v, here.encode(texts)) and here._model is not None
    # The child's vectors went to the cache like any others.
    assert np.array_equal(TextEncoder(cache_dir=tmp_path / "child", backend="torch").encode(texts), v)
