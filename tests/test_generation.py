"""Conformance of the ShortV classes on every generation path, against the stock model under the oracle.

Each test runs on LLaVA and LLaVA-NeXT with one frozen layer (layer 0, so everything after it sees frozen rows)
and with several, and on LLaVA with each other text model (Mistral, Qwen2, with and without a sliding window
shorter than the prompts) with several.
"""

from __future__ import annotations

import copy
import warnings
from functools import cache

import pytest
import torch
from conftest import also_lowest, batch, image, processor_for, prompt, tiny_dir
from oracle import oracle_hooks
from transformers import AutoModelForImageTextToText

from shortv_export.compat import cache_kwarg, output_cache
from shortv_export.models import load_shortv
from shortv_export.tiny import FAMILIES, NEW_FAMILIES

FROZEN = [(0,), (4, 1, 3)]
CASES = (
    [(kind, "llama", frozen) for kind in ("llava", "llava_next") for frozen in FROZEN]
    + [("llava", text, (4, 1, 3)) for text in ("mistral", "mistral_sliding", "qwen2", "qwen2_sliding")]
    + [(kind, text, (4, 1, 3)) for kind, text in FAMILIES if kind in NEW_FAMILIES]
)
# Qwen2-VL / Qwen2.5-VL: M-RoPE positions come from input_ids, mm_token_type_ids and the image grids of the whole
# prompt, which generate() only has for a fresh prompt of input_ids (stock behaviour, which ShortV keeps).
MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
Q = "what is the color of the shape ?"
Q2 = "how many shapes are there in this picture ?"


def params(frozen=None, models=None, lowest=None):
    """Parametrize over CASES, or over ``models`` x ``frozen``; ``lowest``: the (kind, text) pairs that CI's
    lowest-transformers pass runs too (default: all)."""
    cases = CASES if models is None else [(k, t, f) for k, t in models for f in frozen or FROZEN]
    if frozen is not None and models is None:
        cases = [c for c in CASES if c[2] in frozen]
    ids = [f"{k}-{t}-{'_'.join(map(str, f))}" for k, t, f in cases]
    return pytest.mark.parametrize(
        "kind,text,frozen", also_lowest(cases, lambda c: lowest is None or c[:2] in lowest, ids)
    )


@cache
def processor(kind):
    return processor_for(tiny_dir(kind))  # the image-only processor where torchvision is missing


@cache
def pair(kind: str, text: str, frozen: tuple, attn: str = "sdpa", layers: int = 6):
    folder = tiny_dir(kind, num_layers=layers, text=text)
    shortv = load_shortv(folder, list(frozen), attn_implementation=attn).eval()
    stock = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attn).eval()
    return shortv, stock


def padded_batch(kind):
    """Two rows of different lengths and image counts, left-padded (as for generation)."""
    rows = [(Q2, [image(40, 50, 0), image(64, 32, 1)]), (Q, [image(30, 90, 2)])]
    return batch(processor(kind), rows, "left")


def gen_kwargs(model, **kw):
    # random weights may pick <image>, which a later uncached step would take for a placeholder
    video = getattr(model.config, "video_token_id", None)
    return dict(max_new_tokens=8, suppress_tokens=[model.config.image_token_id, *([video] if video else [])], **kw)


def generate_both(shortv, stock, frozen, inputs, **kw):
    """(ShortV's tokens, the oracle's tokens) for the same generate() call."""
    with torch.no_grad():
        ours = shortv.generate(**inputs, **kw)
        with oracle_hooks(stock, list(frozen), shortv.config.image_token_id):
            ref = stock.generate(**inputs, **kw)
    return ours, ref


@params()
def test_beam_search_equals_oracle(kind, text, frozen):
    shortv, stock = pair(kind, text, frozen)
    inputs = padded_batch(kind)
    ours, ref = generate_both(shortv, stock, frozen, inputs, **gen_kwargs(shortv, num_beams=3, do_sample=False))
    assert torch.equal(ours, ref)


