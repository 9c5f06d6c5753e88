"""The models of spec §3–4: Pythia baselines, MemoryFormer as a transformers model, the registry, Hydra configs."""

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.dynamic_module_utils import get_imports

from memoryformer.config import CONF_DIR, compose_config
from memoryformer.kernels import memory_lookup_reference
from memoryformer.models import (
    MemoryFormerForCausalLM,
    build_model,
    build_model_from_config,
    list_models,
    model_config,
    model_config_from_config,
    model_spec,
    parameter_count,
    recommended_lr,
)
from memoryformer.models.export import bundle_sources
from memoryformer.models.registry import MEMORYFORMER_KNOBS

PYTHIA = ["pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m"]
MEMORYFORMER = ["mf-nano", "mf-micro", "mf-tiny", "mf-small", "mf-base"]
BACKEND = "embedding_bag"  # explicit: tests must not depend on which fused kernels compile here
f64 = torch.float64


def nano(**overrides) -> MemoryFormerForCausalLM:
    return build_model("mf-nano", lookup_backend=BACKEND, **overrides)


def small_nano() -> MemoryFormerForCausalLM:
    """mf-nano with a 512-token vocabulary and τ=4 (K=32): the same model code at 3.5M instead of 39M parameters."""
    return nano(vocab_size=512, tau=4)


# --- registry ---------------------------------------------------------------------------------------------------


def test_list_models_names_every_model_once():
    assert list_models() == MEMORYFORMER + PYTHIA
    assert list_models("pythia") == PYTHIA
    assert list_models("memoryformer") == MEMORYFORMER


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'mf-huge'") as error:
        build_model("mf-huge")
    assert all(name in str(error.value) for name in list_models())


@pytest.mark.parametrize(("name", "key"), [("mf-nano", "intermediate_size"), ("pythia-14m", "tau")])
def test_unknown_override_names_the_valid_keys(name, key):
    with pytest.raises(ValueError, match=rf"unknown override\(s\) \['{key}'\].*valid keys.*hidden_size"):
        model_config(name, **{key: 1})


def test_recommended_lr_follows_spec_section_4():
    assert recommended_lr("pythia-70m") == (1e-3, 1e-4)
    assert recommended_lr("pythia-160m") == (6e-4, 6e-5)
    assert recommended_lr("pythia-410m") == (3e-4, 3e-5)
    assert recommended_lr("mf-tiny") == pytest.approx((3e-3, 3e-5))
    assert recommended_lr("mf-small") == pytest.approx((1.8e-3, 3e-5))
    assert recommended_lr("mf-base") == pytest.approx((9e-4, 3e-5))
    for name in MEMORYFORMER:  # the paper's rule: 3× the paired Pythia's LR
        baseline = model_spec(name).baseline
        assert recommended_lr(name)[0] == pytest.approx(3 * recommended_lr(baseline)[0])
    assert [model_spec(n).baseline for n in MEMORYFORMER] == PYTHIA


# --- Pythia -----------------------------------------------------------------------------------------------------

# EleutherAI/pythia-70m-deduped config.json as published (sizes differ per model, nothing else).
PUBLISHED_PYTHIA_70M = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 512,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 8,
    "num_hidden_layers": 6,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}


@pytest.mark.parametrize("name", PYTHIA)
def test_pythia_parameter_count_is_the_published_one(name):
    assert parameter_count(name) == model_spec(name).published_params


def test_pythia_config_equals_the_published_config_json():
    ours = model_config("pythia-70m")
    published = GPTNeoXConfig(**{k: v for k, v in PUBLISHED_PYTHIA_70M.items() if k != "model_type"})
    assert isinstance(ours, GPTNeoXConfig)
    assert ours.to_dict() == published.to_dict()


def test_pythia_model_is_transformers_gpt_neox_with_its_default_layout():
    ours = build_model("pythia-14m")
    assert type(ours) is GPTNeoXForCausalLM
    reference = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            **{**PUBLISHED_PYTHIA_70M, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512}
        )
    )
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert ours.lm_head.weight.data_ptr() != ours.gpt_neox.embed_in.weight.data_ptr()  # untied


