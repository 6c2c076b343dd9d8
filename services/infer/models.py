"""Local model builder: two small Llama-architecture models with a locally trained tokenizer and seeded weights.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on a corpus generated here from a fixed seed; the
weights are random (seeded), so **the text these models produce is meaningless** — but every engine path (tokenize,
schedule, batch, sample, stream, abort, prefix cache, usage) is vLLM's real one, and the two tiers really differ in
cost and speed. To serve a real model, point ``COSTMESH_INFER_MODEL_DIR`` at any Hugging Face model directory.

Builds are deterministic and idempotent: each model directory holds a ``costmesh-model.json`` manifest with the build
spec and the SHA-256 of every file; a build whose spec and files match is skipped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Bumped whenever the builder's output changes for the same spec (forces a rebuild).
BUILDER_VERSION = 1
MANIFEST_NAME = "costmesh-model.json"

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, IM_START, IM_END)

#: ChatML-style template: ``<|im_start|>role\ncontent<|im_end|>\n`` per message, then the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of one local model (Llama architecture)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    vocab_size: int = 2048
    seed: int = 1234
    dtype: str = "bfloat16"


CHEAP = ModelSpec(
    name="costmesh-cheap",
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    seed=1234,
)
FULL = ModelSpec(
    name="costmesh-full",
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    seed=5678,
)
#: Tier name -> spec; ``costmesh models build`` writes ``<out>/<tier>``.
TIER_SPECS: dict[str, ModelSpec] = {"cheap": CHEAP, "full": FULL}

_CORPUS_SEED = 20261127
_SUBJECTS = (
    "the router",
    "a tenant",
    "the cache",
    "our budget",
    "the model",
    "each request",
    "the worker",
    "a user",
    "the team",
    "this feature",
    "the engine",
    "every token",
    "the queue",
    "a job",
    "the report",
    "the service",
    "my manager",
    "the customer",
    "an engineer",
    "the database",
    "the network",
    "a student",
    "the teacher",
    "the farmer",
    "the city",
    "a river",
    "the company",
    "the market",
    "the doctor",
    "a robot",
)
_VERBS = (
    "sends",
    "reads",
    "writes",
    "counts",
    "checks",
    "routes",
    "stores",
    "computes",
    "explains",
    "summarizes",
    "translates",
    "answers",
    "plans",
    "builds",
    "measures",
    "compares",
    "rejects",
    "accepts",
    "streams",
    "caches",
    "buys",
    "sells",
    "grows",
    "moves",
    "finds",
    "keeps",
    "drops",
    "opens",
    "closes",
    "learns",
)
_OBJECTS = (
    "the prompt",
    "a long document",
    "three numbers",
    "the invoice",
    "a short poem",
    "the answer",
    "every message",
    "the monthly bill",
    "a list of items",
    "the error",
    "the results",
    "a new plan",
    "the schedule",
    "twelve apples",
    "the weather",
    "a python function",
    "the summary",
    "an email",
    "the contract",
    "a question",
    "the totals",
    "the price table",
    "a reservation",
    "the stream",
    "some data",
    "the history",
    "a map",
    "the recipe",
)
_TAILS = (
    "before noon",
    "for the whole team",
    "with care",
    "in two steps",
    "as fast as possible",
    "without errors",
    "every day",
    "at the end of the month",
    "when asked",
    "on the cheap tier",
    "on the full tier",
    "in order",
    "for 15 dollars",
    "by 3 pm",
    "in 2026",
    "twice a week",
    "after the meeting",
    "under the limit",
    "again",
)
_SNIPPETS = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    '{"tenant": "acme", "tokens": 128, "cost_micros": 96}\n',
    "SELECT name, total FROM orders WHERE total > 100;\n",
    "Q: What is 12 + 30? A: 42.\n",
    "- item one\n- item two\n- item three\n",
    "1. Read the question.\n2. Think step by step.\n3. Answer briefly.\n",
)


def tokenizer_corpus(lines: int = 6000) -> Iterator[str]:
    """A deterministic, local English-and-code corpus for training the tokenizer (no download, no shipped file)."""
    rng = random.Random(_CORPUS_SEED)
    for i in range(lines):
        kind = i % 10
        if kind == 9:
            yield rng.choice(_SNIPPETS)
            continue
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        sentence = sentence[0].upper() + sentence[1:]
        punct = rng.choice((".", ".", ".", "?", "!"))
        if kind == 8:
            sentence = f"{sentence}, and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        yield f"{sentence}{punct} Number {rng.randint(0, 9999)}.\n"


def _build_tokenizer(vocab_size: int) -> Any:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    hf: Any = transformers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = hf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=CHEAP.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spec_record(spec: ModelSpec) -> dict[str, Any]:
    return {"builder_version": BUILDER_VERSION, **asdict(spec)}


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_built(model_dir: Path, spec: ModelSpec) -> bool:
    """True when ``model_dir`` holds this spec's build, every file intact (hashes checked)."""
    manifest = read_manifest(model_dir)
    if manifest is None or manifest.get("spec") != _spec_record(spec):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, digest in files.items():
        path = model_dir / str(name)
        if not path.is_file() or _sha256(path) != digest:
            return False
    return True


def _write_model(spec: ModelSpec, tokenizer: Any, target: Path) -> None:
    import torch
    import transformers
    import transformers.utils.logging

    hf: Any = transformers
    hf.utils.logging.disable_progress_bar()

    torch.manual_seed(spec.seed)
    config = hf.LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = hf.LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.eval()
    model.generation_config = hf.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


@dataclass(frozen=True, slots=True)
class BuildResult:
    tier: str
    path: Path
    built: bool  # False = skipped, an identical build was already there
    parameters: int


def _count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total


def build_models(out: Path, tiers: tuple[str, ...] = ("cheap", "full"), *, force: bool = False) -> list[BuildResult]:
    """Build the local models for ``tiers`` under ``out/<tier>``; skip those already built with the same spec."""
    unknown = [t for t in tiers if t not in TIER_SPECS]
    if unknown:
        raise ValueError(f"unknown tier(s) {unknown}; known: {sorted(TIER_SPECS)}")
    out.mkdir(parents=True, exist_ok=True)
    results: list[BuildResult] = []
    tokenizer: Any = None
    for tier in tiers:
        spec = TIER_SPECS[tier]
        target = out / tier
        if not force and is_built(target, spec):
            results.append(BuildResult(tier, target, built=False, parameters=_count_parameters(target)))
            continue
        if tokenizer is None:
            tokenizer = _build_tokenizer(spec.vocab_size)
        # Write into a temporary sibling and swap it in, so a crash never leaves a half-built model behind.
        tmp = Path(tempfile.mkdtemp(prefix=f".{tier}-", dir=out))
        tmp.chmod(0o755)
        try:
            _write_model(spec, tokenizer, tmp)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"spec": _spec_record(spec), "tier": tier, "files": files}
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        results.append(BuildResult(tier, target, built=True, parameters=_count_parameters(target)))
    return results


def ensure_local_models(out: Path) -> list[BuildResult]:
    """Build the cheap and full local models under ``out`` unless already there (``costmesh up`` calls this)."""
    return build_models(out)


def model_display_name(model_dir: Path) -> str:
    """The name a model directory is served under: its manifest's model name, else the directory's name."""
    manifest = read_manifest(model_dir)
    spec = manifest.get("spec") if manifest else None
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return str(spec["name"])
    return model_dir.name
