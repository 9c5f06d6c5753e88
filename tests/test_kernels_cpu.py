"""The fused CPU operator (kernels/cpu.py + csrc/memory_lookup.cpp) against the plain-PyTorch reference (spec §1).

The first run compiles the operator (~40 s, once per machine and source version); later runs load the cached build.
"""

import threading
import time

import pytest
import torch

from memoryformer.kernels import cpu, memory_lookup_reference
from memoryformer.kernels.cpu import cpu_kernel_available, memory_lookup_cpu
from memoryformer.layers import MemoryLayer

f64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if not cpu_kernel_available():
        pytest.skip("the fused CPU kernel did not build here (see the logged compiler error)")


def make_inputs(tau, num_chunks, h, n, dtype=f64, table_dtype=None, bias=True, zero_fraction=0.1):
    """x [n, K·τ] with some exact zeros (bit 1, zero gradient), tables [K·2^τ, h], bias [h] or None."""
    x = torch.randn(n, num_chunks * tau, dtype=dtype)
    x[torch.rand(x.shape) < zero_fraction] = 0
    tables = (0.5 * torch.randn(num_chunks << tau, h, dtype=f64)).to(table_dtype or dtype)
    b = torch.randn(h, dtype=dtype) if bias else None
    return x, tables, b


def lookup_and_grads(fn, x, tables, bias, tau, score, temperature, grad_y):
    """y and the gradients of <y, grad_y> w.r.t. every input, from fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, tables, bias) if t is not None]
    x_, tables_, *rest = leaves
    y = fn(x_, tables_, rest[0] if rest else None, tau, score, temperature)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), [leaf.grad for leaf in leaves]


CASES = [  # tau, K, h, N, score, temperature, bias
    (2, 3, 5, 1, "l1", 1.0, True),
    (4, 5, 70, 7, "paper", 0.5, True),
    (8, 3, 33, 130, "l1", 1.0, False),
    (10, 2, 65, 7, "paper", 2.0, True),
    (8, 9, 96, 130, "paper", 1.0, False),  # K not a multiple of the 8-row sweep
    (4, 16, 200, 64, "l1", 1.0, True),
    (4, 32, 1030, 1, "l1", 1.0, True),  # decode-sized, h not a multiple of the 8-lane vectors
]


@pytest.mark.parametrize("tau, num_chunks, h, n, score, temperature, bias", CASES)
def test_matches_reference_float64(tau, num_chunks, h, n, score, temperature, bias):
    x, tables, b = make_inputs(tau, num_chunks, h, n, bias=bias)
    grad_y = torch.randn(n, h, dtype=f64)
    y, grads = lookup_and_grads(memory_lookup_cpu, x, tables, b, tau, score, temperature, grad_y)
    y_ref, grads_ref = lookup_and_grads(memory_lookup_reference, x, tables, b, tau, score, temperature, grad_y)
    assert y.dtype == f64
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert grad.dtype == grad_ref.dtype
        torch.testing.assert_close(grad, grad_ref, atol=1e-11, rtol=1e-11)
    assert (grads[0][x == 0] == 0).all()  # ∂w/∂z = 0 at z = 0


@pytest.mark.parametrize("table_dtype, atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5)])
@pytest.mark.parametrize("score, temperature", [("l1", 1.0), ("paper", 0.7)])
def test_low_precision_tables_accumulate_in_fp32(table_dtype, atol, score, temperature):
    """fp32 x with fp32/bf16/fp16 tables: fp32 output and x gradient; table gradient in the tables' dtype."""
    tau, num_chunks, h, n = 8, 9, 72, 33
    x, tables, b = make_inputs(tau, num_chunks, h, n, dtype=torch.float32, table_dtype=table_dtype)
    grad_y = torch.randn(n, h)
    y, (gx, gt, gb) = lookup_and_grads(memory_lookup_cpu, x, tables, b, tau, score, temperature, grad_y)
    # The exact answer for these (already rounded) tables: the reference in fp64.
    y64, (gx64, gt64, gb64) = lookup_and_grads(
        memory_lookup_reference, x.double(), tables.double(), b.double(), tau, score, temperature, grad_y
    )
    assert y.dtype == gx.dtype == torch.float32 and gt.dtype == table_dtype
    scale = y64.abs().max()
    torch.testing.assert_close(y.double(), y64, atol=atol * scale, rtol=0)
    torch.testing.assert_close(gx.double(), gx64, atol=atol * gx64.abs().max(), rtol=0)
    # fp32 accumulation, then one rounding to the tables' dtype
    torch.testing.assert_close(gt, gt64.to(table_dtype), atol=atol * gt64.abs().max(), rtol=1e-2)
    torch.testing.assert_close(gb.double(), gb64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tau, num_chunks, h, n", [(8, 64, 512, 1), (8, 16, 200, 37), (4, 32, 1030, 3)])
def test_bf16_tables_are_within_bf16_rounding_of_the_unrounded_fp64_reference(tau, num_chunks, h, n):
    """bf16 tables (issue 15) against the fp64 answer for the *unrounded* tables, forward and backward.

    Each table value is off by at most 2^-8 of itself (bf16 keeps 8 significant bits), and the weights are
    positive, so |y - y64| ≤ 2^-8 · Σ_k w_k·|T[r_k]| = 2^-8 · (the reference lookup of |T|), plus fp32 rounding.
    """
    x, tables64, b = make_inputs(tau, num_chunks, h, n, dtype=torch.float32, table_dtype=f64)
    grad_y = torch.randn(n, h)
    y, (gx, gt, _) = lookup_and_grads(memory_lookup_cpu, x, tables64.bfloat16(), b, tau, "l1", 1.0, grad_y)
    y64, (gx64, gt64, _) = lookup_and_grads(
        memory_lookup_reference, x.double(), tables64, b.double(), tau, "l1", 1.0, grad_y
    )
    bound = 2**-8 * memory_lookup_reference(x.double(), tables64.abs(), None, tau) + 1e-5
    assert ((y.double() - y64).abs() <= bound).all()
    assert (y.double() - y64).abs().max() > 0  # the tables really were rounded
    torch.testing.assert_close(gx.double(), gx64, atol=2**-7 * gx64.abs().max().item(), rtol=0)
    # ∂L/∂T does not read T: fp32 accumulation, then one rounding to bf16
    torch.testing.assert_close(gt.double(), gt64, atol=1e-6, rtol=2**-8)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_single_token_matches_batched(table_dtype):
    """N = 1 runs inline and a batch in parallel over tokens: each token's result must be bit-identical."""
    x, tables, b = make_inputs(8, 16, 2056, 3, dtype=torch.float32, table_dtype=table_dtype)
    batched = memory_lookup_cpu(x, tables, b, 8)
    for n in range(3):
        torch.testing.assert_close(memory_lookup_cpu(x[n : n + 1], tables, b, 8), batched[n : n + 1], atol=0, rtol=0)
    reference = memory_lookup_reference(x.double(), tables.double(), b.double(), 8)
    torch.testing.assert_close(batched.double(), reference, atol=1e-4, rtol=1e-5)


def test_bfloat16_input_hashes_in_fp32():
    x, tables, b = make_inputs(4, 6, 40, 11, dtype=torch.bfloat16, table_dtype=torch.float32)
    y = memory_lookup_cpu(x, tables, b, 4)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, memory_lookup_reference(x, tables, b, 4), atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    x, tables, b = make_inputs(4, 4, 24, 9)
    x_t = x.t().contiguous().t()  # same values, column-major
    tables_t = tables.t().contiguous().t()
    torch.testing.assert_close(memory_lookup_cpu(x_t, tables_t, b, 4), memory_lookup_reference(x, tables, b, 4))


def test_inference_path_matches_and_builds_no_graph():
    x, tables, b = make_inputs(8, 4, 40, 5, dtype=torch.float32)
    tables.requires_grad_()
    with torch.no_grad():
        y = memory_lookup_cpu(x, tables, b, 8)
    assert not y.requires_grad
    y_grad = memory_lookup_cpu(x, tables, b, 8)
    assert y_grad.requires_grad
    torch.testing.assert_close(y, y_grad.detach(), atol=0, rtol=0)


def test_gradcheck():
    x = torch.randn(3, 8, dtype=f64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # away from the kink of |z| at 0
    tables = torch.randn(4 << 2, 5, dtype=f64, requires_grad=True)
    bias = torch.randn(5, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t, c: memory_lookup_cpu(a, t, c, 2, "paper", 0.8), (x, tables, bias))


def test_opcheck_registration():
    """Schema, autograd registration and fake (meta) kernels, as torch.compile needs them."""
    x, tables, b = make_inputs(4, 3, 10, 6)
    torch.library.opcheck(
        torch.ops.memoryformer.memory_lookup_cpu.default,
        (x.requires_grad_(), tables.requires_grad_(), b.requires_grad_(), 4, "l1", 1.0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_memory_layer_end_to_end():
    torch.manual_seed(0)
    layer = MemoryLayer(32, 24, tau=4, score="paper", temperature=0.5, backend="cpu", dtype=f64)
    reference = MemoryLayer(32, 24, tau=4, score="paper", temperature=0.5, backend="reference", dtype=f64)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 32, dtype=f64)
    outputs = [m(x) for m in (layer, reference)]
    torch.testing.assert_close(*outputs)
    for out in outputs:
        out.square().sum().backward()
    torch.testing.assert_close(layer.tables.grad, reference.tables.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(2, 3, 8), torch.randn(64, 4), None, 4), ValueError, r"x must be \[N, K·tau\]"),
        ((torch.randn(2, 10), torch.randn(64, 4), None, 4), ValueError, "not divisible by tau=4"),
        ((torch.randn(2, 8), torch.randn(60, 4), None, 4), ValueError, r"tables must be \[K·2\^tau, h\] = \[32"),
        ((torch.randn(2, 8), torch.randn(32, 4), torch.randn(5), 4), ValueError, r"bias must be .* shape \[4\]"),
        ((torch.ones(2, 8, dtype=torch.long), torch.randn(32, 4), None, 4), TypeError, "floating point"),
    ],
)
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        memory_lookup_cpu(*args)


