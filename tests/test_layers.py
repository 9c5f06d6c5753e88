"""The method of spec §1–2, checked against the spec's golden numbers, on every lookup backend."""

import itertools

import pytest
import torch

from memoryformer.kernels import memory_lookup
from memoryformer.layers import (
    MemoryBlock,
    MemoryLayer,
    RMSNorm,
    block_table_bytes,
    chunk_codes,
    chunk_weights,
    hash_chunks,
    table_bytes,
)

BACKENDS = ["reference", "embedding_bag", "cpu", "triton"]
f64 = torch.float64


def t(values):
    return torch.tensor(values, dtype=f64)


# --- golden A, C, D: one chunk -------------------------------------------------------------------


def test_golden_a_code_is_msb_first():
    assert chunk_codes(t([[0.7, -0.1]])).item() == 2  # LSB-first would give 1


def test_golden_a_weight_and_gradient():
    z = t([0.7, -0.1]).requires_grad_()
    w = chunk_weights(z)
    torch.testing.assert_close(w, t(0.352854379), atol=1e-9, rtol=0)
    (grad,) = torch.autograd.grad(w, z)
    torch.testing.assert_close(grad, t([0.580668536, -0.758754065]), atol=1e-9, rtol=0)
    p = torch.sigmoid(2 * z.detach().abs()).prod()
    torch.testing.assert_close(p, t(0.441067974), atol=1e-9, rtol=0)


def test_golden_a_paper_variant():
    z = t([0.7, -0.1]).requires_grad_()
    p = chunk_weights(z, "paper", 1.0)
    (grad,) = torch.autograd.grad(p, z)
    torch.testing.assert_close(grad, t([0.174500703, -0.397107614]), atol=1e-9, rtol=0)
    torch.testing.assert_close(chunk_weights(z.detach(), "paper", 0.5), t(0.564368383), atol=1e-9, rtol=0)
    torch.testing.assert_close(chunk_weights(z.detach(), "paper", 2.0), t(0.350784674), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "z, code, weight",
    [
        ([-1.1, -2.7, 0.6], 1, 3.030514303),
        ([3.4, -1.9, -2.3], 4, 7.351535650),
        ([3.1, 0.6, 0.1], 7, 1.602479882),
    ],
)
def test_golden_c_paper_figure_3(z, code, weight):
    assert chunk_codes(t([z])).item() == code
    torch.testing.assert_close(chunk_weights(t(z)), t(weight), atol=1e-9, rtol=0)


def test_golden_d_zero_input_edge():
    z = t([0.0, -1.0]).requires_grad_()
    assert chunk_codes(z.detach()[None]).item() == 2  # z = 0 counts as bit 1
    w = chunk_weights(z)
    torch.testing.assert_close(w, t(0.440398539), atol=1e-9, rtol=0)
    (grad,) = torch.autograd.grad(w, z)
    torch.testing.assert_close(grad, t([0.0, -0.545392124]), atol=1e-9, rtol=0)


# --- golden B: a whole layer, every backend -----------------------------------------------------


def golden_b_tables() -> torch.Tensor:
    r = torch.arange(8, dtype=f64) + 1
    return torch.stack([r, 10 * r], dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_b_forward_and_gradients(backend):
    x = t([[0.7, -0.1, -0.5, 0.2]]).requires_grad_()
    tables = golden_b_tables().requires_grad_()
    bias = torch.zeros(2, dtype=f64, requires_grad=True)
    rows, weights = hash_chunks(x.detach(), tau=2)
    assert rows.tolist() == [[2, 5]]
    torch.testing.assert_close(weights, t([[0.352854379, 0.306373025]]), atol=1e-9, rtol=0)

    y = memory_lookup(x, tables, bias, tau=2, backend=backend)
    torch.testing.assert_close(y, t([[2.896801287, 28.968012870]]), atol=1e-8, rtol=0)
    y.sum().backward()
    torch.testing.assert_close(
        x.grad, t([[19.162061702, -25.038884141, -39.762923865, 45.116167855]]), atol=1e-8, rtol=0
    )
    expected = torch.zeros(8, 2, dtype=f64)
    expected[2] = 0.352854379
    expected[5] = 0.306373025
    torch.testing.assert_close(tables.grad, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(bias.grad, t([1.0, 1.0]))


def test_golden_b_grad_of_weights():
    """∂L/∂w_k = ⟨g, T[r_k]⟩ = [33, 66] for L = y₀ + y₁."""
    rows = torch.tensor([[2, 5]])
    weights = t([[0.352854379, 0.306373025]]).requires_grad_()
    y = (weights[..., None] * golden_b_tables()[rows]).sum(1)
    (grad,) = torch.autograd.grad(y.sum(), weights)
    torch.testing.assert_close(grad, t([[33.0, 66.0]]))


# --- the paper variant is a softmax over sign patterns ------------------------------------------


@pytest.mark.parametrize("tau", [1, 2, 3, 4])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_paper_score_is_softmax_over_all_sign_patterns(tau, temperature):
    z = torch.randn(16, 1, tau, dtype=f64)
    patterns = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=tau)), dtype=f64)  # [2^τ, τ]
    logits = torch.einsum("nkt,pt->nkp", z, patterns) / temperature
    softmax = logits.softmax(-1)
    # the chosen bucket is the pattern equal to sign(z); its softmax probability is the paper's score
    chosen = (patterns[None, None] == torch.where(z >= 0, 1.0, -1.0)[:, :, None]).all(-1)
    torch.testing.assert_close(softmax[chosen].reshape(16, 1), chunk_weights(z, "paper", temperature))


