"""DeepSet neighbour encoder: the fused path (Triton interpreter) vs the reference and float64."""

import pytest
import torch

import kernels.deepset as deepset
from kernels import DeepSetEncoder, DeepSetEncoderReference

K = 6
# Masks: some neighbours, none at all, all six.
MASK = torch.tensor(
    [[True, False, True, True, False, True], [False] * K, [True] * K], dtype=torch.bool
)


def make_reference(d: int, seed: int = 0) -> DeepSetEncoderReference:
    """A float64 reference with every parameter away from its initial value (LN gain 1, bias 0
    would hide gradient errors)."""
    torch.manual_seed(seed)
    ref = DeepSetEncoderReference(d).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ref


def make_inputs(n: int, seed: int = 1, mask: torch.Tensor = MASK):
    g = torch.Generator().manual_seed(seed)
    b = mask.shape[0]
    x_self = torch.log2(1 + torch.poisson(torch.full((b, n), 4.0), generator=g))
    x_nbr = torch.log2(1 + torch.poisson(torch.full((b, K, n), 4.0), generator=g))
    dist = torch.rand(b, K, generator=g, dtype=torch.float64) * 3
    return x_self.double(), x_nbr.double(), dist, mask


def run(enc, inputs, grad_out, dtype):
    """Output and gradients (x_self, x_nbr, dist, then every parameter by name) as float64."""
    x_self, x_nbr, dist, mask = inputs
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x_self, x_nbr, dist)]
    enc.zero_grad(set_to_none=True)
    out = enc(*leaves, mask)
    out.backward(grad_out.to(out.dtype))
    grads = {"x_self": leaves[0].grad, "x_nbr": leaves[1].grad, "dist": leaves[2].grad}
    grads |= {name: p.grad for name, p in enc.named_parameters()}
    return out.detach().double(), {k: v.double() for k, v in grads.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts launches of the fused path."""
    calls = []
    apply = deepset._DeepSetHidden.apply

    def counting(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(deepset._DeepSetHidden, "apply", counting)
    return calls


def fused_copy(ref: DeepSetEncoderReference, dtype, block_rows=None) -> DeepSetEncoder:
    enc = DeepSetEncoder(ref.d_model)
    enc.load_state_dict(ref.state_dict())
    enc.block_rows = block_rows
    return enc.to(dtype)


@pytest.mark.parametrize(
    ("d", "n", "block_rows"),
    [(64, 37, None), (48, 37, 8)],  # one block per sample; d not a power of 2 with 5 row blocks
)
def test_fp32_matches_float64(d, n, block_rows, fused_calls):
    ref = make_reference(d)
    inputs = make_inputs(n)
    grad_out = torch.randn(3, n, d, dtype=torch.float64)
    want_out, want = run(ref, inputs, grad_out, torch.float64)
    out, got = run(fused_copy(ref, torch.float32, block_rows), inputs, grad_out, torch.float32)
    assert fused_calls, "the fused path did not run"
    assert rel(out, want_out) <= 1e-5
    assert set(got) == set(want) and len(got) == 3 + 14
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert rel(got[name], want[name]) <= 1e-5, name
    # The neighbour gradients of the sample without neighbours are exactly zero.
    assert not got["x_nbr"][1].any() and not got["dist"][1].any()


def test_bf16_tolerance(fused_calls):
    """bf16 parameters and inputs: the error (relative norm vs float64 math) of the output and of
    every gradient is at most 1.5x the bf16 reference's own error + 5e-3, and below 0.1. Typical:
    output 0.5%, most gradients <= 1.5%, x_nbr ~5% in both implementations (the LayerNorm backward
    cancels most of a bf16 upstream gradient)."""
    d, n = 64, 37
    ref = make_reference(d, seed=3)
    inputs = make_inputs(n, seed=4)
    grad_out = torch.randn(3, n, d, dtype=torch.float64)
    want_out, want = run(ref, inputs, grad_out, torch.float64)
    ref16 = make_reference(d, seed=3).to(torch.bfloat16)
    ref_out, ref_grads = run(ref16, inputs, grad_out, torch.bfloat16)
    out, got = run(fused_copy(ref, torch.bfloat16), inputs, grad_out, torch.bfloat16)
    assert fused_calls
    assert rel(out, want_out) <= min(0.1, 1.5 * rel(ref_out, want_out) + 5e-3)
    for name in want:
        limit = min(0.1, 1.5 * rel(ref_grads[name], want[name]) + 5e-3)
        assert rel(got[name], want[name]) <= limit, name


def test_neighbour_order_invariance(fused_calls):
    d, n = 32, 37
    enc = fused_copy(make_reference(d), torch.float32)
    x_self, x_nbr, dist, mask = make_inputs(n)
    grad_out = torch.randn(3, n, d, dtype=torch.float64)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    out, grads = run(enc, (x_self, x_nbr, dist, mask), grad_out, torch.float32)
    p_out, p_grads = run(
        enc, (x_self, x_nbr[:, perm], dist[:, perm], mask[:, perm]), grad_out, torch.float32
    )
    assert fused_calls
    # Only the fp32 summation order over neighbours changes.
    assert rel(p_out, out) <= 1e-6
    assert rel(p_grads["x_nbr"], grads["x_nbr"][:, perm]) <= 1e-6
    assert rel(p_grads["dist"], grads["dist"][:, perm]) <= 1e-6
    for name, _ in enc.named_parameters():
        assert rel(p_grads[name], grads[name]) <= 1e-6, name


@pytest.mark.parametrize("cls", [DeepSetEncoder, DeepSetEncoderReference])
def test_masked_neighbour_values_are_ignored(cls):
    d, n = 32, 37
    enc = cls(d)
    enc.load_state_dict(make_reference(d).float().state_dict())
    x_self, x_nbr, dist, mask = make_inputs(n)
    grad_out = torch.randn(3, n, d, dtype=torch.float64)
    out, grads = run(enc, (x_self, x_nbr, dist, mask), grad_out, torch.float32)
    x_nbr2 = torch.where(mask[:, :, None], x_nbr, torch.nan)
    dist2 = torch.where(mask, dist, torch.inf)  # the graph marks missing neighbours with inf
    out2, grads2 = run(enc, (x_self, x_nbr2, dist2, mask), grad_out, torch.float32)
    assert torch.equal(out2, out)
    assert not grads2["x_nbr"][~mask].any() and not grads2["dist"][~mask].any()
    for name in grads:
        assert torch.equal(grads2[name], grads[name]), name


def test_state_dicts_are_interchangeable():
    d, n = 32, 37
    ref = DeepSetEncoderReference(d)
    enc = DeepSetEncoder(d)
    assert list(ref.state_dict()) == list(enc.state_dict())
    enc.load_state_dict(make_reference(d, seed=5).float().state_dict())
    ref.load_state_dict(enc.state_dict())
    inputs = [t.float() for t in make_inputs(n)[:3]]
    torch.testing.assert_close(enc(*inputs, MASK), ref(*inputs, MASK), rtol=1e-5, atol=1e-5)


def test_cpu_without_interpreter_runs_reference(monkeypatch, fused_calls):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d, n = 32, 37
    ref = make_reference(d).float()
    enc = fused_copy(ref, torch.float32)
    inputs = [t.float() for t in make_inputs(n)[:3]]
    assert torch.equal(enc(*inputs, MASK), ref(*inputs, MASK))
    assert not fused_calls


def test_active_dropout_runs_reference(fused_calls):
    enc = DeepSetEncoder(32, dropout=0.5)
    inputs = [t.float() for t in make_inputs(5)[:3]]
    enc.train()(*inputs, MASK)
    assert not fused_calls
    enc.eval()(*inputs, MASK)
    assert len(fused_calls) == 1


def test_degenerate_inputs_stay_finite():
    """Constant first-layer output (zero LayerNorm variance), zero and large counts."""
    d, n = 32, 20
    ref = make_reference(d).float()
    with torch.no_grad():
        ref.self_in.weight.zero_()
        ref.self_in.bias.fill_(0.5)
    enc = fused_copy(ref, torch.float32)
    x_self = torch.zeros(3, n)
    x_nbr = torch.full((3, K, n), 20.0)
    dist = torch.zeros(3, K, dtype=torch.float64)
    grad_out = torch.randn(3, n, d, dtype=torch.float64)
    out, grads = run(enc, (x_self, x_nbr, dist, MASK), grad_out, torch.float32)
    want_out, want = run(ref, (x_self, x_nbr, dist, MASK), grad_out, torch.float32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name


def test_bad_shapes_are_named():
    enc = DeepSetEncoder(32)
    with pytest.raises(ValueError, match="x_nbr must be"):
        enc(torch.zeros(2, 5), torch.zeros(2, K, 4), torch.zeros(2, K), MASK[:2])
    with pytest.raises(ValueError, match="nbr_mask must be bool"):
        enc(torch.zeros(2, 5), torch.zeros(2, K, 5), torch.zeros(2, K), MASK[:2].int())
