"""One block and the whole model, MemoryFormer against Pythia of the same width, at decode and at prefill.

    python -m benchmarks.bench_models [--quick]

- Blocks (``run_block_benchmark``): a ``MemoryFormerBlock`` against transformers' ``GPTNeoXLayer``, each built from
  the registry's config of a model pair (mf-tiny/pythia-70m at d = 512, mf-small/pythia-160m at 768, mf-base/
  pythia-410m at 1024): latency of decoding 1 token against a KV cache of 512 tokens, and of a 2048-token prefill.
  Next to each: the parameter bytes one token reads (every dense weight; only the K gathered rows of a Memory Layer,
  spec §1) and the KV cache bytes, which both blocks read alike. Decode uses the in-place KV cache
  (``models/kv_cache.py``) for both, so a MemoryFormer block decodes as its one fused operator; its module path
  (transformers' ``DynamicCache``) is timed beside them.
- Whole models (``run_model_benchmark``): mf-tiny against pythia-70m with ``generate`` (greedy) from a 128-token
  prompt, and prefill tokens/s (one forward, logits of the last position only, as ``generate`` does).
- Decode paths and dtypes (``run_decode_benchmark``, issue 15): greedy decode tokens/s through ``generate`` for
  mf-tiny vs pythia-70m (eager vs compiled, fp32 vs bf16) and mf-base with bf16 tables vs pythia-410m (fp32, bf16;
  only with ≥ 17 GiB available), each against its weight-streaming bound.

Blocks and models run in fp32 (the decode section also in bf16) with SDPA attention and the default lookup backend
(``auto``), in eval mode under ``torch.no_grad``, and every KV cache is the in-place one for both families. The two
sides of every comparison take turns call by call (:func:`benchmarks.bench_kernels.time_side_by_side`, warm-up
excluded), so that load from other processes hits both alike, and are summarised as median/min/max over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

from benchmarks.bench_kernels import summarise, time_side_by_side
from memoryformer.kernels import resolve_backend
from memoryformer.kernels.cpu import cpu_kernel_available, memory_block_decode_cpu
from memoryformer.layers.attention import RotaryEmbedding
from memoryformer.layers.memory_layer import MemoryLayer
from memoryformer.models import MemoryFormerConfig, build_model, model_config
from memoryformer.models.decode import build_for_inference, compiled_generation_config, compiler_available
from memoryformer.models.kv_cache import InPlaceKVCache
from memoryformer.models.modeling_memoryformer import MemoryFormerBlock

BLOCK_PAIRS = (("mf-tiny", "pythia-70m"), ("mf-small", "pythia-160m"), ("mf-base", "pythia-410m"))
MODEL_PAIR = ("mf-tiny", "pythia-70m")
ATTENTION = "sdpa"  # what build_model's models use on CPU; set explicitly on bare blocks
INPUT_POOL = 8  # distinct inputs cycled through, so consecutive calls do not re-read the same table rows
# Quick mode shrinks every model to one d = 64 layer with a 512-token vocabulary (seconds, for the tests).
QUICK_OVERRIDES = {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 512}
FULL = {
    "block_pairs": BLOCK_PAIRS,
    "kv_cache": 512,
    "prefill": 2048,
    "prompt": 128,
    "new_tokens": 32,
    "model_prefill": (128, 2048),
    "overrides": {},
    "seconds": 1.0,
    "max_repeats": 100,
}
QUICK = {
    "block_pairs": BLOCK_PAIRS[:1],
    "kv_cache": 16,
    "prefill": 32,
    "prompt": 16,
    "new_tokens": 4,
    "model_prefill": (16,),
    "overrides": QUICK_OVERRIDES,
    "seconds": 0.02,
    "max_repeats": 5,
}


def family(config: PretrainedConfig) -> str:
    return "memoryformer" if isinstance(config, MemoryFormerConfig) else "pythia"


def build_block(name: str, **overrides) -> tuple[nn.Module, PretrainedConfig]:
    """Layer 0 of the named model, built alone from its registry config (eval mode)."""
    config = model_config(name, **overrides)
    config._attn_implementation = ATTENTION
    block = MemoryFormerBlock(config, layer_idx=0) if family(config) == "memoryformer" else GPTNeoXLayer(config, 0)
    return block.eval(), config


def rotary_embedding(config: PretrainedConfig) -> nn.Module:
    """The model's own rotary module: cos/sin for given positions."""
    if family(config) == "memoryformer":
        return RotaryEmbedding(config.rotary_ndims, config.rotary_emb_base)
    return GPTNeoXRotaryEmbedding(config)