# --- gradcheck and random agreement -------------------------------------------------------------


@pytest.mark.parametrize("score", ["l1", "paper"])
def test_gradcheck_reference(score):
    x = torch.randn(5, 8, dtype=f64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # stay away from z = 0, where |z| has a kink
    tables = torch.randn(4 * 2**2, 3, dtype=f64, requires_grad=True)
    bias = torch.randn(3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: memory_lookup(a, b, c, 2, score, 0.7, backend="reference"), (x, tables, bias)
    )


def test_leading_shape_and_dtype_like_linear():
    layer = MemoryLayer(16, 24, tau=4)
    x = torch.randn(2, 3, 5, 16)
    y = layer(x)
    assert y.shape == (2, 3, 5, 24) and y.dtype == x.dtype
    reference = memory_lookup(x.reshape(-1, 16), layer.tables, layer.bias, 4, backend="reference")
    torch.testing.assert_close(y.reshape(-1, 24), reference)


def test_low_precision_tables_accumulate_in_fp32():
    tables = torch.randn(4 * 16, 8).bfloat16()
    x = torch.randn(7, 16)
    y = memory_lookup(x, tables, None, 4, backend="reference")
    assert y.dtype == torch.float32
    exact = memory_lookup(x.double(), tables.double(), None, 4, backend="reference")
    torch.testing.assert_close(y.double(), exact, atol=1e-5, rtol=1e-5)


def test_codes_use_integer_ops_for_wide_chunks():
    """τ = 16: codes up to 65535 must be exact even though fp16 cannot hold them."""
    z = torch.where(torch.rand(64, 1, 16) > 0.5, 1.0, -1.0).half()
    codes = chunk_codes(z)
    assert codes.dtype == torch.int64
    expected = [int("".join("1" if v >= 0 else "0" for v in row[0].tolist()), 2) for row in z]
    assert codes.squeeze(1).tolist() == expected


def test_initialisation():
    layer = MemoryLayer(64, 512, tau=8)
    assert layer.tables.shape == (8 * 256, 512)
    assert abs(layer.tables.std().item() - 0.02) < 1e-3
    assert abs(layer.bias.std().item() - 0.001) < 3e-4


# --- Memory Block -------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_memory_block_shapes_and_composition(activation):
    block = MemoryBlock(d=32, tau=4, expand_bits=2, activation=activation, backend="reference")
    assert block.ml1.out_features == 8 * 6 and block.ml2.tau == 6 and block.ml2.tables.shape == (8 * 64, 32)
    x = torch.randn(3, 5, 32)
    hidden = block.ml1(x)
    if activation == "gelu":
        hidden = torch.nn.functional.gelu(hidden)
    expected = block.ml2(block.norm(hidden))
    torch.testing.assert_close(block(x), expected)


def test_rmsnorm_eps_outside_sqrt():
    norm = RMSNorm(4, eps=0.5)
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    rms = (25 / 4) ** 0.5
    torch.testing.assert_close(norm(x), x / (rms + 0.5))


# --- memory accounting: the paper's Tables 3 and 5 ---------------------------------------------


@pytest.mark.parametrize("expand_bits, megabytes", [(0, 33.6), (1, 52.4), (2, 88.1), (3, 157.3)])
def test_table_5_block_memory(expand_bits, megabytes):
    assert round(block_table_bytes(512, 8, expand_bits) / 1e6, 1) == megabytes


def test_table_3_layer_q_memory():
    assert round(table_bytes(512, 512, 4) / 1e6, 1) == 2.1
    assert round(table_bytes(512, 512, 8) / 1e6, 1) == 16.8
    # τ=10, K=51 hashes d=510; the paper's 53.5 MB corresponds to 512 output features (510 gives 53.3).
    assert round(table_bytes(510, 512, 10) / 1e6, 1) == 53.5
    assert round(table_bytes(510, 510, 10) / 1e6, 1) == 53.3


# --- bad input ----------------------------------------------------------------------------------


def test_in_features_not_divisible_by_tau():
    with pytest.raises(ValueError, match=r"in_features=100 is not divisible by tau=8.*96 or 104"):
        MemoryLayer(100, 10, tau=8)


def test_tau_too_large_names_the_cost():
    with pytest.raises(ValueError, match=r"tau=30 .* GB, above the limit"):
        MemoryLayer(60, 512, tau=30)


def test_wrong_input_width():
    with pytest.raises(ValueError, match=r"in_features=16, got shape \(3, 12\)"):
        MemoryLayer(16, 8, tau=4)(torch.randn(3, 12))


def test_integer_input():
    with pytest.raises(TypeError, match="floating-point input"):
        MemoryLayer(16, 8, tau=4)(torch.ones(3, 16, dtype=torch.long))


def test_bad_score_and_backend():
    with pytest.raises(ValueError, match="score must be one of"):
        MemoryLayer(16, 8, tau=4, score="softmax")
    with pytest.raises(ValueError, match="unknown lookup backend 'gpu'"):
        MemoryLayer(16, 8, tau=4, backend="gpu")
