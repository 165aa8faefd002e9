"""Weight-only quantization of the exported decoder (``--onnx-quantize int4|int8``), checked against the
unquantized graph.

Every MatMul with a constant weight (the Q/K/V/O projections, the MLP and the LM head; not the attention
products) becomes onnxruntime's ``MatMulNBits``: round-to-nearest, symmetric, blocks of ``BLOCK_SIZE`` along
the input dimension, ``accuracy_level`` 4 (int8 activations on CPU). The quantized graph replaces
``decoder_model_merged.onnx`` once its next-token predictions have been compared with the unquantized one on
embedded calibration prompts (top-1 agreement and mean KL at each prompt's last position).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .errors import ShortVError

BITS = {"int4": 4, "int8": 8}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
SAMPLES = 16


def quantize_decoder(onnx_dir: Path, scheme: str, checkpoint: Path, external_data: bool) -> dict:
    """Quantize ``onnx_dir``'s decoder in place with ``scheme`` ("int4" or "int8"); return what was done and how
    close the result stays to the unquantized graph."""
    import onnx

    MatMulNBitsQuantizer = _import_quantizer()
    if scheme not in BITS:
        raise ShortVError(f"--onnx-quantize {scheme}: choose one of {', '.join(BITS)}")
    decoder = onnx_dir / "decoder_model_merged.onnx"
    quantized = onnx_dir / f".decoder_model_merged.{scheme}.onnx"
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(decoder)),
        bits=BITS[scheme],
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=ACCURACY_LEVEL,
    )
    _quietly(quantizer.process)
    try:
        quantizer.model.save_model_to_file(str(quantized), use_external_data_format=external_data)
        del quantizer
        report = {
            "scheme": scheme,
            "method": "onnxruntime MatMulNBits, weight-only, round-to-nearest, symmetric",
            "bits": BITS[scheme],
            "block_size": BLOCK_SIZE,
            "accuracy_level": ACCURACY_LEVEL,
            "quantized_matmuls": _op_counts(quantized).get("MatMulNBits", 0),
            "decoder_bytes_before": _graph_bytes(decoder),
            **agreement(onnx_dir, quantized, checkpoint),
        }
    except BaseException:
        for partial in onnx_dir.glob(f"{quantized.name}*"):
            partial.unlink()
        raise
    for old in onnx_dir.glob("decoder_model_merged.onnx*"):
        old.unlink()
    for data in onnx_dir.glob(f"{quantized.name}?*"):  # its external data, named after the final graph file
        _rename_external_data(quantized, data.name, decoder.name + data.name[len(quantized.name) :])
    quantized.rename(decoder)
    report["decoder_bytes_after"] = _graph_bytes(decoder)
    return report


def agreement(onnx_dir: Path, quantized: Path, checkpoint: Path, samples: int = SAMPLES) -> dict:
    """Top-1 agreement and mean KL of the next-token distribution, quantized vs unquantized decoder, at the last
    position of ``samples`` embedded calibration prompts."""
    import onnxruntime as ort

    from .data import load_calibration, prompt_batch
    from .load import load_processor
    from .onnx_runtime import ShortVOnnxModel

    processor = load_processor(checkpoint)
    runner = ShortVOnnxModel.from_pretrained(onnx_dir, io_binding=False)
    quantized_session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    chosen = load_calibration(None).samples[:samples]
    agree, kl = 0, 0.0
    for start in range(0, len(chosen), 8):
        inputs = {k: v.numpy() for k, v in prompt_batch(processor, chosen[start : start + 8]).items()}
        feeds = runner.prefill_inputs(**inputs)
        reference = runner.decoder.run(["logits"], feeds)[0][:, -1].astype(np.float64)
        logits = quantized_session.run(["logits"], feeds)[0][:, -1].astype(np.float64)
        agree += int((reference.argmax(-1) == logits.argmax(-1)).sum())
        log_p, log_q = _log_softmax(logits), _log_softmax(reference)
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
    return {"samples": len(chosen), "top1_agreement_vs_unquantized": agree / len(chosen), "mean_kl": kl / len(chosen)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _graph_bytes(path: Path) -> int:
    """The graph file and its external data file, if any."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))


def _rename_external_data(graph: Path, old: str, new: str) -> None:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    shutil.move(str(graph.parent / old), str(graph.parent / new))
    onnx.save(model, str(graph))


def _import_quantizer():
    """onnxruntime's quantizer module calls logging.basicConfig(level=INFO) on import, which would make every
    library's INFO lines print: import it with the root logger's handlers and level put back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return MatMulNBitsQuantizer


def _quietly(fn):
    """onnxruntime's quantizer logs a line per node at INFO."""
    import logging

    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, logger.level = logger.level, logging.WARNING
    try:
        return fn()
    finally:
        logger.setLevel(level)
