import copy
import dataclasses
import io
import itertools
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ttlayers.contraction
from ttlayers import TTLinear, tt_to_dense
from ttlayers.contraction import tt_linear
from ttlayers.planner import Plan, candidate_plans

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (in_modes, out_modes, rank): d = 1..6, odd modes, modes of 1, rank 1, ranks at their cap,
# and an explicit rank sequence.
CASES = [
    ((5,), (3,), 4),
    ((3, 5), (2, 7), 1),
    ((3, 5), (2, 7), 100),  # capped at (1, 6, 1)
    ((784, 1), (1, 10), 50),  # the seed's TTNet, capped at rank 10
    ((2, 3, 5), (5, 1, 3), 4),
    ((1, 7, 1), (3, 1, 2), 2),
    ((4, 2, 3, 2), (2, 3, 1, 5), (2, 5, 3)),
    ((2, 3, 2, 1, 3), (3, 2, 2, 2, 1), 1000),  # every bond at its cap
    ((2, 1, 2, 3, 2, 2), (1, 2, 3, 2, 1, 2), 3),
]


def reference_dense(cores: list[torch.Tensor]) -> np.ndarray:
    """W[i, j] from the formula, one entry at a time, in numpy float64."""
    g = [c.detach().cpu().double().numpy() for c in cores]
    in_modes = [c.shape[1] for c in g]
    out_modes = [c.shape[2] for c in g]
    w = np.zeros((math.prod(out_modes), math.prod(in_modes)))
    for i_multi in itertools.product(*map(range, out_modes)):
        i = np.ravel_multi_index(i_multi, out_modes) if out_modes else 0
        for j_multi in itertools.product(*map(range, in_modes)):
            j = np.ravel_multi_index(j_multi, in_modes)
            acc = np.ones((1, 1))
            for k in range(len(g)):
                acc = acc @ g[k][:, j_multi[k], i_multi[k], :]
            w[i, j] = acc.item()
    return w


def make(in_modes, out_modes, rank, **kwargs):
    return TTLinear(
        math.prod(in_modes),
        math.prod(out_modes),
        rank,
        in_modes=in_modes,
        out_modes=out_modes,
        **kwargs,
    )


@pytest.mark.parametrize(("in_modes", "out_modes", "rank"), CASES)
def test_to_dense_matches_entrywise_formula(in_modes, out_modes, rank):
    torch.manual_seed(0)
    layer = make(in_modes, out_modes, rank, dtype=torch.float64)
    expected = reference_dense(list(layer.cores))
    dense = layer.to_dense().detach()
    # float64 products of d <= 6 factors: rounding ~1e-16 relative; 1e-12 is far above it.
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-12, atol=1e-14)
    # W is a fresh contiguous tensor, also where modes of 1 make its last copy a view:
    # writing into it leaves the cores alone.
    assert dense.is_contiguous()
    before = [core.detach().clone() for core in layer.cores]
    dense.fill_(7.0)
    assert all(torch.equal(core, old) for core, old in zip(layer.cores, before, strict=True))


def test_weight_is_the_dense_matrix_for_code_that_reads_it():
    torch.manual_seed(0)
    layer = make((4, 3), (2, 5), 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"dense 10 x 12 matrix .* each access"):
        weight = layer.weight
    np.testing.assert_allclose(
        weight.detach().numpy(), reference_dense(list(layer.cores)), rtol=1e-12, atol=1e-14
    )
    assert weight.shape == (layer.out_features, layer.in_features)
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
    weight.sum().backward()  # differentiable with respect to the cores
    assert all(core.grad is not None for core in layer.cores)
    with pytest.raises(AttributeError, match="from_dense"):
        layer.weight = torch.zeros(10, 12, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # assigning must not read (and build) W first
        with pytest.raises(AttributeError, match="from_dense"):
            layer.weight = nn.Parameter(torch.zeros(10, 12, dtype=torch.float64))
        with pytest.raises(AttributeError, match="from_dense"):
            layer.register_parameter("weight", nn.Parameter(torch.zeros(10, 12)))
    assert "weight" not in dict(layer.named_parameters())


@pytest.mark.parametrize(("in_modes", "out_modes", "rank"), CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_float64(in_modes, out_modes, rank, bias):
    torch.manual_seed(0)
    layer = make(in_modes, out_modes, rank, bias=bias, dtype=torch.float64)
    x = torch.randn(7, layer.in_features, dtype=torch.float64)
    w = torch.from_numpy(reference_dense(list(layer.cores)))
    expected = x @ w.T + (layer.bias.detach() if bias else 0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_ranks_and_core_shapes():
    layer = TTLinear(1024, 512, 8, in_modes=(4, 8, 8, 4), out_modes=(4, 8, 4, 4))
    assert layer.ranks == (1, 8, 8, 8, 1)
    assert [tuple(c.shape) for c in layer.cores] == [
        (1, 4, 4, 8),
        (8, 8, 8, 8),
        (8, 8, 4, 8),
        (8, 4, 4, 1),
    ]
    assert layer.bias is not None and layer.bias.shape == (512,)
    assert isinstance(layer.cores, nn.ParameterList)


def test_seed_ttnet_expressible():
    # The write-up's network: x (N, 784) -> einsum("ni,ia,aj->nj", x, tt1 (784, 50), tt2 (50, 10)).
    torch.manual_seed(0)
    tt1, tt2 = torch.rand(784, 50, dtype=torch.float64), torch.rand(50, 10, dtype=torch.float64)
    with pytest.warns(UserWarning, match="exceeds"):
        layer = TTLinear.from_cores([tt1.reshape(1, 784, 1, 50), tt2.reshape(50, 1, 10, 1)])
    x = torch.randn(3, 784, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.einsum("ni,ia,aj->nj", x, tt1, tt2))
    capped = TTLinear(784, 10, rank=50, in_modes=(784, 1), out_modes=(1, 10), bias=False)
    assert capped.ranks == (1, 10, 1)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 1, 4), (0,)])
