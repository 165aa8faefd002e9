"""ONNX export and the ONNX Runtime runner against the PyTorch ShortV model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import batch, image, processor_for, tiny_dir
from transformers import AutoProcessor

from shortv_export.cli import main
from shortv_export.errors import ShortVError
from shortv_export.models import load_shortv
from shortv_export.onnx_runtime import ShortVOnnxModel, text_index
from shortv_export.onnx_validate import cache_diff, torch_reference, validate_export

LAYERS = 3  # the exported tiny models: each decoder layer costs the export about 4 s
FROZEN = [2, 0]  # the first and the last layer, a dense one between (Qwen2's sliding layers: 2 on; K = 1 below)
_DIRS = {}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(checkpoint folder with onnx/, in-process ShortV model) per kind, exported once per session (per xdist
    worker: a module-scoped fixture would be rebuilt each time the worker comes back to this file)."""

    @cache
    def make(kind: str, dtype: str = "fp32", text: str = "llama", prune: str | None = None):
        """Exported by the CLI (``--onnx``), as a user exports; its output is kept for test_cli_exports_and_answers.
        ``prune``: "fastv" (``--fastv 1:0.5``) or "vtw" (``--vtw 1``)."""
        out = tmp_path_factory.mktemp(f"onnx-{kind}-{text}-{dtype}-{prune}") / "ckpt"
        source = tiny_dir(kind, num_layers=LAYERS, text=text)
        args = [str(source), "--layers", ",".join(map(str, FROZEN)), "--onnx", "--onnx-dtype", dtype, "--out", str(out)]
        result = CliRunner().invoke(main, [*args, *PRUNE_ARGS.get(prune, []), "--no-verify"])
        assert result.exit_code == 0, result.output
        spec = json.loads((out / "onnx" / "shortv_onnx.json").read_text())
        report = SimpleNamespace(validation=spec["validation"], cli_output=result.output)
        model = load_shortv(source, FROZEN, PRUNE.get(prune), attn_implementation="sdpa").eval()
        return out, model, report

    # one cache key however a test names the defaults: exported("llava") is exported("llava", text="llama")
    return lambda kind, dtype="fp32", text="llama", prune=None: make(kind, dtype, text, prune)


K = 1  # the pruned layers: a dense one, then a frozen one; ranked by a frozen layer's attention
PRUNE_ARGS = {"fastv": ["--fastv", f"{K}:0.5"], "vtw": ["--vtw", str(K)]}
PRUNE = {"fastv": {"method": "fastv", "layer": K, "ratio": 0.5}, "vtw": {"method": "vtw", "layer": K}}


def _rows(kind):
    if kind in ("qwen2_vl", "qwen2_5_vl"):  # native resolution: three grids, two images in the first row
        return [
            ("what is in the picture on the left side", [image(30, 30, 1), image(60, 25, 3)]),
            ("colour?", [image(40, 20, 2)]),
        ]
    if kind in ("idefics3", "smolvlm"):  # split into tiles plus a global view; two images in the first row
        return [
            ("what is in the picture on the left side", [image(30, 30, 1), image(60, 25, 3)]),
            ("colour?", [image(40, 20, 2)]),
        ]
    if kind == "llava_next":  # non-square, different sizes: different image-token counts per row
        return [("what is in the picture on the left side", [image(50, 23, 1)]), ("colour?", [image(19, 44, 2)])]
    return [("what is in the picture on the left side", [image(30, 30, 1)]), ("colour?", [image(40, 20, 2)])]


# Llama; Mistral (every layer slides: under LLaVA-NeXT's anyres tiles) and Qwen2 (layers 2+ slide) with windows
# shorter than the prompts
MODELS = [("llava", "llama"), ("llava_next", "mistral_sliding"), ("llava", "qwen2_sliding")]
MODELS += [("idefics3", "llama"), ("smolvlm", "llama")]  # image tiles and their pixel masks through the vision graph
MODELS += [("qwen2_vl", "qwen2")]  # vision masks from the runner, M-RoPE position ids
# Qwen2.5-VL's graphs (its windowed vision tower, the M-RoPE decoder) are exported and checked with FastV in the
# decoder (PRUNED below: every present against PyTorch, the export's logits validation, 20 greedy tokens)
model_params = pytest.mark.parametrize("kind,text", MODELS, ids=[f"{k}-{t}" for k, t in MODELS])