def test_pythia_from_scratch_init_is_small_and_wang_init():
    model = build_model("pythia-14m")
    d, layers = 128, 6
    small, wang = math.sqrt(2 / (5 * d)), 2 / (layers * math.sqrt(d))
    block = model.gpt_neox.layers[0]
    for weight, std in [
        (model.gpt_neox.embed_in.weight, small),
        (model.lm_head.weight, small),
        (block.attention.query_key_value.weight, small),
        (block.mlp.dense_h_to_4h.weight, small),
        (block.attention.dense.weight, wang),
        (block.mlp.dense_4h_to_h.weight, wang),
    ]:
        assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(block.attention.dense.bias == 0) and torch.all(block.mlp.dense_h_to_4h.bias == 0)
    assert torch.all(block.input_layernorm.weight == 1) and torch.all(block.input_layernorm.bias == 0)


# --- MemoryFormer configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "layers", "d", "heads", "k"), [
    ("mf-nano", 6, 128, 4, 16),
    ("mf-micro", 6, 256, 8, 32),
    ("mf-tiny", 6, 512, 8, 64),
    ("mf-small", 12, 768, 12, 96),
    ("mf-base", 24, 1024, 16, 128),
])  # fmt: skip
def test_memoryformer_sizes_are_the_spec_tables(name, layers, d, heads, k):
    config = model_config(name)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, d, heads)
    assert (config.tau, config.num_chunks, config.expand_bits) == (8, k, 2)
    assert (config.vocab_size, config.rotary_pct, config.tie_word_embeddings) == (50304, 0.25, False)


def test_memoryformer_parameter_counts_match_the_spec():
    assert parameter_count("mf-tiny") == pytest.approx(467e6, rel=2e-3)  # spec §4: ≈ 467M
    assert parameter_count("mf-base") == pytest.approx(6.75e9, rel=2e-3)  # ≈ 6.75B


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hidden_size": 130}, "hidden_size=130 is not divisible by tau=8"),
    ({"num_chunks": 15}, r"d = K·τ.*set num_chunks=16"),
    ({"num_attention_heads": 5}, r"num_attention_heads=5 does not divide hidden_size=128; choose one of \[1, 2, 4"),
    ({"hidden_size": 510, "tau": 10, "num_attention_heads": 6}, r"21 is odd.*\[3, 10, 15, 30, 51\]"),
    ({"score": "cosine"}, "score must be one of"),
    ({"lookup_backend": "cuda"}, "lookup_backend must be one of"),
    ({"memory_block_activation": "relu"}, "memory_block_activation must be one of"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"tau": 8.0}, "tau must be a positive integer"),
])  # fmt: skip
def test_bad_memoryformer_configs_fail_early_and_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_config("mf-nano", **overrides)


def test_table3_tau10_config_is_constructible():
    """Table 3's (τ=10, K=51) row has d=510; 8 heads do not divide it: 10 heads give head dim 51, 12 rotary dims."""
    config = model_config("mf-tiny", hidden_size=510, tau=10, num_attention_heads=10)
    assert (config.num_chunks, config.head_dim, config.rotary_ndims) == (51, 51, 12)


def test_tau_override_derives_k():
    assert model_config("mf-tiny", tau=4).num_chunks == 128


def test_every_knob_reaches_the_layers():
    with torch.device("meta"):
        model = build_model(
            "mf-nano",
            tau=4,
            expand_bits=1,
            score="paper",
            temperature=0.5,
            memory_block_activation="gelu",
            lookup_backend="reference",
        )
    block = model.model.layers[0]
    qkv, ml1, ml2 = block.attention.qkv, block.memory_block.ml1, block.memory_block.ml2
    assert (qkv.tau, qkv.num_chunks, qkv.out_features) == (4, 32, 3 * 128)
    assert (ml1.out_features, ml2.tau) == (32 * 5, 5)
    assert {(m.score, m.temperature, m.backend) for m in (qkv, ml1, ml2)} == {("paper", 0.5, "reference")}
    assert isinstance(block.memory_block.act, torch.nn.GELU)