def run_block(block: nn.Module, x: torch.Tensor, position_embeddings, cache: DynamicCache | None) -> torch.Tensor:
    """One block call; the two families name the KV-cache argument differently."""
    if isinstance(block, GPTNeoXLayer):
        return block(x, layer_past=cache, position_embeddings=position_embeddings)
    return block(x, position_embeddings, past_key_values=cache)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Parameter bytes one token's forward reads: all of every dense parameter, but of a Memory Layer only the
    K table rows it gathers (and its bias), and of a token embedding only its row."""
    total = 0
    for module in model.modules():
        if isinstance(module, MemoryLayer):
            rows = module.num_chunks * module.out_features * module.tables.element_size()
            total += rows + module.bias.numel() * module.bias.element_size()
        elif isinstance(module, nn.Embedding):
            total += module.embedding_dim * module.weight.element_size()
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def kv_cache_bytes(config: PretrainedConfig, tokens: int) -> int:
    """Keys and values of one layer for ``tokens`` positions in fp32."""
    return 2 * tokens * config.hidden_size * 4


@torch.no_grad()
def decode_setting(
    block: nn.Module, config: PretrainedConfig, kv_cache: int, cache_class: type[DynamicCache]
) -> tuple[DynamicCache, list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A cache of ``cache_class`` filled with a ``kv_cache``-token prompt by ``block``, a pool of one-token inputs,
    and their rotary embeddings at position ``kv_cache``. The cache holds the one layer the block fills (one made
    from the model's config would hold all of them, and cropping the unused ones each call cost ~40 µs)."""
    d, rotary = config.hidden_size, rotary_embedding(config)
    cache = cache_class()
    prompt = torch.randn(1, kv_cache, d)
    run_block(block, prompt, rotary(prompt, torch.arange(kv_cache)[None]), cache)
    tokens = [torch.randn(1, 1, d) for _ in range(INPUT_POOL)]
    return cache, tokens, rotary(tokens[0], torch.tensor([[kv_cache]]))


def block_decode_call(
    block: nn.Module, config: PretrainedConfig, kv_cache: int, cache_class: type[DynamicCache] = InPlaceKVCache
) -> Callable[[int], object]:
    """fn(i): decode one token at position ``kv_cache`` against a cache of ``kv_cache`` tokens, then drop it again
    so every call sees the same cache length. Both families use the in-place cache (a MemoryFormer block then runs
    fused); ``cache_class=DynamicCache`` runs a MemoryFormer block's modules instead."""
    cache, tokens, position_embeddings = decode_setting(block, config, kv_cache, cache_class)

    def call(i: int) -> None:
        with torch.no_grad():
            run_block(block, tokens[i % INPUT_POOL], position_embeddings, cache)
        cache.crop(-1)

    return call


def fused_operator_call(block: MemoryFormerBlock, config: PretrainedConfig, kv_cache: int) -> Callable[[int], object]:
    """fn(i): what :func:`block_decode_call` times of a MemoryFormer block minus the Python around its fused
    operator: the operator alone, writing the same cache slot each call."""
    cache, tokens, (cos, sin) = decode_setting(block, config, kv_cache, InPlaceKVCache)
    slot = (1, block.attention.num_heads, 1, block.attention.head_dim)
    keys, values, length = cache.layers[block.attention.layer_idx].reserve(slot, tokens[0])
    operands = tuple(block.fused_decode_operands().values())

    def call(i: int) -> None:
        memory_block_decode_cpu(tokens[i % INPUT_POOL], cos, sin, keys, values, length, *operands)

    return call


