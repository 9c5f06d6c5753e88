"""Fast CPU inference (issue 15): bf16 tables, the fused block decode and its in-place KV cache, static-cache +
compiled decode, and their fallbacks."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache

from memoryformer.kernels.cpu import cpu_kernel_available
from memoryformer.layers import MemoryLayer
from memoryformer.models import build_model, decode
from memoryformer.models.decode import (
    build_for_inference,
    compiled_generation_config,
    enable_compiled_decode,
    parse_dtype,
    to_inference_dtype,
)
from memoryformer.models.kv_cache import InPlaceKVCache

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


# --- fused block decode and the in-place KV cache ---------------------------------------------------------------

needs_cpu_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason="the fused CPU kernel did not build here")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused block operator (through the name the modeling code calls)."""
    from memoryformer.models import modeling_memoryformer

    calls = []
    fused = modeling_memoryformer.memory_block_decode_cpu

    def spy(*arguments):
        calls.append(arguments[5])  # the cache length
        return fused(*arguments)

    monkeypatch.setattr(modeling_memoryformer, "memory_block_decode_cpu", spy)
    return calls


def module_path_greedy(model, prompt, **kwargs):
    """The same greedy decode through the modules: transformers' DynamicCache never takes the fused path."""
    return greedy(model, prompt, past_key_values=DynamicCache(config=model.config), **kwargs)


VARIANTS = {
    "paper score, gelu": {"score": "paper", "temperature": 0.5, "memory_block_activation": "gelu"},
    "l1 score": {},
}