# --- MemoryFormer model ------------------------------------------------------------------------------------------


def test_forward_backward_on_cpu_reaches_every_table_and_bias():
    model = nano()
    tokens = torch.randint(0, 50304, (2, 32))
    out = model(tokens, labels=tokens)
    assert out.logits.shape == (2, 32, 50304)
    assert math.isfinite(out.loss.item())
    assert abs(out.loss.item() - math.log(50304)) < 1.0  # a fresh model is near-uniform
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    tables = [n for n, _ in model.named_parameters() if n.endswith(("tables", "qkv.bias", "ml1.bias", "ml2.bias"))]
    assert len(tables) == 6 * 3 * 2


def test_fresh_init_follows_spec_section_3():
    model = nano()
    small = math.sqrt(2 / (5 * 128))
    block = model.model.layers[0]
    for tensor, std in [
        (block.attention.qkv.tables, small),
        (block.memory_block.ml1.tables, 0.02),
        (block.memory_block.ml2.tables, 0.02),
        (block.attention.qkv.bias, 0.001),
        (model.model.embed_tokens.weight, small),
        (model.lm_head.weight, small),
    ]:
        assert tensor.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(block.attention_norm.scale == 1) and torch.all(model.model.norm.scale == 1)
    assert torch.all(block.memory_block.norm.weight == 1) and torch.all(block.memory_block.norm.bias == 0)


def reference_logits(model: MemoryFormerForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """Spec §3 in plain PyTorch (explicit rotary and softmax attention, reference lookup), reading the model's
    parameters; the norms are the layers' own RMSNorm (tested in test_layers.py)."""
    config = model.config
    d, heads, r = config.hidden_size, config.num_attention_heads, config.rotary_ndims
    head_dim = d // heads
    batch, seq = tokens.shape

    def lookup(layer, v):
        y = memory_lookup_reference(v.reshape(-1, layer.in_features), layer.tables, layer.bias, layer.tau)
        return y.reshape(batch, seq, -1)

    angles = torch.arange(seq, dtype=f64)[:, None] * config.rotary_emb_base ** (-torch.arange(0, r, 2, dtype=f64) / r)

    def rotary(t):  # GPT-NeoX rotate_half on the first r dims: pairs (i, i + r/2)
        t1, t2, rest = t[..., : r // 2], t[..., r // 2 : r], t[..., r:]
        return torch.cat([t1 * angles.cos() - t2 * angles.sin(), t2 * angles.cos() + t1 * angles.sin(), rest], -1)

    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    x = model.model.embed_tokens.weight[tokens]
    for block in model.model.layers:
        qkv = lookup(block.attention.qkv, block.attention_norm(x))  # ONE hash for Q, K and V
        q, k, v = (t.reshape(batch, seq, heads, head_dim).transpose(1, 2) for t in qkv.split(d, -1))
        scores = (rotary(q) @ rotary(k).transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(causal, -math.inf)
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, d)  # no W_O
        mb = block.memory_block
        h = lookup(mb.ml1, block.memory_block_norm(x))
        x = x + lookup(mb.ml2, F.layer_norm(h, (h.shape[-1],), mb.norm.weight, mb.norm.bias, mb.norm.eps))
    return model.model.norm(x) @ model.lm_head.weight.T


def test_model_equals_the_plain_pytorch_reference_in_float64():
    model = small_nano().to(f64).eval()
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference_logits(model, tokens), rtol=1e-10, atol=1e-10)


def test_eager_attention_equals_sdpa_and_returns_weights():
    model = small_nano().to(f64).eval()
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        sdpa = model(tokens).logits
        model.set_attn_implementation("eager")
        eager = model(tokens, output_attentions=True)
    # GPT-NeoX's eager attention takes its softmax in fp32 even for fp64 inputs
    torch.testing.assert_close(eager.logits, sdpa, rtol=1e-5, atol=1e-6)
    assert len(eager.attentions) == 6 and eager.attentions[0].shape == (2, 4, 12, 12)


def test_shared_qkv_table_equals_three_memory_layers_with_one_hash():
    qkv = small_nano().model.layers[0].attention.qkv.to(f64)
    a = torch.randn(10, 128, dtype=f64)
    d = 128
    separate = [
        memory_lookup_reference(a, qkv.tables[:, i * d : (i + 1) * d], qkv.bias[i * d : (i + 1) * d], qkv.tau)
        for i in range(3)
    ]
    torch.testing.assert_close(qkv(a), torch.cat(separate, -1), rtol=0, atol=1e-12)


def test_cached_greedy_decoding_equals_uncached():
    model = small_nano().eval()
    prompt = torch.randint(0, 512, (1, 6))
    cached = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (1, 18)
    assert torch.equal(cached, uncached)


def test_incremental_logits_with_cache_equal_full_forward():
    model = small_nano().to(f64).eval()
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        full = model(tokens).logits
        cache = DynamicCache(config=model.config)
        steps = [model(tokens[:, :6], past_key_values=cache, use_cache=True).logits]
        steps += [model(tokens[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = small_nano().to(f64).eval()
    short, long = torch.randint(1, 512, (1, 4)), torch.randint(1, 512, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.tensor([[0, 0, 0, 1, 1, 1, 1]]), torch.ones(1, 7, dtype=torch.long)])
    together = model.generate(
        batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )
    for row, prompt in enumerate([short, long]):
        alone = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, -6:], alone[0, -6:])


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    model = small_nano().to(f64)
    tokens = torch.randint(0, 512, (2, 8))
    calls = []
    model.model.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    model(tokens, labels=tokens).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    model(tokens, labels=tokens, use_cache=False).loss.backward()
    assert len(calls) == 1 + 2  # the checkpointed block ran again in the backward pass
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-10, atol=1e-12, msg=name)


