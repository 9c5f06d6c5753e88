"""Fast CPU inference (models/decode.py, issue 15): bf16 tables, static-cache + compiled decode, its fallback."""

import copy

import pytest
import torch

from memoryformer.kernels.cpu import cpu_kernel_available
from memoryformer.layers import MemoryLayer
from memoryformer.models import build_model, decode
from memoryformer.models.decode import (
    build_for_inference,
    enable_compiled_decode,
    parse_dtype,
    to_inference_dtype,
)

# MemoryFormer shapes of several kinds: (d, heads, layers, τ, expand bits); vocab 512 keeps them ~1M parameters.
SHAPES = [(64, 2, 2, 8, 2), (32, 4, 1, 4, 1), (48, 3, 2, 6, 0)]
VOCAB = 512


def tiny(name: str = "mf-nano", shape=SHAPES[0]) -> torch.nn.Module:
    d, heads, layers, tau, expand = shape
    overrides = {"hidden_size": d, "num_attention_heads": heads, "num_hidden_layers": layers, "vocab_size": VOCAB}
    if name.startswith("mf"):
        overrides |= {"tau": tau, "expand_bits": expand}
    return build_model(name, **overrides).eval()


def greedy(model, prompt, new_tokens=6, **kwargs):
    """Greedy generate with per-step logits."""
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits)


# --- dtypes -----------------------------------------------------------------------------------------------------


def test_parse_dtype_accepts_the_cli_spellings_and_names_the_choices():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is parse_dtype(torch.bfloat16) is torch.bfloat16
    assert parse_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="choose one of"):
        parse_dtype("int3")


@pytest.mark.skipif(not cpu_kernel_available(), reason="the fused CPU kernel did not build here")
def test_bf16_tables_model_is_the_fp32_model_with_rounded_tables():
    """Only the tables change dtype, and the bf16 model is, to fp32 accuracy, the fp32 model whose tables hold the
    same (rounded) values, forward and backward.

    The reference is that rounded model, not the unrounded one: the hash is discontinuous, so rounding a table
    perturbs the next layer's input and flips the sign bits of its near-zero entries, a different row, whatever
    the dtype of the arithmetic. One lookup against fp64 with unrounded tables is checked in test_kernels_cpu.py."""
    torch.manual_seed(0)
    fp32 = tiny(shape=SHAPES[0])
    bf16 = to_inference_dtype(copy.deepcopy(fp32), "bf16")
    rounded = copy.deepcopy(fp32)
    for layer in (m for m in rounded.modules() if isinstance(m, MemoryLayer)):
        layer.tables.data = layer.tables.data.bfloat16().float()
    for name, p in bf16.named_parameters():
        assert p.dtype == (torch.bfloat16 if name.endswith("tables") else torch.float32), name
    ids = torch.randint(VOCAB, (2, 12))
    results = {}
    for key, model in (("fp32", fp32), ("bf16", bf16), ("rounded", rounded)):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results[key] = out.logits.detach(), grads
    (_, grads32), (logits16, grads16), (logits_r, grads_r) = results["fp32"], results["bf16"], results["rounded"]
    assert logits16.dtype == torch.float32
    torch.testing.assert_close(logits16, logits_r, atol=1e-5, rtol=1e-4)
    assert grads16.keys() == grads32.keys() and any(n.endswith("tables") for n in grads16)
    for name in grads32:
        scale = grads32[name].abs().max().item() + 1e-12
        assert (grads16[name] - grads_r[name]).abs().max().item() <= 1e-2 * scale, name  # bf16 table grads round


def test_sample_config_dtype_flag_parses():
    """`make sample DTYPE=bf16` passes dtype=bf16 to scripts/sample.py's Hydra config."""
    from memoryformer.config import compose_config

    assert parse_dtype(compose_config(config_name="sample").dtype) is torch.float32
    cfg = compose_config(["dtype=bf16"], config_name="sample")
    assert parse_dtype(cfg.dtype) is torch.bfloat16 and cfg.compile is False


def test_a_model_without_memory_layers_is_cast_whole():
    pythia = to_inference_dtype(tiny("pythia-14m"), torch.bfloat16)
    assert {p.dtype for p in pythia.parameters()} == {torch.bfloat16}


def test_build_for_inference_allocates_tables_in_the_narrow_dtype():
    torch.manual_seed(0)
    d, heads, layers = SHAPES[0][:3]
    model = build_for_inference(
        "mf-nano", "bf16", hidden_size=d, num_attention_heads=heads, num_hidden_layers=layers, vocab_size=VOCAB
    )
    assert not model.training
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
        assert p.dtype == (torch.bfloat16 if name.endswith("tables") else torch.float32), name
    block = model.model.layers[0]
    # initialised by the family's own init (spec §1-3), not left as empty memory
    assert block.memory_block.ml1.tables.float().std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(block.attention_norm.scale, torch.ones(d))
    logits = model(input_ids=torch.randint(VOCAB, (1, 5))).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# --- decode path ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_static_cache_decode_equals_dynamic_cache_and_no_cache(shape):
    """The static KV cache the compiled path uses gives the eager path's greedy tokens and logits, for MemoryFormer
    shapes of several kinds; and so does decoding with no cache at all."""
    torch.manual_seed(0)
    model = tiny(shape=shape)
    prompt = torch.randint(VOCAB, (1, 7))
    tokens, logits = greedy(model, prompt)
    static_tokens, static_logits = greedy(model, prompt, cache_implementation="static")
    uncached_tokens, uncached_logits = greedy(model, prompt, use_cache=False)
    assert torch.equal(static_tokens, tokens) and torch.equal(uncached_tokens, tokens)
    torch.testing.assert_close(static_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncached_logits, logits, atol=1e-5, rtol=1e-5)


def test_without_a_compiler_decoding_stays_eager_and_gives_the_same_tokens(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    torch.manual_seed(0)
    model = tiny()
    prompt = torch.randint(VOCAB, (1, 5))
    tokens, _ = greedy(model, prompt)
    assert not decode.compiler_available()
    assert enable_compiled_decode(model) is False
    assert model.generation_config.compile_config is None and model.generation_config.cache_implementation is None
    assert torch.equal(greedy(model, prompt)[0], tokens)


@pytest.mark.slow  # torch.compile: ~2 minutes per model on 2 busy cores (5.4 min for the three)
@pytest.mark.parametrize("name, shape", [("mf-nano", SHAPES[0]), ("mf-nano", SHAPES[1]), ("pythia-14m", SHAPES[0])])
def test_compiled_decode_gives_eager_tokens_and_logits(name, shape):
    """Both families through the same compiled machinery: same greedy tokens as eager with and without a KV cache,
    logits within fp32 tolerance, and the compiled step is actually used."""
    if not decode.compiler_available():
        pytest.skip("no C++ compiler for torch.compile here")
    torch.manual_seed(0)
    model = tiny(name, shape)
    prompts = [torch.randint(VOCAB, (1, 7)), torch.randint(VOCAB, (1, 9))]
    eager = [greedy(model, p) for p in prompts]
    uncached = [greedy(model, p, use_cache=False)[0] for p in prompts]
    assert enable_compiled_decode(model)
    torch._dynamo.reset()
    for prompt, (tokens, logits), no_cache_tokens in zip(prompts, eager, uncached, strict=True):
        compiled_tokens, compiled_logits = greedy(model, prompt)
        assert torch.equal(compiled_tokens, tokens) and torch.equal(compiled_tokens, no_cache_tokens)
        torch.testing.assert_close(compiled_logits, logits, atol=1e-4, rtol=1e-4)
    assert hasattr(model, "_compiled_call")  # generate took the compiled path