@params()
def test_seeded_sampling_equals_oracle(kind, text, frozen):
    shortv, stock = pair(kind, text, frozen)
    inputs = padded_batch(kind)
    kw = gen_kwargs(shortv, do_sample=True, top_k=0, temperature=1.0)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = shortv.generate(**inputs, **kw)
        with oracle_hooks(stock, list(frozen), shortv.config.image_token_id):
            torch.manual_seed(7)
            ref = stock.generate(**inputs, **kw)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(  # stock Gemma 3 cannot generate from inputs_embeds
    "kind,text,frozen",
    [c for c in CASES if c[0] != "gemma3"],
    ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_inputs_embeds_generation_equals_input_ids_generation_and_oracle(kind, text, frozen):
    shortv, stock = pair(kind, text, frozen)
    inputs = padded_batch(kind)
    ids = inputs.pop("input_ids")
    kw = gen_kwargs(shortv, do_sample=False)
    with torch.no_grad():
        from_ids = shortv.generate(input_ids=ids, **inputs, **kw)[:, ids.shape[1] :]
        embeds = shortv.get_input_embeddings()(ids)
    ours, ref = generate_both(shortv, stock, frozen, dict(inputs, inputs_embeds=embeds), **kw)
    assert torch.equal(ours, ref)
    if kind not in MROPE:  # stock Qwen2-VL falls back to 1-D positions without input_ids
        assert torch.equal(ours, from_ids)  # with inputs_embeds, generate returns the new tokens only


@pytest.mark.parametrize(
    "kind,text,frozen",
    [c for c in CASES if c[0] not in MROPE],
    ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_continuing_from_the_cache_with_a_second_image_in_a_later_turn(kind, text, frozen):
    """Turn 2 (a new image) reuses turn 1's cache; it equals recomputing both turns from scratch, and the oracle."""
    shortv, stock = pair(kind, text, frozen)
    proc = processor(kind)
    first, second = image(40, 50, 0), image(30, 90, 2)
    turn1 = proc(images=[first], text=[prompt(proc, Q)], return_tensors="pt")
    turn2_text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q2}]}], add_generation_prompt=True
    )
    turn2 = proc(images=[second], text=[turn2_text], return_tensors="pt")
    both = proc(images=[first, second], text=[prompt(proc, Q, 2)], return_tensors="pt")  # for the pixels only
    kw = gen_kwargs(shortv, do_sample=False, return_dict_in_generate=True)

    def two_turns(model):
        out = model.generate(**turn1, **kw)
        ids = torch.cat([out.sequences, turn2["input_ids"]], dim=1)
        images = {k: v for k, v in turn2.items() if k not in ("input_ids", "attention_mask")}
        again = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **images, **{cache_kwarg(): output_cache(out)}, **kw
        )
        return ids, again.sequences

    with torch.no_grad():
        ids, ours = two_turns(shortv)
        with oracle_hooks(stock, list(frozen), shortv.config.image_token_id):
            _, ref = two_turns(stock)
        pixels = {k: v for k, v in both.items() if k not in ("input_ids", "attention_mask")}
        scratch = shortv.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels, **kw).sequences
    assert (ids == shortv.config.image_token_id).sum() == (both["input_ids"] == shortv.config.image_token_id).sum()
    assert torch.equal(ours, ref)
    assert torch.equal(ours, scratch)


@params()
def test_logits_to_keep_and_explicit_position_ids_equal_oracle(kind, text, frozen):
    shortv, stock = pair(kind, text, frozen)
    inputs = padded_batch(kind)
    mask = inputs["attention_mask"]
    positions = 2 * (mask.cumsum(-1) - 1).clamp(min=0)  # stretched: RoPE sees other relative distances
    with torch.no_grad():
        full = shortv(**inputs).logits
        last = shortv(**inputs, logits_to_keep=1).logits
        ours = shortv(**inputs, position_ids=positions).logits
        with oracle_hooks(stock, list(frozen), shortv.config.image_token_id):
            ref = stock(**inputs, position_ids=positions).logits
    assert last.shape[1] == 1 and (last[:, 0] - full[:, -1]).abs().max() <= 1e-6
    keep = mask.bool()
    assert (ours - ref)[keep].abs().max() <= 1e-5
    assert (ours - full)[keep].abs().max() > 1e-4  # the positions really reached the frozen and dense layers