@model_params
def test_prefill_and_kv_cache_match_pytorch(exported, kind, text):
    out, model, report = exported(kind, text=text)
    processor = processor_for(out)
    inputs = batch(processor, _rows(kind))
    runner = ShortVOnnxModel.from_pretrained(out, io_binding=False)
    ref = torch_reference(model, inputs, steps=0)
    logits, hidden, cache = runner.decode(runner.prefill_inputs(**{k: v.numpy() for k, v in inputs.items()}))
    valid = inputs["attention_mask"].numpy().astype(bool)
    scale = np.abs(ref["logits"]).max()
    assert np.abs(logits - ref["logits"]).max() <= 1e-4 * scale
    assert np.abs(hidden - ref["hidden"])[valid].max() <= 1e-4 * np.abs(ref["hidden"]).max()
    for name in (n for n in ref if n.startswith("present.")):  # frozen layers cached every row's K/V too
        mine = cache[name.replace("present", "past_key_values")]
        assert mine.shape == ref[name].shape  # padding positions are never attended: compared where valid
        assert cache_diff(mine, ref[name], valid) <= 1e-4 * np.abs(ref[name]).max()
    visual = inputs["input_ids"].numpy() == model.config.image_token_id
    if kind == "llava_next":
        assert len(set(visual.sum(1))) == 2  # the rows really differ in image tokens
    # The export's own validation ran (prefill, KV cache, decode steps), passed, and is recorded in the spec.
    v = report.validation
    assert v["decode_steps"] == 4 and v["greedy_tokens_agree"]
    assert max(v["max_abs_logits_diff"], v["max_abs_decode_logits_diff"]) <= v["tolerance"]
    assert v["max_abs_present_diff"] <= v["present_tolerance"]
    assert json.loads((out / "onnx" / "shortv_onnx.json").read_text())["validation"] == v


@model_params
def test_greedy_generation_matches_pytorch(exported, kind, text):
    out, model, _ = exported(kind, text=text)
    processor = processor_for(out)
    inputs = batch(processor, _rows(kind))
    assert (inputs["attention_mask"] == 0).any()  # a padded batch
    runner = ShortVOnnxModel.from_pretrained(out, provider="cpu")
    # No early stop: every row decodes its 20 tokens in both.
    expected = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None, min_new_tokens=20)
    got = runner.generate(**{k: v.numpy() for k, v in inputs.items()}, max_new_tokens=20, eos_token_id=[])
    assert got.shape == tuple(expected.shape) == (2, inputs["input_ids"].shape[1] + 20)
    np.testing.assert_array_equal(got, expected.numpy())


def test_greedy_stops_at_eos_like_hf(exported):
    out, model, _ = exported("llava")
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = batch(processor, _rows("llava"))
    runner = ShortVOnnxModel.from_pretrained(out)
    free = runner.generate(**{k: v.numpy() for k, v in inputs.items()}, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, inputs["input_ids"].shape[1] + 2])  # row 0's third new token plays EOS
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    got = runner.generate(**arrays, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(got, expected.numpy())


def _scope(node) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return eval(prop.value)[-2]  # the module path of the Linear, e.g. 'lm.layers.4.mlp.up_proj'
    return ""


def test_frozen_layers_gather_text_rows_in_the_graph(exported, tmp_path):
    """Run the exported decoder with every projection MatMul's activation exposed: in frozen layers Q, O and
    the MLP see the text rows only, K and V all rows; dense layers see all rows everywhere."""
    out, model, _ = exported("llava")
    graph_model = onnx.load(out / "onnx" / "decoder_model_merged.onnx")
    probes = {}
    for node in graph_model.graph.node:
        scope = _scope(node)
        if node.op_type == "MatMul" and ".layers." in scope and scope.endswith("_proj"):
            probes[scope] = node.input[0]
            graph_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
    assert len(probes) == 7 * LAYERS
    onnx.save(graph_model, tmp_path / "probe.onnx")

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = batch(processor, _rows("llava"))
    runner = ShortVOnnxModel.from_pretrained(out)
    feeds = runner.prefill_inputs(**{k: v.numpy() for k, v in inputs.items()})
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds), strict=True))
    seq, n_text = feeds["inputs_embeds"].shape[1], feeds["text_index"].shape[1]
    assert n_text < seq / 2
    for scope, name in probes.items():
        layer = int(scope.split(".")[2])
        rows = values[name].reshape(2, -1, values[name].shape[-1]).shape[1]
        all_rows = any(p in scope for p in ("k_proj", "v_proj")) or layer not in FROZEN
        assert rows == (seq if all_rows else n_text), scope