@needs_cpu_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_block_decode_gives_the_modules_tokens_and_logits(shape, variant, fused_calls):
    """generate()'s default decode runs each block as one fused operator, with the module path's greedy tokens and
    logits within fp32 tolerance, for MemoryFormer shapes of several kinds (τ 4/6/8, e 0–2, head_dim 8–32)."""
    torch.manual_seed(0)
    d, heads, layers, tau, expand = shape
    model = build_model(
        "mf-nano",
        hidden_size=d,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        tau=tau,
        expand_bits=expand,
        **VARIANTS[variant],
    ).eval()
    prompt = torch.randint(VOCAB, (1, 7))
    tokens, logits = greedy(model, prompt, new_tokens=8)
    assert fused_calls == [length for length in range(7, 14) for _ in range(layers)]  # 7 decode steps, every block
    fused_calls.clear()
    module_tokens, module_logits = module_path_greedy(model, prompt, new_tokens=8)
    assert not fused_calls
    assert torch.equal(tokens, module_tokens)
    torch.testing.assert_close(logits, module_logits, atol=1e-5, rtol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("tables", ["fp32", "bf16"])
def test_fused_block_step_matches_the_float64_block(tables):
    """One decode step of one block, fused in fp32, against the module path in float64 (the same tables, bf16 ones
    widened exactly): output and the cached keys and values."""
    from memoryformer.models.kv_cache import InPlaceKVCache
    from memoryformer.models.modeling_memoryformer import MemoryFormerBlock

    torch.manual_seed(0)
    model = to_inference_dtype(tiny(shape=SHAPES[0]), tables)
    block, rotary = model.model.layers[0], model.model.rotary_emb
    reference = copy.deepcopy(block).double()
    assert isinstance(block, MemoryFormerBlock)
    prompt, token = torch.randn(1, 9, SHAPES[0][0]), torch.randn(1, 1, SHAPES[0][0])
    fused_cache, reference_cache = InPlaceKVCache(model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        block(prompt, rotary(prompt, torch.arange(9)[None]), past_key_values=fused_cache)
        reference(prompt.double(), rotary(prompt.double(), torch.arange(9)[None]), past_key_values=reference_cache)
        assert block.fused_decode_applies(token, None, fused_cache)
        position = torch.tensor([[9]])
        out = block(token, rotary(token, position), past_key_values=fused_cache)
        expected = reference(token.double(), rotary(token.double(), position), past_key_values=reference_cache)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert fused_cache.get_seq_length() == reference_cache.get_seq_length() == 10
    for fused_layer, reference_layer in zip(fused_cache.layers[:1], reference_cache.layers[:1], strict=True):
        torch.testing.assert_close(fused_layer.keys.double(), reference_layer.keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fused_layer.values.double(), reference_layer.values, atol=2e-5, rtol=1e-5)


@needs_cpu_kernel
def test_fused_decode_is_skipped_where_it_does_not_apply(fused_calls, monkeypatch):
    """Padding (a mask), autograd and another lookup backend run the modules, with the same tokens."""
    torch.manual_seed(0)
    model = tiny()
    prompts = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # left padding: the batch needs a mask at every step
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    padded = model.generate(prompts, **kwargs)
    assert not fused_calls
    assert torch.equal(padded, model.generate(prompts, past_key_values=DynamicCache(config=model.config), **kwargs))

    block, token = model.model.layers[0], torch.randn(1, 1, SHAPES[0][0])
    cache = InPlaceKVCache(model.config)
    assert not block.fused_decode_applies(token, None, cache)  # grad mode is on outside generate
    with torch.no_grad():
        assert block.fused_decode_applies(token, None, cache)
        assert not block.fused_decode_applies(token.double(), None, cache)
        assert not block.fused_decode_applies(token, None, DynamicCache(config=model.config))
        monkeypatch.setattr(block.attention.qkv, "backend", "embedding_bag")
        assert not block.fused_decode_applies(token, None, cache)


@needs_cpu_kernel
def test_fused_operator_takes_the_operands_in_its_schema_order_and_refuses_a_full_cache():
    from memoryformer.kernels.cpu import memory_block_decode_cpu

    torch.manual_seed(0)
    block = tiny().model.layers[0]
    operands = block.fused_decode_operands()
    schema = torch.ops.memoryformer.memory_block_decode.default._schema
    names = [argument.name for argument in schema.arguments]
    assert names[:6] == ["hidden", "cos", "sin", "key_cache", "value_cache", "length"]
    assert names[6:] == list(operands)  # the positional call in fused_decode relies on this order
    d, heads = SHAPES[0][0], SHAPES[0][1]
    full = torch.zeros(1, heads, 4, d // heads)
    rotary = torch.ones(1, 1, 8), torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="no room at position 4"):
        memory_block_decode_cpu(torch.randn(1, 1, d), *rotary, full, full.clone(), 4, *operands.values())


def test_in_place_cache_holds_what_dynamic_cache_holds(monkeypatch):
    """Appends (past its capacity), crop, batch selection, beam reordering and reset, against DynamicCache."""
    from memoryformer.models import kv_cache

    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 4)  # so that a few appends outgrow the buffer
    torch.manual_seed(0)
    in_place, dynamic = kv_cache.InPlaceKVCache(), DynamicCache()

    def same() -> None:
        assert in_place.get_seq_length() == dynamic.get_seq_length()
        for mine, theirs in zip(in_place.layers, dynamic.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)

    def append(tokens: int) -> None:
        k, v = torch.randn(3, 2, tokens, 8), torch.randn(3, 2, tokens, 8)
        outputs = in_place.update(k, v, 0), dynamic.update(k, v, 0)
        for mine, theirs in zip(*outputs, strict=True):
            assert torch.equal(mine, theirs)

    append(3)
    buffer = in_place.layers[0].key_buffer
    append(1)
    assert in_place.layers[0].key_buffer is buffer  # appended in place
    append(5)  # outgrows the capacity: a new buffer, the old contents kept
    assert in_place.layers[0].key_buffer is not buffer
    same()
    in_place.crop(-2), dynamic.crop(-2)
    same()
    with pytest.raises(ValueError, match="not supported"):  # DynamicCache's legacy positive form
        in_place.crop(5)
    append(1)
    same()
    beams = torch.tensor([2, 0, 0])
    in_place.reorder_cache(beams), dynamic.reorder_cache(beams)
    append(2)
    same()
    in_place.batch_select_indices(torch.tensor([1])), dynamic.batch_select_indices(torch.tensor([1]))
    same()
    in_place.reset(), dynamic.reset()
    assert in_place.get_seq_length() == 0
    k = torch.randn(1, 2, 3, 8)
    assert torch.equal(in_place.update(k, k, 0)[0], k)


def test_pythia_decodes_the_same_with_the_in_place_cache():
    """The in-place cache is common machinery: the baseline gives DynamicCache's tokens and logits with it."""
    torch.manual_seed(0)
    model = tiny("pythia-14m")
    prompt = torch.randint(VOCAB, (1, 7))
    tokens, logits = module_path_greedy(model, prompt)
    in_place_tokens, in_place_logits = greedy(model, prompt, past_key_values=InPlaceKVCache(model.config))
    assert torch.equal(in_place_tokens, tokens)
    torch.testing.assert_close(in_place_logits, logits, atol=1e-6, rtol=1e-6)


@needs_cpu_kernel
def test_a_compiled_config_leaves_the_model_decoding_eagerly(fused_calls):
    """``generate`` fills a passed config's unset fields from the model's own, so the compiled variant is a separate
    config and the model's stays eager (the benchmark times both paths of one model)."""
    model = tiny()
    compiled = compiled_generation_config(model.generation_config)
    assert compiled.cache_implementation == "static" and compiled.compile_config is decode.COMPILE_CONFIG
    assert model.generation_config.cache_implementation is None and model.generation_config.compile_config is None
    greedy(model, torch.randint(VOCAB, (1, 5)), generation_config=copy.deepcopy(model.generation_config))
    assert fused_calls  # the eager default: in-place cache, fused blocks


def test_training_forward_with_the_default_cache_has_the_uncached_gradients():
    """A forward with ``use_cache`` (the config default) now fills an InPlaceKVCache, whose in-place copies autograd
    must see through: loss and gradients equal those of a forward without a cache."""
    torch.manual_seed(0)
    model = tiny().train()
    ids = torch.randint(VOCAB, (2, 9))
    results = []
    for use_cache in (True, False):
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, use_cache=use_cache)
        out.loss.backward()
        assert isinstance(out.past_key_values, InPlaceKVCache) == use_cache
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (cached_loss, cached_grads), (loss, grads) = results
    assert torch.equal(cached_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=0, rtol=0, msg=name)