@params(models=[("llava", "llama"), ("llava_next", "llama")])
def test_hidden_states_and_attention_maps_line_up_with_layers(kind, text, frozen):
    """output_attentions (eager): one [B, heads, S, K] map per layer; text rows equal the oracle's, visual rows
    of frozen layers are zero (they are not queries)."""
    shortv, stock = pair(kind, text, frozen, "eager")
    inputs = padded_batch(kind)
    with torch.no_grad():
        ours = shortv(**inputs, output_attentions=True, output_hidden_states=True)
        with oracle_hooks(stock, list(frozen), shortv.config.image_token_id):
            ref = stock(**inputs, output_attentions=True, output_hidden_states=True)
    layers = shortv.config.text_config.num_hidden_layers
    assert len(ours.attentions) == len(ref.attentions) == layers
    assert len(ours.hidden_states) == len(ref.hidden_states) == layers + 1
    visual = inputs["input_ids"] == shortv.config.image_token_id
    text_rows = inputs["attention_mask"].bool() & ~visual
    for i, (a, r) in enumerate(zip(ours.attentions, ref.attentions, strict=True)):
        assert a.shape == r.shape
        assert (a - r).transpose(1, 2)[text_rows].abs().max() <= 1e-5, i
        if i in frozen:
            assert a.transpose(1, 2)[visual].abs().max() == 0, i
        else:
            assert (a - r).transpose(1, 2)[visual].abs().max() <= 1e-5, i


@params(frozen=[(4, 1, 3)])
def test_save_and_reload_round_trip(kind, text, frozen, tmp_path):
    shortv, _ = pair(kind, text, frozen)
    shortv.save_pretrained(tmp_path)
    reloaded = type(shortv).from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert reloaded.config.shortv_layers == list(frozen)
    layers = reloaded.model.shortv_text_model().layers, shortv.model.shortv_text_model().layers
    assert type(layers[0][frozen[0]]) is type(layers[1][frozen[0]])
    inputs = padded_batch(kind)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, shortv(**inputs).logits)


def test_no_deprecation_warnings_from_the_model_file():
    shortv, _ = pair("llava", "llama", (4, 1, 3))
    inputs = padded_batch("llava")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        shortv(**inputs)
        shortv.generate(**inputs, **gen_kwargs(shortv, do_sample=False))
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not ours, [str(w.message) for w in ours]


# The compile tests trace every decoder layer (about 0.4 s a layer): 3-layer models, the first and the last frozen
# (Qwen2's sliding layers are 2 on, Gemma 3's alternate: each attention type traced). On the lowest transformers
# each runs one model per text-decoder kind of its own list (Llama, Mistral, Qwen2, Gemma 3), M-RoPE among them
# where the list has it, and Idefics3's image prefill (README Versions).
COMPILE_FROZEN, COMPILE_LAYERS = (2, 0), 3


@params(
    frozen=[COMPILE_FROZEN],
    models=[(k, t) for k, t, f in CASES if f == (4, 1, 3)],
    lowest={("llava", "llama"), ("llava", "mistral_sliding"), ("qwen2_5_vl", "qwen2"), ("gemma3", "gemma3")},
)
def test_text_only_decode_step_compiles_with_fullgraph(kind, text, frozen):
    """No branching on tensor values outside image prefill: a decode step traces as one graph and agrees."""
    shortv, _ = pair(kind, text, frozen, layers=COMPILE_LAYERS)
    inputs = padded_batch(kind)
    with torch.no_grad():
        out = shortv(**inputs, use_cache=True)
        cache = output_cache(out)
        step = dict(
            input_ids=out.logits[:, -1:].argmax(-1),
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1),
            position_ids=inputs["attention_mask"].sum(1, keepdim=True),
            use_cache=True,
        )
        eager = shortv(**step, **{cache_kwarg(): copy.deepcopy(cache)}).logits
        torch._dynamo.reset()
        compiled = torch.compile(shortv.forward, fullgraph=True, backend="eager")
        traced = compiled(**step, **{cache_kwarg(): copy.deepcopy(cache)}).logits
    assert (traced - eager).abs().max() <= 1e-5


# (kind, text) whose static-cache decode steps and one prompt's image prefill both compile with fullgraph=True
COMPILED = [("llava", "llama"), ("llava", "qwen2_sliding"), ("gemma3", "gemma3"), ("smolvlm", "llama")]


