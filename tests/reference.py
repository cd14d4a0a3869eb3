"""Float64 references and rounding-error bounds shared by the numerical tests."""

import zlib

import pytest
import torch

# unit roundoff of the storage / compute dtypes
UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

requires_cuda = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
CUDA_SKIP_REASON = "needs a CUDA GPU with compute capability 8.0+ (tinygemm int4 kernel)"


def pooled_lora_reference(x, lora_a, lora_b, group_size, scale):
    """scale * B A mean_G(x), all in float64."""
    pooled = x.double().unflatten(-1, (-1, group_size)).mean(-1)
    return scale * (pooled @ lora_a.double().t()) @ lora_b.double().t()


def matmul_error_bound(x, weight, dtype, y_ref=None):
    """Elementwise bound on |x W^T computed by the int4 kernel - exact x W^T|.

    The kernel rounds x to ``dtype`` (relative error u), accumulates in fp32 over K terms
    (at most K * u32 relative to |x| |W|^T) and rounds the output to ``dtype``.
    """
    u = UNIT_ROUNDOFF[dtype]
    k = x.shape[-1]
    magnitude = x.double().abs() @ weight.double().abs().t()
    bound = (u + k * UNIT_ROUNDOFF[torch.float32]) * magnitude
    if y_ref is not None:
        bound = bound + u * y_ref.abs()
    return 2 * bound + 1e-30


@pytest.fixture(autouse=True)
def seed_each_test(request):
    """Fresh, reproducible random inputs for every test and parameter set (active in the
    modules that import it)."""
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def assert_linear_op_matches_float64(call, dense, dtype):
    """``call(x)`` (an ``x @ W^T`` op on ``(2, 5, in_dim)``) and its input gradient equal
    the float64 products with ``dense`` within the int4 matmul rounding bound."""
    n, k = dense.shape
    x = torch.randn(2, 5, k, requires_grad=True)
    out = call(x)
    assert out.shape == (2, 5, n) and out.dtype == torch.float32
    expected = x.detach().double() @ dense.t()
    assert_within(out, expected, matmul_error_bound(x.detach(), dense, dtype, expected), "forward")
    grad = torch.randn(2, 5, n)
    out.backward(grad)
    expected_grad = grad.double() @ dense
    # the backward runs in the weight's dtype: grad rounded to it, fp32 accumulation over n
    bound = matmul_error_bound(grad, dense.t(), dtype, expected_grad)
    assert_within(x.grad, expected_grad, bound, "input gradient")


def assert_within(actual, expected, bound, what):
    err = (actual.double() - expected.double()).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error reaches {worst:.3g}x its bound (max abs err {err.max().item():.3g})"


def assert_compiled_matches_eager(layer, x):
    """``torch.compile(layer, fullgraph=True)`` gives the eager output and the eager
    gradients of ``x`` and of the layer's adapter (``lora_a``, ``lora_b``)."""
    params = [layer.lora_a.weight, layer.lora_b.weight]
    eager = layer(x)
    eager.sum().backward()
    eager_grads = [t.grad.clone() for t in [x, *params]]
    for t in [x, *params]:
        t.grad = None
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True)(x)
    out.sum().backward()
    for got, want in zip([out, *(t.grad for t in [x, *params])], [eager, *eager_grads]):
        # compiled kernels may sum (and round 16-bit sums) in another order: the difference
        # is a few units of rounding of the largest summands, so the absolute tolerance
        # follows the tensor's scale (sum pooling's adapter gradients are ~G times mean's)
        rtol = {torch.float32: 1.3e-6, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}[want.dtype]
        atol = max(1e-5, 4 * torch.finfo(want.dtype).eps * want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
