"""The exported text-model backends (OpenVINO, ONNX Runtime int8) behind rlsim.embeddings.TextEncoder."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rlsim.errors import ConfigError

if TYPE_CHECKING:
    from rlsim.embeddings import TextEncoder


def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def torch_threads() -> int:
    import torch

    return max(1, int(torch.get_num_threads()))


class ExportedRunner:
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
            folder = enc.cache_root / "models" / f"{model_slug(enc.model_name)}-{enc.backend}"
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
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": torch_threads()})
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
        so.intra_op_num_threads = torch_threads()
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