def test_leading_dims(shape):
    torch.manual_seed(0)
    layer = TTLinear(12, 6, 3, in_modes=(3, 4), out_modes=(2, 3), dtype=torch.float64)
    x = torch.randn(*shape, 12, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*shape, 6)
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("grad", [True, False])
def test_nested_input_is_taken_as_f_linear_takes_it(layout, grad):
    # nn.TransformerEncoder packs a padded batch into a nested tensor in eval mode and calls
    # its linear layers on it; F.linear takes both layouts. Each tensor of the result and
    # the gradients of the cores match a float64 dense computation on the unpacked tensors.
    torch.manual_seed(0)
    layer = TTLinear(24, 20, rank=3, in_modes=(2, 3, 4), out_modes=(5, 2, 2)).double()
    parts = [torch.randn(n, 24, dtype=torch.float64) for n in (3, 1, 5)]
    packed = torch.nested.as_nested_tensor(parts, layout=layout)
    with torch.set_grad_enabled(grad):
        out = layer(packed)
    assert out.is_nested and out.layout == layout
    w = tt_to_dense([core.detach() for core in layer.cores])
    for got, x in zip(out.unbind(), parts, strict=True):
        torch.testing.assert_close(got, x @ w.T + layer.bias, rtol=0, atol=1e-12)
    if grad:
        sum(got.square().sum() for got in out.unbind()).backward()
        cores = [core.detach().requires_grad_() for core in layer.cores]
        x = torch.cat(parts)
        (x @ tt_to_dense(cores).T + layer.bias.detach()).square().sum().backward()
        for core, reference in zip(layer.cores, cores, strict=True):
            torch.testing.assert_close(core.grad, reference.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="expected input of shape"):
        layer(torch.nested.as_nested_tensor([torch.randn(2, 23, dtype=torch.float64)]))


def test_a_strided_nested_input_of_several_dims_goes_through_as_its_rows(monkeypatch):
    # A strided nested tensor's tensors may differ in every dimension but the last: all
    # their rows go through one call (one plan chosen, not one per tensor), and each result
    # keeps its tensor's leading shape.
    torch.manual_seed(0)
    layer = TTLinear(24, 20, rank=3, in_modes=(2, 3, 4), out_modes=(5, 2, 2)).double()
    parts = [torch.randn(*shape, 24, dtype=torch.float64) for shape in ((2, 3), (1, 4), (0, 2))]
    batches = []
    select = ttlayers.contraction.select_plan
    monkeypatch.setattr(
        ttlayers.contraction, "select_plan", lambda b, *a: batches.append(b) or select(b, *a)
    )
    with torch.no_grad():
        out = layer(torch.nested.as_nested_tensor(parts))
    assert batches == [10]
    w = tt_to_dense(list(layer.cores)).detach()
    for got, x in zip(out.unbind(), parts, strict=True):
        torch.testing.assert_close(got, x @ w.T + layer.bias, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 24\).*\(3, 23\)"):
        layer(torch.nested.as_nested_tensor([torch.randn(2, 24), torch.randn(3, 23)]).double())
    with pytest.raises(
        ValueError, match=r"expected input of shape \(\*, 24\).*got shape \(2, 23\)"
    ):
        layer(torch.nested.as_nested_tensor([torch.randn(2, 23), torch.randn(3, 23)]).double())
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 24\)"):
        layer(torch.nested.as_nested_tensor([torch.tensor(1.0)]).double())