@torch.no_grad()
def block_prefill_call(block: nn.Module, config: PretrainedConfig, tokens: int) -> Callable[[int], object]:
    """fn(i): a causal forward of ``tokens`` fresh tokens, no cache."""
    inputs = [torch.randn(1, tokens, config.hidden_size) for _ in range(2)]
    position_embeddings = rotary_embedding(config)(inputs[0], torch.arange(tokens)[None])

    def call(i: int) -> None:
        with torch.no_grad():
            run_block(block, inputs[i % 2], position_embeddings, None)

    return call


@torch.no_grad()
def attention_call(config: PretrainedConfig, tokens: int, kv_cache: int) -> Callable[[int], object]:
    """fn(i): the part of a block both families share: append ``tokens`` keys/values to a cache of ``kv_cache``
    (none at prefill) and attend over it with SDPA, causally at prefill; the appended positions are dropped again."""
    heads = config.num_attention_heads
    shape = (1, heads, tokens, config.hidden_size // heads)
    cache = InPlaceKVCache() if kv_cache else None  # one layer, as in decode_setting
    if cache is not None:
        cache.update(torch.randn(1, heads, kv_cache, shape[-1]), torch.randn(1, heads, kv_cache, shape[-1]), 0)
    qkv = [[torch.randn(shape) for _ in range(3)] for _ in range(INPUT_POOL)]

    def call(i: int) -> None:
        q, k, v = qkv[i % INPUT_POOL]
        if cache is not None:
            k, v = cache.update(k, v, 0)
        F.scaled_dot_product_attention(q, k, v, is_causal=tokens > 1)
        if cache is not None:
            cache.crop(-tokens)

    return call


def run_block_benchmark(quick: bool) -> dict:
    """Decode and prefill latency of one MemoryFormer block vs one Pythia block per width (JSON-serialisable).

    Schema::

        {
          "config": {"quick": bool, "kv_cache": int, "prefill_tokens": int, "attention": str, "dtype": "float32",
                     "lookup_backend": str, "overrides": {str: int}},
          "results": [
            {"d": int, "phase": "decode" | "prefill", "tokens": int, "kv_cache": int,
             "memoryformer": {"model": str, "weight_bytes_per_token": int, <summary>},
             "pythia": {"model": str, "weight_bytes_per_token": int, <summary>},
             "attention": <summary>,        # the shared part alone: KV-cache append + SDPA (attention_call)
             "memoryformer_modules": <summary>,  # decode only: the MemoryFormer block's modules, DynamicCache
             "memoryformer_operator": <summary>,  # decode, when the operator builds: it alone (no Python around it)
             "latency_ratio": float,        # memoryformer median / pythia median
             "latency_ratio_beyond_attention": float,  # the same with the attention median taken off both
             "weight_bytes_ratio": float,   # memoryformer / pythia weight bytes per token
             "kv_cache_bytes": int}         # read by both blocks per decoded token (0 at prefill)
          ]
        }

    ``<summary>`` is :func:`benchmarks.bench_kernels.summarise`: median_us, min_us, max_us, repeats, tokens_per_s.
    """
    sizes = QUICK if quick else FULL
    results = []
    for pair in sizes["block_pairs"]:
        blocks = [(name, *build_block(name, **sizes["overrides"])) for name in pair]
        config = blocks[0][2]
        phases = (
            ("decode", 1, sizes["kv_cache"], block_decode_call),
            ("prefill", sizes["prefill"], 0, block_prefill_call),
        )
        for phase, tokens, kv_cache, make_call in phases:
            calls = {name: make_call(block, block_config, kv_cache or tokens) for name, block, block_config in blocks}
            calls["attention"] = attention_call(config, tokens, kv_cache)
            if phase == "decode":  # the MemoryFormer block's modules and its fused operator alone
                mf_block = next(block for _, block, c in blocks if family(c) == "memoryformer")
                calls["memoryformer_modules"] = block_decode_call(mf_block, config, kv_cache, DynamicCache)
                if cpu_kernel_available():
                    calls["memoryformer_operator"] = fused_operator_call(mf_block, config, kv_cache)
            timings = side_by_side(calls, sizes)
            row = {"d": config.hidden_size, "phase": phase, "tokens": tokens, "kv_cache": kv_cache}
            for name, block, block_config in blocks:
                row[family(block_config)] = {
                    "model": name,
                    "weight_bytes_per_token": weight_bytes_per_token(block),
                    **summarise(timings[name], tokens),
                }
            row["attention"] = summarise(timings["attention"], tokens)
            if phase == "decode":
                for part in ("memoryformer_modules", "memoryformer_operator"):
                    if part in timings:
                        row[part] = summarise(timings[part], tokens)
            mf, pythia, attention = row["memoryformer"], row["pythia"], row["attention"]["median_us"]
            row["latency_ratio"] = mf["median_us"] / pythia["median_us"]
            row["latency_ratio_beyond_attention"] = (mf["median_us"] - attention) / (pythia["median_us"] - attention)
            row["weight_bytes_ratio"] = mf["weight_bytes_per_token"] / pythia["weight_bytes_per_token"]
            row["kv_cache_bytes"] = kv_cache_bytes(config, kv_cache)
            results.append(row)
    return {
        "config": {
            "quick": quick,
            "kv_cache": sizes["kv_cache"],
            "prefill_tokens": sizes["prefill"],
            "attention": ATTENTION,
            "dtype": "float32",
            "lookup_backend": resolve_backend("auto", torch.device("cpu")),
            "overrides": sizes["overrides"],
        },
        "results": results,
    }


def fixed_length(generation_config: GenerationConfig, new_tokens: int) -> GenerationConfig:
    """A copy of ``generation_config`` for greedy decoding of exactly ``new_tokens`` tokens.

    A random model may emit EOS, so EOS is switched off rather than held back with ``min_new_tokens``: that logits
    processor recomputes an EOS mask over the whole vocabulary at every step (``torch.isin``, ~0.5 ms for 50k ids,
    measured 14% of an mf-tiny ``generate``), a cost of the benchmark, not of either model.
    """
    config = copy.deepcopy(generation_config)
    config.update(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return config


def generate_call(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int) -> Callable[[int], object]:
    """fn(i): greedy ``generate`` of exactly ``new_tokens`` tokens after the i-th prompt of the pool."""
    config = fixed_length(model.generation_config, new_tokens)

    def call(i: int) -> None:
        prompt = prompts[i % len(prompts)]
        model.generate(
            prompt,
            generation_config=config,
            past_key_values=InPlaceKVCache(model.config),
            attention_mask=torch.ones_like(prompt),
        )

    return call


@torch.no_grad()
def greedy_decode_call(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int) -> Callable[[int], object]:
    """fn(i): ``new_tokens`` greedy decode steps after the i-th prompt, whose KV cache was filled beforehand; the
    new positions are dropped again afterwards, so every call decodes from the same prompt."""
    starts = []
    for prompt in prompts:
        out = model(input_ids=prompt, past_key_values=InPlaceKVCache(model.config), use_cache=True)
        starts.append((out.past_key_values, out.logits[:, -1:].argmax(-1)))

    def call(i: int) -> None:
        cache, token = starts[i % len(starts)]
        with torch.no_grad():
            for _ in range(new_tokens):
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        cache.crop(-new_tokens)

    return call


def prefill_call(model: nn.Module, prompts: list[torch.Tensor]) -> Callable[[int], object]:
    """fn(i): one forward of the i-th prompt, logits for its last position only (a prefill, as in generate)."""

    def call(i: int) -> None:
        with torch.no_grad():
            model(input_ids=prompts[i % len(prompts)], use_cache=False, logits_to_keep=1)

    return call


def side_by_side(calls: dict[str, Callable[[int], object]], sizes: dict) -> dict[str, list[float]]:
    """Seconds per call of every fn(i), the calls taking turns, repeats sized by ``sizes``."""
    return time_side_by_side(calls, sizes["seconds"] * len(calls), sizes["max_repeats"])


def run_model_benchmark(quick: bool) -> dict:
    """Greedy decode and prefill tokens/s of mf-tiny vs pythia-70m, each model built once (JSON-serialisable).

    Schema::

        {
          "config": {"quick": bool, "prompt_tokens": int, "new_tokens": int, "prefill_tokens": [int],
                     "attention": str, "dtype": "float32", "lookup_backend": str, "overrides": {str: int}},
          "results": [
            {"model": str, "family": "memoryformer" | "pythia", "parameters": int, "build_seconds": float,
             "weight_bytes_per_token": int,  # parameter bytes one decoded token reads (weight_bytes_per_token)
             "lm_head_bytes": int,           # of which the dense LM head, the same in both models
             "decode": <summary>,    # new_tokens greedy steps after a cached prompt: tokens_per_s of decoding
             "generate": <summary>,  # generate(prompt, max_new_tokens=new_tokens): tokens_per_s end to end
             "prefill": [{"tokens": int, <summary>}]}
          ],
          "ratios": {"decode_tokens_per_s": float, "generate_tokens_per_s": float,  # memoryformer / pythia
                     "prefill_tokens_per_s": {str(tokens): float}}
        }
    """
    sizes = QUICK if quick else FULL
    new_tokens = sizes["new_tokens"]
    models, results = {}, {}
    for name in MODEL_PAIR:  # mf-tiny is 467M parameters (~1.9 GB fp32): built once, used for everything
        started = time.perf_counter()
        models[name] = build_model(name, **sizes["overrides"]).eval()
        results[name] = {
            "model": name,
            "family": family(models[name].config),
            "parameters": sum(p.numel() for p in models[name].parameters()),
            "weight_bytes_per_token": weight_bytes_per_token(models[name]),
            "lm_head_bytes": weight_bytes_per_token(models[name].get_output_embeddings()),
            "build_seconds": time.perf_counter() - started,
            "prefill": [],
        }

    vocab = min(model.config.vocab_size for model in models.values())
    prompts = [torch.randint(vocab, (1, sizes["prompt"])) for _ in range(INPUT_POOL)]
    for key, make_call in (("decode", greedy_decode_call), ("generate", generate_call)):
        timings = side_by_side({name: make_call(model, prompts, new_tokens) for name, model in models.items()}, sizes)
        for name, times in timings.items():
            results[name][key] = summarise(times, new_tokens)
    for tokens in sizes["model_prefill"]:
        inputs = [torch.randint(vocab, (1, tokens)) for _ in range(2)]
        timings = side_by_side({name: prefill_call(model, inputs) for name, model in models.items()}, sizes)
        for name, times in timings.items():
            results[name]["prefill"].append({"tokens": tokens, **summarise(times, tokens)})
    mf, pythia = (results[name] for name in MODEL_PAIR)
    prefill_ratios = {
        str(a["tokens"]): a["tokens_per_s"] / b["tokens_per_s"]
        for a, b in zip(mf["prefill"], pythia["prefill"], strict=True)
    }
    return {
        "config": {
            "quick": quick,
            "prompt_tokens": sizes["prompt"],
            "new_tokens": new_tokens,
            "prefill_tokens": list(sizes["model_prefill"]),
            "attention": ATTENTION,
            "dtype": "float32",
            "lookup_backend": resolve_backend("auto", torch.device("cpu")),
            "overrides": sizes["overrides"],
        },
        "results": list(results.values()),
        "ratios": {
            "decode_tokens_per_s": mf["decode"]["tokens_per_s"] / pythia["decode"]["tokens_per_s"],
            "generate_tokens_per_s": mf["generate"]["tokens_per_s"] / pythia["generate"]["tokens_per_s"],
            "prefill_tokens_per_s": prefill_ratios,
        },
    }


# --- decode paths and dtypes (issue 15) --------------------------------------------------------------------------

LARGE_PAIR = ("mf-base", "pythia-410m")
LARGE_MIN_AVAILABLE_GIB = 17  # mf-base with bf16 tables is ~13.7 GB; the machine is shared, leave the others room
DECODE = {
    "full": {"prompt": 128, "new_tokens": 32, "rounds": 3, "compile": True, "overrides": {}},
    "quick": {"prompt": 16, "new_tokens": 4, "rounds": 2, "compile": False, "overrides": QUICK_OVERRIDES},
}


class TokenClock:
    """A ``generate`` streamer that only timestamps: put #0 is the prompt, put #1 the prefill's token, then one
    put per decode step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_seconds_per_token(model: nn.Module, prompt: torch.Tensor, new_tokens: int, generation_config) -> float:
    """Seconds per greedy decode step of ``generate`` (prefill excluded), with the given generation config."""
    clock = TokenClock()
    config = fixed_length(generation_config, new_tokens)
    # The eager path of both families: the in-place KV cache (a compiled step brings its own static cache).
    cache = {} if config.cache_implementation == "static" else {"past_key_values": InPlaceKVCache(model.config)}
    model.generate(prompt, generation_config=config, attention_mask=torch.ones_like(prompt), streamer=clock, **cache)
    return (clock.times[-1] - clock.times[1]) / (len(clock.times) - 2)


def read_seconds(weights: torch.Tensor, vector: torch.Tensor) -> float:
    """Seconds of one matrix-vector product over ``weights``: how fast decode can stream weight bytes here (a GEMV
    reads faster than ``sum``'s reduction, 1.5× at one thread). Timed between decode rounds, so that it sees the
    same share of a loaded machine as the decoding it bounds."""
    start = time.perf_counter()
    torch.mv(weights, vector)
    return time.perf_counter() - start


def available_memory_gib() -> float:
    """MemAvailable from /proc/meminfo (inf where it cannot be read)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return float("inf")
    available = [line.split()[1] for line in lines if line.startswith("MemAvailable:")]
    return int(available[0]) / 2**20 if available else float("inf")


def decode_variants(name: str, pair: str, overrides: dict, compile_: bool) -> list[dict]:
    """The model of ``name`` in fp32 and bf16 (``to_inference_dtype``; mf-base only in bf16: 27 GB in fp32), each
    with the eager path and, when ``compile_``, the compiled one; a variant is {model, generation_config, ...}."""
    dtypes = ("bf16",) if name == "mf-base" else ("fp32", "bf16")
    variants = []
    for dtype in dtypes:
        model = build_for_inference(name, dtype, **overrides)
        # Each path passes its own config; the model's stays eager, because generate fills a passed config's
        # unset fields from it (a compiled model config would make the "eager" path compiled too).
        paths = [("eager", model.generation_config)]
        if compile_ and compiler_available():
            paths.append(("compiled", compiled_generation_config(model.generation_config)))
        for path, generation_config in paths:
            variants.append(
                {
                    "pair": pair,
                    "model": name,
                    "family": family(model.config),
                    "dtype": dtype,
                    "path": path,
                    "module": model,
                    "generation_config": generation_config,
                }
            )
    return variants


def run_decode_benchmark(quick: bool) -> dict:
    """Greedy decode tokens/s through ``generate``: eager vs compiled (static KV cache + torch.compile) and fp32 vs
    bf16, for mf-tiny vs pythia-70m and mf-base (bf16 tables) vs pythia-410m, with each one's bandwidth bound.

    Every variant goes through the same ``generate`` machinery (models/decode.py), and all variants of a pair take
    turns generation by generation, ``rounds`` times; a variant's decode time is the median over rounds of its
    seconds per decode step (prefill excluded, :class:`TokenClock`). The first generation of a compiled variant
    (its compilation) is excluded. mf-base is built only when /proc/meminfo shows ≥ 17 GiB available.

    Schema::

        {
          "config": {"quick": bool, "prompt_tokens": int, "new_tokens": int, "rounds": int, "compile": bool,
                     "read_bandwidth_gbs": float,  # a 256 MB GEMV between rounds, median
                     "overrides": {str: int}},
          "results": [
            {"pair": "small" | "large", "model": str, "family": str, "dtype": "fp32" | "bf16",
             "path": "eager" | "compiled", "decode": <summary>,   # tokens_per_s = decode tokens/s
             "bytes_per_token": int,        # weights one step reads + the KV cache at the mean context length
             "bound_tokens_per_s": float,   # read_bandwidth / bytes_per_token
             "fraction_of_bound": float}
          ],
          "skipped": {str: str}  # pair -> why it did not run
        }
    """
    sizes = DECODE["quick" if quick else "full"]
    weights = torch.ones((32 if quick else 256) << 8, 1024)  # MB of fp32, more than the caches
    vector = torch.ones(1024)
    reads: list[float] = []
    results, skipped = [], {}
    for pair, names in (("small", MODEL_PAIR), ("large", LARGE_PAIR)):
        available = available_memory_gib()
        if pair == "large" and not quick and available < LARGE_MIN_AVAILABLE_GIB:
            skipped[pair] = f"{available:.1f} GiB available < {LARGE_MIN_AVAILABLE_GIB} GiB needed for mf-base in bf16"
            continue
        compile_ = sizes["compile"] and pair == "small"  # compiling 24 layers takes too long on 2 cores
        variants = [v for name in names for v in decode_variants(name, pair, sizes["overrides"], compile_)]
        vocab = min(v["module"].config.vocab_size for v in variants)
        prompt = torch.randint(vocab, (1, sizes["prompt"]))
        context = sizes["prompt"] + sizes["new_tokens"] / 2
        read_seconds(weights, vector)  # warm-up
        times: list[list[float]] = [[] for _ in variants]
        for round_ in range(sizes["rounds"] + 1):  # round 0 compiles and warms up: not timed
            for variant, variant_times in zip(variants, times, strict=True):
                seconds = decode_seconds_per_token(
                    variant["module"], prompt, sizes["new_tokens"], variant["generation_config"]
                )
                if round_:
                    variant_times.append(seconds)
                    reads.append(read_seconds(weights, vector))
        for variant, variant_times in zip(variants, times, strict=True):
            model = variant.pop("module")
            variant.pop("generation_config")
            kv_bytes = 2 * model.config.num_hidden_layers * context * model.config.hidden_size * 4
            row = {**variant, "decode": summarise(variant_times, 1)}
            row["bytes_per_token"] = int(weight_bytes_per_token(model) + kv_bytes)
            results.append(row)
        del variants, model  # free the models (and their compiled steps) before the next pair is built
        torch._dynamo.reset()
        gc.collect()
    bandwidth = weights.numel() * weights.element_size() / statistics.median(reads) / 1e9
    for row in results:
        row["bound_tokens_per_s"] = bandwidth * 1e9 / row["bytes_per_token"]
        row["fraction_of_bound"] = row["decode"]["tokens_per_s"] / row["bound_tokens_per_s"]
    return {
        "config": {
            "quick": quick,
            "prompt_tokens": sizes["prompt"],
            "new_tokens": sizes["new_tokens"],
            "rounds": sizes["rounds"],
            "compile": sizes["compile"],
            "read_bandwidth_gbs": bandwidth,
            "overrides": sizes["overrides"],
        },
        "results": results,
        "skipped": skipped,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one d = 64 layer per model (seconds)")
    quick = parser.parse_args().quick
    print(
        json.dumps(
            {
                "blocks": run_block_benchmark(quick),
                "models": run_model_benchmark(quick),
                "decode": run_decode_benchmark(quick),
            },
            indent=1,
        )
    )