def test_graphs_are_documented_and_dynamic(exported):
    out, model, _ = exported("llava")
    spec = json.loads((out / "onnx" / "shortv_onnx.json").read_text())
    assert spec["shortv_layers"] == FROZEN and spec["dtype"] == "float32"
    for key in ("vision_encoder", "embed_tokens", "decoder"):
        graph = onnx.load(out / "onnx" / spec[key]["file"], load_external_data=False).graph
        assert [i.name for i in graph.input] == list(spec[key]["inputs"])
        assert [o.name for o in graph.output] == list(spec[key]["outputs"])
    graph = onnx.load(out / "onnx" / "decoder_model_merged.onnx", load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["inputs_embeds"][:2] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total"]
    assert dims["text_index"] == ["batch", "text"]
    assert dims[f"past_key_values.{LAYERS - 1}.value"][0::2] == ["batch", "past"]
    # No local source paths in the published graph.
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in graph.node for p in n.metadata_props)


def test_text_index_pads_rows_with_their_last_text_position():
    visual = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(text_index(visual), [[0, 3, 4], [3, 4, 4]])
    with pytest.raises(ValueError, match="only image tokens"):
        text_index(np.ones((1, 3), dtype=bool))


def test_fp16_export_frees_the_model_before_onnx_runtime_loads_the_graphs(tmp_path, monkeypatch):
    """An export of its own, of a 2-layer model: a stock layer, then a frozen one (the dtype is under test here;
    the 3-layer models test the frozen layers' order everywhere else). Once the graphs are written and PyTorch's
    reference is computed, nothing keeps the traced model alive when ONNX Runtime loads them for the validation
    (onnxscript's rewrite rules used to)."""
    import weakref

    from shortv_export import onnx_export, onnx_validate

    export_decoder, validate = onnx_export._export_decoder, onnx_validate.validate_export
    weight, freed = [], []

    def decoder(model, out):
        weight.append(weakref.ref(model.model.language_model.layers[0].mlp.up_proj.weight))
        return export_decoder(model, out)

    def validated(*args, **kwargs):
        freed.append(weight[0]() is None)
        return validate(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_export_decoder", decoder)
    monkeypatch.setattr(onnx_validate, "validate_export", validated)
    out = tmp_path / "ckpt"
    args = [str(tiny_dir("llava", num_layers=2)), "--layers", "1", "--onnx", "--onnx-dtype", "fp16", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "-q", "--no-verify"])
    assert result.exit_code == 0, result.output
    graph = onnx.load(out / "onnx" / "decoder_model_merged.onnx", load_external_data=False).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    spec = json.loads((out / "onnx" / "shortv_onnx.json").read_text())
    assert spec["dtype"] == "float16"
    # Validated against the fp16 PyTorch model on ONNX Runtime CPU, the model gone by then.
    assert spec["validation"]["max_abs_logits_diff"] <= spec["validation"]["tolerance"]
    assert freed == [True]


def test_runner_needs_no_torch(exported, tmp_path):
    out, model, _ = exported("llava")
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = batch(processor, _rows("llava"))
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    expected = ShortVOnnxModel.from_pretrained(out).generate(**{k: v.numpy() for k, v in inputs.items()})
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch.") or name == "transformers":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
from shortv_export.onnx_runtime import ShortVOnnxModel
inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
ids = ShortVOnnxModel.from_pretrained({str(out)!r}).generate(**inputs)
np.save({str(tmp_path / "ids.npy")!r}, ids)
assert "torch" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), expected)