@params(
    frozen=[COMPILE_FROZEN],
    models=[*COMPILED, ("qwen2_5_vl", "qwen2")],
    lowest={("llava", "llama"), ("llava", "qwen2_sliding"), ("gemma3", "gemma3"), ("qwen2_5_vl", "qwen2")},
)
def test_static_cache_generation_with_compile_equals_eager(kind, text, frozen):
    from transformers import CompileConfig

    shortv, _ = pair(kind, text, frozen, layers=COMPILE_LAYERS)
    inputs = padded_batch(kind)
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # compile on the CPU too
    kw = gen_kwargs(shortv, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    shortv.__dict__.pop("_compiled_call", None)
    try:
        with torch.no_grad():
            eager = shortv.generate(**inputs, **kw, disable_compile=True)
            compiled = shortv.generate(**inputs, **kw, compile_config=config)
        assert "_compiled_call" in shortv.__dict__  # the decode steps really ran compiled (fullgraph)
    finally:
        shortv.__dict__.pop("_compiled_call", None)
    assert torch.equal(compiled, eager)


@params(
    frozen=[COMPILE_FROZEN],
    models=[*COMPILED, ("idefics3", "llama")],
    lowest={("llava", "llama"), ("llava", "qwen2_sliding"), ("gemma3", "gemma3"), ("idefics3", "llama")},
)
def test_one_prompt_image_prefill_compiles_with_fullgraph(kind, text, frozen):
    """The captured path: for one prompt the text width comes from the host (sequence length minus the image
    features), so the whole prefill with images traces as one graph (CUDA graphs need that) and agrees. The
    families whose stock image path traces as one graph; stock LLaVA-NeXT / OneVision (anyres packing), Mistral 3
    (Pixtral's image sizes) and the Qwen-VL towers (grid loops) do not."""
    shortv, _ = pair(kind, text, frozen, layers=COMPILE_LAYERS)
    inputs = batch(processor(kind), [(Q, [image(40, 50, 0)])])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = shortv(**inputs, logits_to_keep=1, use_cache=False).logits
        compiled = torch.compile(shortv.forward, fullgraph=True, backend="eager")
        traced = compiled(**inputs, logits_to_keep=1, use_cache=False).logits
    assert (traced - eager).abs().max() <= 1e-5


@params(frozen=[(0, 4, 1, 3)], models=[("llava", "llama"), ("llava_next", "llama"), ("llava", "qwen2_sliding")])
@pytest.mark.parametrize("rows", [1, 2])
def test_chunked_prefill_equals_oracle(kind, text, frozen, rows):
    """generate(prefill_chunk_size=5): some chunks hold image tokens only (no query in a frozen layer, K/V still
    cached), others mix text and image rows."""
    shortv, stock = pair(kind, text, frozen)
    inputs = padded_batch(kind) if rows == 2 else batch(processor(kind), [(Q, [image(40, 50, 0)])])
    kw = gen_kwargs(shortv, do_sample=False, prefill_chunk_size=5)
    ours, ref = generate_both(shortv, stock, frozen, inputs, **kw)
    assert torch.equal(ours, ref)
    with torch.no_grad():
        assert torch.equal(ours, shortv.generate(**inputs, **gen_kwargs(shortv, do_sample=False)))


@params(frozen=[(4, 1, 3)], models=[("llava", "llama"), ("llava", "mistral_sliding")])
def test_packed_looking_position_ids_without_a_mask_equal_oracle(kind, text, frozen):
    """With the cache on (the default), the stock model never reads position_ids as packed sequences; neither
    may the frozen layers' masks."""
    shortv, stock = pair(kind, text, frozen)
    inputs = batch(processor(kind), [(Q, [image(40, 50, 0)])])
    ids = inputs["input_ids"]
    positions = torch.cat([torch.arange(10), torch.arange(ids.shape[1] - 10)]).unsqueeze(0)
    call = dict(input_ids=ids, pixel_values=inputs["pixel_values"], position_ids=positions)
    with torch.no_grad():
        ours = shortv(**call).logits
        with oracle_hooks(stock, list(frozen), shortv.config.image_token_id):
            ref = stock(**call).logits
    assert (ours - ref).abs().max() <= 1e-5


def test_image_features_given_as_one_tensor_equal_oracle():
    """mm_encoder_outputs whose pooler_output is one [images, tokens, hidden] tensor (stock accepts it): the
    batch-1 text width counts features, not tensors."""
    shortv, stock = pair("llava", "llama", (4, 1, 3))
    inputs = batch(processor("llava"), [(Q, [image(40, 50, 0)])])
    with torch.no_grad():
        features = stock.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        features.pooler_output = [torch.stack(list(features.pooler_output))]
        call = dict(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": features})
        ours = shortv(**call).logits
        with oracle_hooks(stock, [4, 1, 3], shortv.config.image_token_id):
            ref = stock(**call).logits
    assert (ours - ref).abs().max() <= 1e-5