def test_an_empty_strided_nested_input_keeps_its_dtype_and_is_checked():
    # With no tensor in it, the result's dtype comes from the layer, not from the nested
    # tensor constructor's default (float32); the input's dtype is still checked.
    layer = TTLinear(24, 20, rank=3, in_modes=(2, 3, 4), out_modes=(5, 2, 2)).double()
    with torch.no_grad():
        out = layer(torch.nested.nested_tensor([], dtype=torch.float64))
    assert out.is_nested and out.dtype == torch.float64 and out.unbind() == ()
    with pytest.raises(TypeError, match=r"expected input of dtype torch\.float64"):
        layer(torch.nested.nested_tensor([], dtype=torch.float32))


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = TTLinear(12, 10, 3, in_modes=(2, 3, 2), out_modes=(1, 5, 2), dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    params = [*layer.cores, layer.bias]

    def fn(x, *params):
        return torch.func.functional_call(
            layer,
            {**{f"cores.{k}": p for k, p in enumerate(params[:-1])}, "bias": params[-1]},
            (x,),
        )

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_cpu(dtype):
    torch.manual_seed(0)
    layer = TTLinear(64, 48, 4, in_modes=(4, 4, 4), out_modes=(4, 3, 4), dtype=dtype)
    x = torch.randn(16, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = x.double() @ layer.to_dense().double().T + layer.bias.double()
    # Relative to the output scale: bf16 has unit roundoff 2^-8, fp16 2^-11, and the chain has
    # d + 1 = 4 rounded products and sums of <= 64 terms; 5e-2 / 1e-2 cover that with margin.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    err = (y.double() - ref).norm() / ref.norm()
    assert err.item() < tol[dtype]
    y.float().sum().backward()
    assert all(c.grad is not None and c.grad.dtype == dtype for c in layer.cores)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_cuda(dtype):
    torch.manual_seed(0)
    layer = TTLinear(256, 128, 8, dtype=dtype, device="cuda")
    x = torch.randn(32, 256, dtype=dtype, device="cuda")
    y = layer(x)
    assert y.device.type == "cuda" and y.dtype == dtype
    ref = x.double() @ layer.to_dense().double().T + layer.bias.double()
    # float32 at 1e-3, not 1e-5 as on the CPU: it leaves room for TF32 products (10-bit
    # mantissa, ~5e-4 relative), which a process may enable with
    # torch.set_float32_matmul_precision("high"). Half precision: a few units of its
    # rounding (2^-11, 2^-8).
    tol = {torch.float64: 1e-12, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol[dtype]
    y.float().sum().backward()
    assert layer.cores[0].grad is not None


def test_plan_is_cached_not_searched_per_call(monkeypatch):
    import opt_einsum

    layer = TTLinear(64, 64, 4)
    x = torch.randn(8, 64)
    layer(x)  # plan for batch 8
    calls = []
    real = opt_einsum.contract_path
    monkeypatch.setattr(
        opt_einsum, "contract_path", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for _ in range(3):
        layer(x)
    assert calls == []


class Doubled(nn.Module):
    """A parametrization of a core: twice its stored value."""

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        return 2 * core


def test_parametrized_core_is_used_in_forward_and_backward():
    # torch.nn.utils.parametrize moves a core out of the ParameterList's own dict; the layer
    # must still see all d cores, the parametrized one as its parametrization computes it.
    layer = TTLinear(24, 30, rank=3, in_modes=(3, 4, 2), out_modes=(2, 5, 3)).double()

    torch.nn.utils.parametrize.register_parametrization(layer.cores, "0", Doubled())
    x = torch.randn(4, 24, dtype=torch.float64)
    weight = tt_to_dense([layer.cores[k] for k in range(3)])
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()
    assert layer.cores.parametrizations["0"].original.grad is not None
    # Removing it re-registers core 0 after the others; the layer must keep the chain order.
    torch.nn.utils.parametrize.remove_parametrizations(layer.cores, "0")
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, rtol=1e-12, atol=1e-12)


class Masked(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        return core * self.mask


def test_a_core_pruned_with_prune_is_refused_and_a_mask_parametrization_trains():
    # prune's hook sits on the ParameterList, whose forward never runs: the core kept its
    # value at pruning time, and the second backward pass failed. Refused, naming the way
    # that works: a parametrization, which is reapplied at every access.
    torch.manual_seed(0)
    layer = TTLinear(24, 30, rank=3, in_modes=(3, 4, 2), out_modes=(2, 5, 3)).double()
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.nn.utils.prune.l1_unstructured(layer.cores, "1", amount=0.5)
    # Every reader of the cores: they would read the value cached at pruning time, stale
    # once "1_orig" changes (a checkpoint loaded, say).
    readers = {
        "forward": lambda: layer(x),
        "to_dense": layer.to_dense,
        "round": layer.round,
        "from_cores": lambda: TTLinear.from_cores(layer.cores),
        "tt_round": lambda: ttlayers.tt_round(layer.cores),
        "tt_to_dense": lambda: tt_to_dense(layer.cores),
    }
    for reader in readers.values():
        with pytest.raises(TypeError, match=r"core 1 is pruned.*register_parametrization"):
            reader()
    mask = layer.cores._buffers["1_mask"].clone()
    torch.nn.utils.prune.remove(layer.cores, "1")
    torch.nn.utils.parametrize.register_parametrization(layer.cores, "1", Masked(mask))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    # The masked entries stay 0 through training, and the output is that of the masked core.
    assert torch.all(layer.cores[1][mask == 0] == 0)
    weight = tt_to_dense([layer.cores[k] for k in range(3)])
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, rtol=1e-12, atol=1e-12)


def test_layer_of_more_cores_than_its_precomputed_core_names_uses_them_all():
    # The layer reads its cores by their names in the ParameterList, made once for the first
    # 64; beyond that it makes them. 70 cores (69 of modes 1): a dropped core would leave a
    # chain that does not reach the output, and the product would differ from the reference.
    layer = TTLinear(2, 3, rank=2, in_modes=(2,) + (1,) * 69, out_modes=(1,) * 69 + (3,))
    layer = layer.double()
    assert len(layer._core_list()) == 70
    x = torch.randn(4, 2, dtype=torch.float64)
    expected = x @ tt_to_dense(list(layer.cores)).T + layer.bias
    with torch.no_grad():  # float64 products of order 1: 1e-12 is rounding
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_loading_other_ranks_into_parametrized_cores_is_refused_untouched():
    # Before, the load rebuilt the container: the parametrization was dropped silently and the
    # cores were left half resized, no longer a chain.
    layer = TTLinear(24, 30, rank=3, in_modes=(3, 4, 2), out_modes=(2, 5, 3)).double()
    other = TTLinear(24, 30, rank=2, in_modes=(3, 4, 2), out_modes=(2, 5, 3)).double()

    torch.nn.utils.parametrize.register_parametrization(layer.cores, "0", Doubled())
    x = torch.randn(4, 24, dtype=torch.float64)
    before = layer(x).detach()
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"ranks \(1, 2, 2, 1\) differ.*parametrized"):
            layer.load_state_dict(other.state_dict(), strict=strict)
    assert torch.nn.utils.parametrize.is_parametrized(layer.cores, "0")
    assert layer.ranks == (1, 3, 3, 1)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    # Same ranks: the state dict of a parametrized layer loads as usual.
    layer.load_state_dict(layer.state_dict())


def test_state_dict_roundtrip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(TTLinear(32, 16, 3), nn.ReLU(), TTLinear(16, 4, 2, bias=False))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = nn.Sequential(TTLinear(32, 16, 3), nn.ReLU(), TTLinear(16, 4, 2, bias=False))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(5, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_deepcopy_and_pickle():
    torch.manual_seed(0)
    layer = TTLinear(30, 20, 3)
    x = torch.randn(4, 30)
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    pickle.dump(layer, buffer)
    restored = pickle.loads(buffer.getvalue())
    for other in (clone, restored):
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
        assert other.cores[0].data_ptr() != layer.cores[0].data_ptr()


@pytest.mark.parametrize("bias", [True, False])
def test_extra_repr(bias):
    # The numbers written out by hand: cores 128 + 4096 + 4096 + 128 = 8,448, plus the bias;
    # nn.Linear has 1024 * 1024 (+ 1024) parameters.
    layer = TTLinear(1024, 1024, 8, in_modes=(4, 8, 8, 4), out_modes=(4, 8, 8, 4), bias=bias)
    params = 8448 + 1024 * bias
    text = repr(layer)
    for piece in [
        "in_features=1024, out_features=1024",
        "in_modes=(4, 8, 8, 4), out_modes=(4, 8, 8, 4)",
        "ranks=(1, 8, 8, 8, 1)",
        f"bias={bias}",
        f"params={params}",
        f"compression={(1024 * 1024 + 1024 * bias) / params:.1f}x",
    ]:
        assert piece in text


def test_parameter_count_and_compression():
    layer = TTLinear(1024, 1024, 8, in_modes=(4, 8, 8, 4), out_modes=(4, 8, 8, 4))
    cores = 1 * 16 * 8 + 8 * 64 * 8 + 8 * 64 * 8 + 8 * 16 * 1
    assert layer.num_parameters == cores + 1024
    assert sum(p.numel() for p in layer.parameters()) == layer.num_parameters
    assert layer.compression == pytest.approx((1024 * 1024 + 1024) / (cores + 1024))


def test_from_cores_and_tt_to_dense_agree():
    torch.manual_seed(0)
    cores = [torch.randn(1, 2, 3, 4), torch.randn(4, 5, 1, 2), torch.randn(2, 3, 2, 1)]
    layer = TTLinear.from_cores(cores, bias=torch.zeros(6))
    torch.testing.assert_close(layer.to_dense(), tt_to_dense(cores))
    assert layer.ranks == (1, 4, 2, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(in_features=0, out_features=4), ValueError, "in_features must be a positive int"),
        (dict(in_features=4, out_features=-1), ValueError, "out_features must be a positive int"),
        (dict(in_features=4.0, out_features=4), TypeError, "in_features must be an int"),
        (dict(in_features=4, out_features=4, rank=0), ValueError, "rank must be a positive"),
        (dict(in_features=4, out_features=4, rank=-3), ValueError, "rank must be a positive"),
        (
            dict(in_features=784, out_features=10, in_modes=(4, 7, 27), out_modes=(1, 2, 5)),
            ValueError,
            r"in_modes must multiply to in_features=784; got \(4, 7, 27\) with product 756",
        ),
        (
            dict(in_features=784, out_features=10, in_modes=(28, 28), out_modes=(1, 2, 5)),
            ValueError,
            "same length",
        ),
        (
            dict(in_features=16, out_features=16, rank=(2, 2), in_modes=(4, 4), out_modes=(4, 4)),
            ValueError,
            "1 inner bond ranks",
        ),
        (dict(in_features=16, out_features=16, num_cores=0), ValueError, "num_cores"),
        # nn.Linear(16, 16, False): the third positional argument is rank here.
        (dict(in_features=16, out_features=16, rank=False), TypeError, "keyword-only"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TTLinear(**kwargs)


@pytest.mark.parametrize("grad", [True, False])
def test_input_or_layer_on_the_meta_device_is_refused(grad):
    # Products of meta and CPU tensors do not check devices: a meta input gave a CPU tensor
    # of uninitialized memory, and a meta layer a meta result for a CPU input.
    layer, meta_layer = TTLinear(64, 32, 4), TTLinear(64, 32, 4, device="meta")
    with torch.set_grad_enabled(grad):
        layer(torch.randn(2, 64))  # with gradients off, the cached fast path from here on
        with pytest.raises(ValueError, match="cores' device, cpu; got input on meta"):
            layer(torch.empty(2, 64, device="meta"))
        with pytest.raises(ValueError, match="cores' device, meta; got input on cpu"):
            meta_layer(torch.randn(2, 64))
        assert meta_layer(torch.empty(2, 64, device="meta")).device.type == "meta"


def test_wrong_input_width_message_names_both_widths():
    layer = TTLinear(32, 8, 2)
    with pytest.raises(ValueError, match=r"in_features=32.*\(4, 31\).*31"):
        layer(torch.randn(4, 31))
    with pytest.raises(ValueError, match="in_features=32"):
        layer(torch.tensor(1.0))


def test_dtype_messages_give_advice_that_works():
    # A complex input was told to convert the layer to complex or use autocast, and a float64
    # input to use autocast, which leaves float64 alone: both led to a second error.
    layer = TTLinear(24, 6, 2)
    with pytest.raises(
        TypeError, match=r"real floating-point.*complex64.*\.to\(torch\.float32\)\.$"
    ):
        layer(torch.ones(3, 24, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"float64\. .*\.to\(torch\.float64\)\.$") as error:
        layer(torch.ones(3, 24, dtype=torch.float64))
    assert "autocast" not in str(error.value)
    with pytest.raises(TypeError, match=r"\.to\(torch\.float16\), or run under torch\.autocast"):
        layer(torch.ones(3, 24, dtype=torch.float16))
    with torch.autocast("cpu"), pytest.raises(TypeError, match="not float64 ones"):
        layer(torch.ones(3, 24, dtype=torch.float64))


@pytest.mark.parametrize("features", [(1, 16), (16, 1), (16, 16)])
def test_the_dense_weight_of_one_core_is_a_copy(features):
    # One core is its own block; with one input or output feature its transpose was already
    # contiguous, so W shared the core's memory and nn.init.zeros_(layer.weight) zeroed it.
    torch.manual_seed(0)
    layer = TTLinear(*features, num_cores=1)
    before = layer.cores[0].detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .weight's warning about its cost
        nn.init.zeros_(layer.weight)
    assert torch.equal(layer.cores[0], before)
    assert layer.to_dense().data_ptr() != layer.cores[0].data_ptr()


def test_integer_input_and_tt_linear_width_messages():
    layer = TTLinear(24, 6, 2)
    with pytest.raises(TypeError, match=r"floating-point.*int64.*\.to\(torch\.float32\)"):
        layer(torch.ones(3, 24, dtype=torch.int64))
    cores = list(layer.cores)
    for grad in (True, False):  # the general path, and the inference fast path once cached
        with torch.set_grad_enabled(grad):
            layer(torch.randn(2, 24))
            with pytest.raises(ValueError, match=r"\(\*, 24\).*\(4, 6\).*\(3, 23\)"):
                tt_linear(torch.randn(3, 23), cores)


def test_complex_and_integer_dtypes_are_rejected():
    # The hand-written backward pass does not conjugate: complex layers would get wrong
    # gradients silently, so they are refused wherever a dtype comes in.
    for dtype in (torch.complex64, torch.int64):
        with pytest.raises(TypeError, match=rf"real floating-point.*{dtype}"):
            TTLinear(16, 16, 2, dtype=dtype)
        cores = [torch.ones(1, 4, 4, 2, dtype=dtype), torch.ones(2, 4, 4, 1, dtype=dtype)]
        with pytest.raises(TypeError, match="real floating-point"):
            TTLinear.from_cores(cores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's warning about complex modules
        layer = TTLinear(16, 16, 2).to(torch.complex64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="complex64"):
            layer(torch.randn(3, 16, dtype=torch.complex64))


def test_dtype_that_is_not_a_torch_dtype():
    # nn.Linear takes Python's float (torch reads it as float64); other objects were an
    # AttributeError from inside the dtype check.
    assert (
        TTLinear(16, 16, 2, dtype=float).cores[0].dtype == nn.Linear(2, 2, dtype=float).weight.dtype
    )
    for dtype in ("float32", np.float32):
        with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
            TTLinear(16, 16, 2, dtype=dtype)


def test_tt_linear_checks_its_bias_plan_and_dtypes():
    torch.manual_seed(0)
    layer = TTLinear(64, 32, 4, in_modes=(4, 4, 4), out_modes=(2, 4, 4))
    cores = [core.detach() for core in layer.cores]
    x = torch.randn(3, 64)
    for grad in (True, False):  # the general path, and the inference fast path once cached
        with torch.set_grad_enabled(grad):
            tt_linear(x, cores)
            for packed in (x, torch.nested.as_nested_tensor([x, x])):
                with pytest.raises(TypeError, match=r"cores\[1\] must be a tensor; got ndarray"):
                    tt_linear(packed, [cores[0], cores[1].numpy(), cores[2]])
            with pytest.raises(ValueError, match=r"bias must be .*shape \(32,\).*got \(31,\)"):
                tt_linear(x, cores, torch.zeros(31))
            with pytest.raises(TypeError, match=r"bias must be a floating-point tensor .* float"):
                tt_linear(x, cores, 2.0)  # was an AttributeError from bias.shape
            with pytest.raises(ValueError, match=r"expected input of shape \(\*, 64\)"):
                tt_linear(x[:, :63], cores)
            with pytest.raises(TypeError, match=r"one dtype.*input torch.float64"):
                tt_linear(x.double(), cores)
            with pytest.raises(TypeError, match=r"one dtype.*bias torch.float64"):
                tt_linear(x, cores, torch.zeros(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="plan must be a Plan of kind"):
        tt_linear(x, cores, plan=Plan("bogus"))
    with pytest.raises(TypeError, match="plan must be a Plan; got str"):
        tt_linear(x, cores, plan="dense")
    # Plan("dense") (split 0) merges all the cores left to right: valid for any chain.
    expected = x @ tt_to_dense(cores).T
    torch.testing.assert_close(tt_linear(x, cores, plan=Plan("dense")), expected)
    with pytest.raises(ValueError, match="does not fit a chain of 3 cores"):
        tt_linear(x, cores, plan=Plan("twoblock", split=3))
    chain = candidate_plans(3, (2, 2), (2, 2), (1, 2, 1))[-1]
    assert chain.kind == "chain"
    with pytest.raises(ValueError, match="does not fit a chain of 3 cores"):
        tt_linear(x, cores, plan=chain)
    # A field of the wrong type failed inside a product, or only in training (helper 76).
    for field, value in (("split", 1.0), ("chunks", 2.0), ("save_max_batch", None)):
        plan = dataclasses.replace(Plan("twoblock", split=1), **{field: value})
        with pytest.raises(TypeError, match=f"plan.{field} must be an int"):
            tt_linear(x, cores, plan=plan)


def test_cores_of_mixed_dtypes_are_a_clear_error():
    cores = list(TTLinear(16, 16, 2, num_cores=2).cores)
    mixed = [cores[0].detach(), cores[1].detach().double()]
    with pytest.raises(TypeError, match=r"one dtype and device.*cores\[1\] torch.float64"):
        tt_to_dense(mixed)
    with pytest.raises(TypeError, match="one dtype and device"):
        TTLinear.from_cores(mixed)


def test_from_cores_copies_a_layers_own_parameter_list():
    layer = TTLinear(16, 12, 3, num_cores=2)
    copy_ = TTLinear.from_cores(layer.cores, layer.bias)  # nn.ParameterList: not a Sequence
    x = torch.randn(4, 16)
    torch.testing.assert_close(copy_(x), layer(x), rtol=0, atol=0)
    assert copy_.cores[0] is not layer.cores[0]


@pytest.mark.parametrize("zero", ["rank", "in mode", "out mode"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_tt_linear_refuses_a_list_of_cores_with_a_size_of_0(zero, grad):
    # A list or tuple skipped core_list's check: a rank or input mode of 0 was a
    # ZeroDivisionError inside the planner, an output mode of 0 a silent (3, 0) result.
    shapes = {
        "rank": [(1, 4, 3, 0), (0, 5, 2, 1)],
        "in mode": [(1, 0, 3, 2), (2, 5, 2, 1)],
        "out mode": [(1, 4, 0, 2), (2, 5, 2, 1)],
    }[zero]
    cores = [torch.ones(shape, requires_grad=grad) for shape in shapes]
    x = torch.ones(3, shapes[0][1] * shapes[1][1])
    for chain in (cores, tuple(cores)):
        with pytest.raises(ValueError, match=r"cores\[0\] has a size of 0"):
            tt_linear(x, chain)


def test_from_cores_checks_cores_and_bias_before_building():
    cores = [core.detach() for core in TTLinear(16, 16, 2, num_cores=2).cores]
    # A stack of cores is one tensor, not a chain (it was taken as one, core by core).
    with pytest.raises(TypeError, match=r"cores must be a sequence of 4-D.*one tensor of shape"):
        TTLinear.from_cores(torch.ones(2, 1, 4, 4, 1))
    # The messages name the cores, not the constructor's arguments the caller never gave.
    with pytest.raises(TypeError, match=r"cores\[0\] must be a real floating-point.*int64"):
        TTLinear.from_cores([core.long() for core in cores])
    with pytest.raises(TypeError, match=r"cores\[1\] must be a real floating-point.*complex"):
        TTLinear.from_cores([cores[0], cores[1].to(torch.complex64)])
    with pytest.raises(ValueError, match=r"cores\[0\] has a size of 0 \(shape \(1, 4, 4, 0\)\)"):
        TTLinear.from_cores([torch.ones(1, 4, 4, 0), torch.ones(0, 4, 4, 1)])
    with pytest.raises(TypeError, match=r"bias must be a floating-point tensor.*torch\.int64"):
        TTLinear.from_cores(cores, torch.zeros(16, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias is on the meta device"):
        TTLinear.from_cores(cores, torch.zeros(16, device="meta"))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(16,\)"):
        TTLinear.from_cores(cores, torch.zeros(15))


def test_numpy_integers_are_accepted_as_sizes_and_ranks():
    layer = TTLinear(np.int64(24), np.int64(6), rank=np.int32(3), num_cores=np.int64(2))
    assert (layer.in_features, layer.out_features, layer.ranks) == (24, 6, (1, 3, 1))
    assert all(type(v) is int for v in (layer.in_features, *layer.in_modes, *layer.out_modes))
    with pytest.raises(TypeError, match="in_features"):
        TTLinear(24.0, 6)
    # A vector of ranks is read as modes are: a 1-D NumPy array is a sequence of ints.
    vector = TTLinear(64, 64, rank=np.array([3, 5]), num_cores=3)
    assert vector.ranks == (1, 3, 5, 1)
    assert all(type(r) is int for r in vector.ranks)
    with pytest.raises(TypeError, match="rank must hold ints"):
        TTLinear(64, 64, rank=np.array([3.0, 5.0]), num_cores=3)
    with pytest.raises(TypeError, match="rank must be an int or a sequence"):
        TTLinear(64, 64, rank=np.array([[3, 5]]), num_cores=3)


def test_to_linear_roundtrip():
    torch.manual_seed(0)
    layer = TTLinear(24, 12, 3, dtype=torch.float64)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear)
    assert linear.weight.dtype == torch.float64
    x = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(linear(x), layer(x))
    no_bias = TTLinear(24, 12, 3, bias=False).to_linear()
    assert no_bias.bias is None


def test_subclasses_keep_their_own_state_through_from_cores_round_and_from_dense():
    # An intermediate version built these on the meta device and gave them empty storage:
    # the subclass's own buffer and parameter held uninitialized memory.
    class Scaled(TTLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("scale", torch.full((3,), 2.0))
            self.gain = nn.Parameter(torch.ones(3))

    layer = Scaled(64, 32, 4)
    linear = nn.Linear(64, 32)
    state = torch.get_rng_state()
    made = [
        Scaled.from_cores(layer.cores, layer.bias),
        layer.round(rank=2),
        Scaled.from_dense(linear, rank=2),
    ]
    assert torch.equal(torch.get_rng_state(), state)  # the draws overwritten are put back
    for new in made:
        assert type(new) is Scaled
        assert torch.equal(new.scale, torch.full((3,), 2.0))
        assert torch.equal(new.gain.detach(), torch.ones(3))


def test_from_cores_draws_nothing_and_puts_back_nothing():
    # It built the layer inside torch.random.fork_rng, which puts the generator's state back
    # afterwards and so also rewinds what any other thread drew meanwhile (a review helper
    # saw 14,357 repeats in 20,000 draws of a thread running beside conversions). Here the
    # subclass's own draw stands for such a draw: it must not be drawn again after.
    class Drawing(TTLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.drawn = torch.rand(4)
            # A TTLinear built after the layer's own __init__ is initialized as usual.
            self.inner = TTLinear(8, 8, rank=2, num_cores=2)

    layer = Drawing(64, 32, 4)
    torch.manual_seed(0)
    made = Drawing.from_cores(layer.cores, layer.bias)
    assert not torch.equal(torch.rand(4), made.drawn)
    torch.manual_seed(0)
    torch.rand(4)
    expected = TTLinear(8, 8, rank=2, num_cores=2)
    for core, want in zip(made.inner.cores, expected.cores, strict=True):
        assert torch.equal(core, want)
    assert torch.equal(made.inner.bias, expected.bias)
    for core, want in zip(made.cores, layer.cores, strict=True):
        assert torch.equal(core, want)


def test_from_cores_skips_the_initialization_of_its_own_layer_only():
    # The skip was first taken by whichever TTLinear was built first: a helper a subclass
    # builds before super().__init__() kept torch.empty's memory (entries up to 5e19 in a
    # review) while the layer itself drew. And a subclass's own reset_parameters, which may
    # set up more than the cores, is still called.
    class HelperFirst(TTLinear):
        def __init__(self, *args, **kwargs):
            helper = TTLinear(8, 8, rank=2, num_cores=2)
            super().__init__(*args, **kwargs)
            self.helper = helper

    class Gated(TTLinear):
        def reset_parameters(self):
            super().reset_parameters()
            self.gate = 0.5

    layer = HelperFirst(64, 32, 4)
    torch.manual_seed(0)
    made = HelperFirst.from_cores(layer.cores, layer.bias)
    torch.manual_seed(0)
    expected = TTLinear(8, 8, rank=2, num_cores=2)  # the helper's draws, and only those
    for core, want in zip(made.helper.cores, expected.cores, strict=True):
        assert torch.equal(core, want)
    assert torch.equal(made.helper.bias, expected.bias)
    gated = Gated(64, 32, 4)
    for new in (Gated.from_cores(gated.cores, gated.bias), gated.round(rank=2)):
        assert new.gate == 0.5


def test_from_cores_fills_with_zeros_what_it_does_not_draw():
    # The layer's own initial values are zeros until the copy, not torch.empty's memory: a
    # subclass reading its cores in __init__ (an anchor for a regularizer) found values up
    # to 1e32 in a review. A subclass whose __new__ takes the constructor's arguments, as
    # type.__call__ passes them, is built as by cls(...).
    class Anchored(TTLinear):
        def __new__(cls, *args, **kwargs):
            return super().__new__(cls)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.anchor = [core.detach().clone() for core in self.cores]

    layer = Anchored(64, 32, 4)
    made = Anchored.from_cores(layer.cores, layer.bias)
    assert all(torch.count_nonzero(anchor) == 0 for anchor in made.anchor)
    for core, want in zip(made.cores, layer.cores, strict=True):
        assert torch.equal(core, want)


def test_from_cores_keeps_grad_mode_inside_inference_mode_and_no_grad():
    # Leaving inference mode (for tensors that can be trained) turns grad mode on: a
    # subclass's __init__ would then record graphs from its parameters.
    seen = []

    class Recording(TTLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(torch.is_grad_enabled())

    layer = Recording(64, 32, 4)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            made = Recording.from_cores(layer.cores, layer.bias)
        assert not made.cores[0].is_inference()
    assert seen == [True, False, False]


def test_to_linear_and_round_keep_mode_and_flags_and_draw_nothing():
    # Before, both returned trainable parameters from a frozen layer, and to_linear a layer
    # in training mode from one in eval mode; to_linear drew a random init to overwrite.
    layer = TTLinear(24, 12, 4, num_cores=2).eval().requires_grad_(False)
    state = torch.get_rng_state()
    for made in (layer.to_linear(), layer.round(rank=2)):
        assert not made.training
        assert not any(param.requires_grad for param in made.parameters())
    assert torch.equal(torch.get_rng_state(), state)
    layer.train().bias.requires_grad_(True)
    for made in (layer.to_linear(), layer.round(rank=2)):
        assert made.training
        flags = {name: p.requires_grad for name, p in made.named_parameters()}
        assert flags.pop("bias") and not any(flags.values())
    layer.cores[1].requires_grad_(True)
    assert layer.to_linear().weight.requires_grad  # any trainable core: a trainable weight
    assert [c.requires_grad for c in layer.round(rank=2).cores] == [False, True]


def test_to_linear_inside_inference_mode_makes_a_trainable_layer():
    # Found by a review (helper 68): its parameters were inference tensors, so the first
    # optimizer step raised; round, from_dense and from_cores made ordinary ones already.
    layer = TTLinear(24, 12, 4, num_cores=2)
    with torch.inference_mode():
        linear = layer.to_linear()
    assert not any(p.is_inference() for p in linear.parameters())
    torch.testing.assert_close(linear.weight, layer.to_dense(), rtol=0, atol=0)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    linear(torch.randn(3, 24)).sum().backward()
    optimizer.step()


@requires_cuda
def test_cuda_forward_backward_matches_cpu():
    torch.manual_seed(0)
    layer = TTLinear(64, 32, 4, dtype=torch.float64)
    x = torch.randn(9, 64, dtype=torch.float64)
    gpu = copy.deepcopy(layer).cuda()
    target = torch.randn(9, 32, dtype=torch.float64)
    y, y_gpu = layer(x), gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y)  # float64 on both: the default 1e-7 is ample
    (y * target).sum().backward()
    (y_gpu * target.cuda()).sum().backward()
    for cpu_param, gpu_param in zip(layer.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(gpu_param.grad.cpu(), cpu_param.grad)


def test_round_keeps_training_mode_and_bias():
    torch.manual_seed(0)
    layer = TTLinear(24, 12, 4, num_cores=2).eval()
    rounded = layer.round(rank=2)
    assert not rounded.training
    assert rounded.ranks == (1, 2, 1)
    torch.testing.assert_close(rounded.bias, layer.bias)