def test_unknown_provider_is_a_clear_error(exported):
    out, _, _ = exported("llava")
    with pytest.raises(ValueError, match="not available here"):
        ShortVOnnxModel.from_pretrained(out, provider="cuda")
    with pytest.raises(FileNotFoundError, match="--onnx"):
        ShortVOnnxModel.from_pretrained(tiny_dir("llava"))


@pytest.mark.parametrize("kind,text", [("llava", "llama"), ("smolvlm", "llama"), ("qwen2_vl", "qwen2")])
def test_cli_exports_and_answers(exported, tmp_path, kind, text):
    out, _, report = exported(kind, text=text)  # made by the CLI's --onnx
    assert "ONNX Runtime vs PyTorch" in report.cli_output and "tolerance" in report.cli_output
    assert {p.name for p in (out / "onnx").iterdir()} >= {
        "vision_encoder.onnx",
        "embed_tokens.onnx",
        "decoder_model_merged.onnx",
        "shortv_onnx.json",
    }
    image(32, 24).save(tmp_path / "img.png")
    args = [str(out), "--image", str(tmp_path / "img.png"), "--prompt", "what colour is it", "--max-new-tokens", "5"]
    if kind == "llava":  # the module run as a program once, in a process of its own; the other families in-process
        answer = subprocess.run([sys.executable, "-m", "shortv_export.onnx_cli", *args], capture_output=True, text=True)
        assert answer.returncode == 0, answer.stderr
    else:
        answer = _onnx_cli(args)
        assert answer.exit_code == 0, answer.output
    # The answer is what the PyTorch checkpoint says.
    model = load_shortv(tiny_dir(kind, num_layers=LAYERS), FROZEN).eval()
    processor = processor_for(out)
    from PIL import Image

    from shortv_export.data import NESTED_IMAGES, format_prompt

    picture = Image.open(tmp_path / "img.png").convert("RGB")
    inputs = processor(
        images=[[picture]] if type(processor).__name__ in NESTED_IMAGES else [picture],
        text=[format_prompt(processor, "what colour is it")],
        return_tensors="pt",
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer.stdout.strip() == expected


def test_export_failure_leaves_no_output(tmp_path, monkeypatch):

    def boom(*a, **k):  # what torch.export raises: a type of its own and pages of detail
        raise RuntimeError("boom: the graph broke\n\n" + "stack frame\n" * 200)

    monkeypatch.setattr(torch.onnx, "export", boom)
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "2,0", "--onnx", "--out", str(out), "-q"])
    assert result.exit_code == 2
    assert (
        result.stderr.strip() == "Error: ONNX export of vision_encoder.onnx failed: RuntimeError: boom: the graph broke"
    )
    assert not out.exists() and not list(tmp_path.iterdir())


def test_validation_fails_on_a_wrong_kv_cache(exported):
    """Prefill logits alone would pass; a cache that differs from PyTorch's is caught."""
    out, model, _ = exported("llava")
    inputs = batch(AutoProcessor.from_pretrained(out, trust_remote_code=True), _rows("llava"))
    ref = torch_reference(model, inputs)
    ref[f"present.{FROZEN[0]}.key"] = ref[f"present.{FROZEN[0]}.key"] + 1.0  # a frozen layer's keys
    with pytest.raises(ShortVError, match="KV cache diff"):
        validate_export(ref, inputs, out / "onnx")


def test_io_binding_keeps_the_cache_in_ort_values_and_generates_the_same(exported):
    import onnxruntime as ort

    out, _, _ = exported("llava")
    inputs = {
        k: v.numpy()
        for k, v in batch(AutoProcessor.from_pretrained(out, trust_remote_code=True), _rows("llava")).items()
    }
    bound, plain = (ShortVOnnxModel.from_pretrained(out, io_binding=b) for b in (True, False))
    _, hidden, cache = bound.decode(bound.prefill_inputs(**inputs))
    assert hidden is None and all(isinstance(v, ort.OrtValue) for v in cache.values())
    kw = dict(max_new_tokens=10, eos_token_id=[])
    np.testing.assert_array_equal(bound.generate(**inputs, **kw), plain.generate(**inputs, **kw))