# --- save / load --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_nano(tmp_path_factory):
    """A saved mf-nano checkpoint (small vocab) and the logits it gives on fixed tokens."""
    torch.manual_seed(0)
    model = small_nano().eval()
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        logits = model(tokens).logits
    path = tmp_path_factory.mktemp("ckpt") / "mf-nano"
    model.save_pretrained(path)
    torch.save({"tokens": tokens, "logits": logits}, path.parent / "expected.pt")
    return model, path


def test_save_pretrained_round_trip_is_exact(saved_nano):
    model, path = saved_nano
    assert (path / "model.safetensors").is_file()
    loaded_config = AutoConfig.from_pretrained(path).to_dict()
    assert loaded_config.pop("_name_or_path") == str(path)
    assert loaded_config == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is MemoryFormerForCausalLM
    expected = torch.load(path.parent / "expected.pt")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(expected["tokens"]).logits, expected["logits"])


def test_checkpoint_ships_its_code_without_package_imports(saved_nano):
    _, path = saved_nano
    config = AutoConfig.from_pretrained(path)
    assert config.auto_map == {
        "AutoConfig": "configuration_memoryformer.MemoryFormerConfig",
        "AutoModelForCausalLM": "modeling_memoryformer.MemoryFormerForCausalLM",
    }
    shipped = {p.name for p in path.glob("*.py")}
    assert shipped == set(bundle_sources())
    for file in path.glob("*.py"):  # what transformers' check_imports requires to be installed
        allowed = {"__future__", "ast", "collections", "functools", "math", "os", "pathlib", "re", "tempfile", "typing"}
        assert set(get_imports(file)) <= allowed | {"torch", "transformers"}, file.name


REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockMemoryformer(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "memoryformer" or name.startswith("memoryformer."):
                raise ImportError(f"the checkpoint's code imported {name}")

    sys.meta_path.insert(0, BlockMemoryformer())
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, expected, resave = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, lookup_backend="auto").eval()
    expected = torch.load(expected)
    with torch.no_grad():
        assert torch.equal(model(expected["tokens"]).logits, expected["logits"]), "logits differ"
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert not any(m == "memoryformer" or m.startswith("memoryformer.") for m in sys.modules)
    model.save_pretrained(resave)  # remote code re-saves itself, loadable again
    again = AutoModelForCausalLM.from_pretrained(resave, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(again(expected["tokens"]).logits, expected["logits"]), "re-saved logits differ"
    print("remote code OK")
    """
)


def test_trust_remote_code_load_in_a_fresh_process_without_the_package(saved_nano, tmp_path):
    """How lm-eval's CLI and any Hugging Face user load it: the checkpoint's own code, never `memoryformer`;
    the bundled lookup degrades from "auto" to embedding_bag and gives identical logits."""
    _, path = saved_nano
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(path), str(path.parent / "expected.pt"), str(tmp_path / "resaved")],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout


TOKENIZER_LOAD = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockMemoryformer(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "memoryformer" or name.startswith("memoryformer."):
                raise ImportError(f"loading the tokenizer imported {name}")

    blocker = BlockMemoryformer()
    sys.meta_path.insert(0, blocker)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    checkpoint = sys.argv[1]
    ways = {
        "PreTrainedTokenizerFast": lambda: PreTrainedTokenizerFast.from_pretrained(checkpoint),
        "trust_remote_code=False": lambda: AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False),
        "trust_remote_code=True": lambda: AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True),
    }
    for way, load in ways.items():
        print(f"{way}: {load()('hello world').input_ids}")
    sys.meta_path.remove(blocker)
    import memoryformer.models  # registers the architecture: nothing remote left to ask about
    print(f"package imported: {AutoTokenizer.from_pretrained(checkpoint)('hello world').input_ids}")
    """
)


def test_saved_tokenizer_loads_without_a_remote_code_question(saved_nano, tmp_path):
    """Issue 11: a checkpoint's tokenizer needs no custom code, but transformers reads config.json first and asks
    about the custom architecture (as for any custom-code checkpoint). The README's four ways never ask, and all
    give the same ids; stdin is closed, so a question would show in the output."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    checkpoint = tmp_path / "model"
    shutil.copytree(saved_nano[1], checkpoint)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(checkpoint)
    env = os.environ | {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TOKENIZER_LOAD, str(checkpoint)],
        stdin=subprocess.DEVNULL, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr
    ids = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": [" in line)
    ways = ["PreTrainedTokenizerFast", "trust_remote_code=False", "trust_remote_code=True", "package imported"]
    assert ids == dict.fromkeys(ways, "[1, 2]")


# --- Hydra --------------------------------------------------------------------------------------------------------


def test_every_registered_model_has_a_hydra_config():
    assert {p.stem for p in (CONF_DIR / "model").glob("[!_]*.yaml")} == set(list_models())
    for name in list_models():
        assert compose_config([f"model={name}"]).model.name == name


def test_hydra_overrides_reach_the_model_config():
    cfg = compose_config(["model=mf-tiny", "model.tau=4", "model.memory_block_activation=gelu"])
    config = model_config_from_config(cfg.model)
    assert (config.tau, config.num_chunks, config.hidden_size) == (4, 128, 512)
    assert config.memory_block_activation == "gelu"
    pythia = model_config_from_config(compose_config(["model=pythia-70m", "model.max_position_embeddings=4096"]).model)
    assert (pythia.hidden_size, pythia.max_position_embeddings) == (512, 4096)


def test_hydra_memoryformer_defaults_expose_every_knob():
    not_knobs = {"use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"}
    node = compose_config(["model=mf-nano"]).model
    assert set(node) - {"name"} == set(MEMORYFORMER_KNOBS) - not_knobs
    assert all(node[key] is None for key in node if key != "name")  # numbers live only in the registry


def test_build_model_from_the_default_root_config():
    cfg = compose_config([f"model.lookup_backend={BACKEND}", "model.vocab_size=256"])
    model = build_model_from_config(cfg.model)
    assert isinstance(model, MemoryFormerForCausalLM)
    assert (model.config.hidden_size, model.config.vocab_size) == (128, 256)


def test_model_config_without_name_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a `name`"):
        build_model_from_config({"tau": 8})