def test_bad_score_and_temperature():
    x, tables = torch.randn(2, 8), torch.randn(32, 4)
    with pytest.raises(ValueError, match="score must be 'l1' or 'paper'"):
        memory_lookup_cpu(x, tables, None, 4, "softmax")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        memory_lookup_cpu(x, tables, None, 4, "paper", 0.0)


# --- the build cache --------------------------------------------------------------------------------------------


def test_build_is_cached_under_a_keyed_directory():
    library = cpu._built_library(cpu._cache_dir() / f"memory_lookup-{cpu._build_key()}", build=pytest.fail)
    assert library.is_file() and cpu._build_key() in library.name  # an existing build is reused, not rebuilt


def test_concurrent_first_use_builds_once(tmp_path):
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.2)  # long enough for the other threads to queue on the lock
        (tmp_path / "lib" / "fake.so").write_bytes(b"")
        return tmp_path / "lib" / "fake.so"

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cpu._built_library(tmp_path / "lib", build))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [tmp_path / "lib" / "fake.so"] * 4


def test_failed_build_leaves_no_marker(tmp_path):
    def build():
        raise RuntimeError("g++: error: no such compiler")

    with pytest.raises(RuntimeError, match="no such compiler"):
        cpu._built_library(tmp_path / "lib", build)
    assert not (tmp_path / "lib" / cpu._BUILT_MARKER).exists()
    assert "error: no such compiler" in cpu._failure_summary(RuntimeError("log line\ng++: error: no such compiler"))


def test_torch_compile_traces_through_the_operator():
    """The fake kernels and the C++ autograd let torch.compile capture forward and backward in one graph."""
    x, tables, b = make_inputs(4, 3, 10, 6)
    leaves = [t.requires_grad_() for t in (x, tables, b)]

    def loss(x, tables, b):
        return memory_lookup_cpu(x, tables, b, 4, "paper", 0.5).sin().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