def test_sampling_is_seeded_and_warps_like_transformers(exported):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from shortv_export.onnx_runtime import warp

    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    for temperature, top_k, top_p in ((1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.5, 10, 0.6)):
        scores = torch.from_numpy(logits)
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p:
            scores = TopPLogitsWarper(top_p)(None, scores)
        ours = warp(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isinf(ours), torch.isinf(scores).numpy())
        finite = ~np.isinf(ours)
        np.testing.assert_allclose(ours[finite], scores.numpy()[finite], rtol=1e-6)

    out, _, _ = exported("llava")
    runner = ShortVOnnxModel.from_pretrained(out)
    inputs = {
        k: v.numpy()
        for k, v in batch(AutoProcessor.from_pretrained(out, trust_remote_code=True), _rows("llava")).items()
    }
    kw = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    first, again = runner.generate(**inputs, **kw, seed=3), runner.generate(**inputs, **kw, seed=3)
    np.testing.assert_array_equal(first, again)
    others = [runner.generate(**inputs, **kw, seed=s) for s in (4, 5)]
    assert any(not np.array_equal(first, o) for o in others)
    greedy = runner.generate(**inputs, max_new_tokens=12, eos_token_id=[])
    np.testing.assert_array_equal(runner.generate(**inputs, **dict(kw, top_k=1), seed=9), greedy)


def test_generate_stops_at_any_of_several_eos_ids_and_rejects_unknown_arguments(exported):
    out, _, _ = exported("llava")
    runner = ShortVOnnxModel.from_pretrained(out)
    inputs = {
        k: v.numpy()
        for k, v in batch(AutoProcessor.from_pretrained(out, trust_remote_code=True), _rows("llava")).items()
    }
    free = runner.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    prompt = inputs["input_ids"].shape[1]
    eos = [int(free[0, prompt + 1]), int(free[1, prompt + 2])]  # row 0 stops at its 2nd token, row 1 at its 3rd
    got = runner.generate(**inputs, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    for row, stop in ((0, prompt + 1), (1, prompt + 2)):
        first_eos = prompt + int(np.flatnonzero(np.isin(free[row, prompt:], eos))[0])
        assert (got[row, first_eos + 1 :] == 0).all() and first_eos <= stop
    with pytest.raises(TypeError, match="num_beams"):
        runner.generate(**inputs, num_beams=2)


@pytest.mark.parametrize(
    "scheme,bits,floor",
    [("int8", 8, 0.9), pytest.param("int4", 4, 0.5, marks=pytest.mark.xdist_group("onnx-llava-int4"))],  # own export
)
def test_weight_only_quantization_of_the_decoder(exported, tmp_path, scheme, bits, floor):
    """--onnx-quantize: every projection MatMul of the decoder becomes MatMulNBits; the result is compared with
    the unquantized graph and recorded; the runner generates with it. int4 through the CLI, on a 1-layer model of
    its own; int8 by the same function on a copy of the shared export (one export fewer)."""
    out = tmp_path / "ckpt"
    layers = 1 if scheme == "int4" else LAYERS
    if scheme == "int4":
        args = [str(tiny_dir("llava", num_layers=layers)), "--layers", "0", "--onnx"]
        args += ["--onnx-quantize", scheme]
        args += ["--out", str(out)]
        result = CliRunner().invoke(main, [*args, "-q", "--no-verify"])
        assert result.exit_code == 0, result.output
        q = json.loads((out / "onnx" / "shortv_onnx.json").read_text())["quantization"]
        assert f"quantized to {scheme}" in (out / "README.md").read_text()
    else:
        from shortv_export.onnx_quantize import quantize_decoder

        shutil.copytree(exported("llava")[0], out)
        q = quantize_decoder(out / "onnx", scheme, out, external_data=False)
    graph = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert (
        q["scheme"] == scheme
        and q["bits"] == bits
        and q["quantized_matmuls"] == ops.count("MatMulNBits") == layers * 7 + 1
    )
    assert ops.count("MatMul") == 2 * layers  # what is left: the attention products (scores, weighted sum) per layer
    assert q["decoder_bytes_after"] < q["decoder_bytes_before"] and q["samples"] == 16
    assert q["top1_agreement_vs_unquantized"] >= floor
    assert not list((out / "onnx").glob(".*"))  # no temporary files left
    runner = ShortVOnnxModel.from_pretrained(out)
    inputs = {
        k: v.numpy()
        for k, v in batch(AutoProcessor.from_pretrained(out, trust_remote_code=True), _rows("llava")).items()
    }
    assert runner.generate(**inputs, max_new_tokens=4, eos_token_id=[]).shape == (2, inputs["input_ids"].shape[1] + 4)


def test_quantize_needs_onnx():
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "2", "--onnx-quantize", "int4"])
    assert result.exit_code == 2 and "add --onnx" in result.stderr


