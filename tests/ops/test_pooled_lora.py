import pytest
import torch

from qalora_tune.ops import pool_groups, pooled_lora
from tests.reference import pooled_lora_reference


def _inputs(batch_shape, in_dim, out_dim, rank, group_size, dtype=torch.float32):
    x = torch.randn(*batch_shape, in_dim, dtype=dtype, requires_grad=True)
    a = torch.randn(rank, in_dim // group_size, dtype=dtype, requires_grad=True)
    b = torch.randn(out_dim, rank, dtype=dtype, requires_grad=True)
    return x, a, b


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("batch_shape", [(5,), (2, 3)])
def test_forward_and_gradients_match_float64(group_size, rank, batch_shape):
    x, a, b = _inputs(batch_shape, 256, 48, rank, group_size)
    scale = 2.0 / rank
    out = pooled_lora(x, a, b, group_size, scale)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = pooled_lora_reference(x64, a64, b64, group_size, scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_pooling_averages_contiguous_groups():
    x = torch.arange(8.0)
    assert torch.equal(pool_groups(x, 4), torch.tensor([1.5, 5.5]))


def test_bfloat16_inputs_keep_parameter_dtypes_for_grads():
    x, a, b = _inputs((4,), 128, 16, 4, 32, dtype=torch.bfloat16)
    pooled_lora(x, a, b, 32, 0.5).sum().backward()
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == torch.bfloat16


def test_shape_errors_are_clear():
    x, a, b = _inputs((2,), 128, 16, 4, 32)
    with pytest.raises(ValueError, match="lora_a must have shape"):
        pooled_lora(x, a[:, :2], b, 32, 1.0)
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        pooled_lora(x, a, b, 48, 1.0)


def test_opcheck():
    x, a, b = _inputs((2, 3), 256, 48, 8, 64)
    torch.library.opcheck(pooled_lora, (x, a, b, 64, 0.25))


def test_compiles_without_graph_break():
    x, a, b = _inputs((4,), 256, 32, 4, 64)
    compiled = torch.compile(pooled_lora, fullgraph=True)
    torch.testing.assert_close(compiled(x, a, b, 64, 0.5), pooled_lora(x, a, b, 64, 0.5))