def test_export_reads_the_weights_tensor_by_tensor():
    """The export's own loader gives the weights from_pretrained gives (in the ONNX dtype); that the model it makes
    is freed once exported: test_fp16_export_frees_the_model_before_onnx_runtime_loads_the_graphs."""
    from safetensors.torch import load_file

    from shortv_export.onnx_export import read_safetensors

    weights = read_safetensors(tiny_dir("llava"), torch.float16)
    reference = load_file(tiny_dir("llava") / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(weights[k].dtype == torch.float16 and torch.equal(weights[k], reference[k].half()) for k in reference)


def test_runner_takes_its_defaults_from_the_checkpoint_like_hf_generate(exported, tmp_path):
    """Sampling settings left as None come from generation_config.json (else transformers' defaults, top_k 50);
    EOS and pad fall back to config.json when there is no generation config."""
    out, _, _ = exported("llava")
    runner = ShortVOnnxModel.from_pretrained(out)
    inputs = {
        k: v.numpy()
        for k, v in batch(AutoProcessor.from_pretrained(out, trust_remote_code=True), _rows("llava")).items()
    }
    runner.generation = dict(runner.generation, do_sample=True, temperature=0.8, top_k=5)
    kw = dict(max_new_tokens=8, eos_token_id=[], seed=1)
    explicit = runner.generate(**inputs, **kw, do_sample=True, temperature=0.8, top_k=5, top_p=1.0)
    np.testing.assert_array_equal(runner.generate(**inputs, **kw), explicit)
    runner.generation = {}
    hf_default = runner.generate(**inputs, **kw, do_sample=True)  # transformers' top_k=50 applies
    np.testing.assert_array_equal(hf_default, runner.generate(**inputs, **kw, do_sample=True, top_k=50))

    copy = tmp_path / "no-generation-config"
    shutil.copytree(out, copy)
    (copy / "generation_config.json").unlink()
    config = json.loads((copy / "config.json").read_text())
    bare = ShortVOnnxModel.from_pretrained(copy)
    assert bare.eos_token_id == config["text_config"]["eos_token_id"] is not None


def test_safetensors_reader_follows_the_index_of_a_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText

    from shortv_export.onnx_export import read_safetensors

    base = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(tiny_dir("llava")).save_pretrained(base, max_shard_size="300KB")
    shutil.copy2(tiny_dir("llava") / "model.safetensors", base / "consolidated.safetensors")  # not in the index
    weights = read_safetensors(base, torch.float32)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(weights) == sorted(index)


def test_a_failed_quantization_leaves_no_temporary_files(exported, tmp_path, monkeypatch):
    import shortv_export.onnx_quantize as onnx_quantize

    out, _, _ = exported("llava")
    copy = tmp_path / "ckpt"
    shutil.copytree(out, copy)

    def boom(*a, **k):
        raise RuntimeError("agreement check failed")

    monkeypatch.setattr(onnx_quantize, "agreement", boom)
    before = sorted(p.name for p in (copy / "onnx").iterdir())
    with pytest.raises(RuntimeError, match="agreement"):
        onnx_quantize.quantize_decoder(copy / "onnx", "int4", copy, external_data=False)
    assert sorted(p.name for p in (copy / "onnx").iterdir()) == before


def test_export_prints_no_deduplication_notice(tmp_path, caplog):
    """LLaVA-NeXT's image_newline output is folded to an initializer: onnx_ir's initializer deduplication used to
    log "Skipped deduplication of initializer ... graph input or output" for it, which the user cannot act on."""
    import logging

    from shortv_export.onnx_export import _export_vision

    model = load_shortv(tiny_dir("llava_next"), FROZEN, attn_implementation="sdpa").eval()
    with caplog.at_level(logging.DEBUG):
        spec = _export_vision(model, tmp_path)
    assert list(spec["vision_encoder"]["outputs"]) == ["image_features", "image_newline"]
    assert not [r for r in caplog.records if "Skipped deduplication" in r.getMessage()]


def _onnx_cli(args):
    from shortv_export.onnx_cli import main as onnx_main

    return CliRunner().invoke(onnx_main, args)


def test_onnx_cli_rejects_zero_new_tokens_before_loading_anything(tmp_path):
    image(8, 8).save(tmp_path / "img.png")
    result = _onnx_cli([str(tmp_path), "--image", str(tmp_path / "img.png"), "--prompt", "hi", "--max-new-tokens", "0"])
    assert result.exit_code == 2
    assert "Invalid value for '--max-new-tokens': 0 is not in the range x>=1" in result.stderr


def test_onnx_cli_version():
    import shortv_export

    result = _onnx_cli(["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"shortv-onnx {shortv_export.__version__}"


# FastV with a frozen layer on each side of K = 1 (0 before, 2 among the pruned ones); VTW; LLaVA and M-RoPE
PRUNED = [("llava", "llama", "fastv"), ("qwen2_5_vl", "qwen2", "fastv"), ("llava", "llama", "vtw")]


@pytest.mark.parametrize("kind,text,prune", PRUNED, ids=[f"{k}-{p}" for k, _, p in PRUNED])
def test_pruned_export_caches_the_kept_rows_and_generates_the_pytorch_tokens(exported, kind, text, prune):
    """--onnx with --fastv / --vtw: the ranking (TopK) and the kept rows are in the decoder graph; on a padded batch
    whose rows hold different numbers of image tokens, the layers from K on cache only each row's kept rows
    (padded to the widest row), every present and the kept rows equal PyTorch's, and the runner's greedy tokens
    are PyTorch's."""
    out, model, report = exported(kind, text=text, prune=prune)
    v = report.validation
    assert v["greedy_tokens_agree"] and v["max_abs_present_diff"] <= v["present_tolerance"]
    rows = _rows(kind)
    if kind == "llava":  # two images in the first row: the rows keep different counts
        rows = [(rows[0][0], [*rows[0][1], image(20, 40, 4)]), rows[1]]
    inputs = batch(processor_for(out), rows)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    runner = ShortVOnnxModel.from_pretrained(out, io_binding=False)
    feeds = runner.prefill_inputs(**arrays)
    _, _, cache = runner.decode(feeds)
    ref = torch_reference(model, inputs, steps=0)
    n_visual = feeds["visual_mask"].sum(1)
    assert len(set(n_visual)) == 2  # the rows keep different counts
    seq = feeds["inputs_embeds"].shape[1]
    kept = seq - n_visual + (np.round(0.5 * n_visual) if prune == "fastv" else 0)
    np.testing.assert_array_equal(cache["pruned_past_mask"], ref["pruned_mask"])
    for i in range(LAYERS):
        key = cache[f"past_key_values.{i}.key"]
        assert key.shape[2] == (seq if i < K else kept.max()) == ref[f"present.{i}.key"].shape[2]
        valid = feeds["attention_mask"] if i < K else ref["pruned_mask"]
        assert cache_diff(key, ref[f"present.{i}.key"], valid.astype(bool)) <= 1e-4 * np.abs(key).max()
    expected = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None, min_new_tokens=20)
    got = runner.generate(**arrays, max_new_tokens=20, eos_token_id=[])
    np.testing.assert_array_equal(got, expected.numpy())
    with_binding = ShortVOnnxModel.from_pretrained(out).generate(**arrays, max_new_tokens=20, eos_token_id=[])
    np.testing.assert_array_equal(with_binding, got)


@pytest.mark.parametrize("prune", ["fastv"])
def test_validation_catches_a_pruned_export_that_keeps_other_tokens(exported, prune):
    out, model, _ = exported("llava", prune=prune)
    inputs = batch(processor_for(out), _rows("llava"))
    ref = torch_reference(model, inputs)
    ref["pruned_mask"] = ref["pruned_mask"][:, ::-1].copy()
    with pytest.raises(ShortVError, match="the tokens the pruned layers keep differ"):
        validate_export(ref, inputs, out / "onnx")
