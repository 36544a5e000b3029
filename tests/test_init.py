import math

import pytest
import torch

from ttlayers import TTLinear, tt_normal_
from ttlayers.init import core_std


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "rank"),
    [
        ((32, 32), (16, 16), 1),
        ((32, 32), (16, 16), 64),
        ((4, 8, 8, 4), (4, 8, 8, 4), 8),
        ((4, 8, 8, 4), (4, 8, 8, 4), 1),
        ((2, 2, 2, 2, 2, 2), (3, 1, 3, 1, 3, 1), 4),
        ((2, 2, 2, 2, 2, 2), (2, 2, 2, 2, 2, 2), 1),
        ((784, 1), (1, 10), 50),
        ((1000,), (300,), 1),
    ],
)
def test_dense_std_matches_nn_linear(in_modes, out_modes, rank):
    # The requirement: the std of to_dense() within a factor of 2 of nn.Linear's
    # default, 1/sqrt(3 in_features), for any modes and ranks. Checked over several seeds so a
    # lucky draw cannot pass it.
    torch.manual_seed(0)
    in_features, out_features = math.prod(in_modes), math.prod(out_modes)
    target = 1.0 / math.sqrt(3 * in_features)
    for _ in range(5):
        layer = TTLinear(
            in_features,
            out_features,
            rank,
            in_modes=in_modes,
            out_modes=out_modes,
            dtype=torch.float64,
        )
        std = layer.to_dense().detach().std(correction=0).item()
        assert target / 2 <= std <= 2 * target, (std, target)
    dense_std = torch.nn.Linear(in_features, out_features).weight.detach().std().item()
    assert dense_std == pytest.approx(target, rel=0.2)


def test_core_std_formula():
    # Var(W) = s^(2d) prod r_k  =>  s = (std^2 / prod r)^(1/2d)
    s = core_std((1, 4, 9, 1), 0.5)
    assert s**6 * 36 == pytest.approx(0.25)


def test_tt_normal_rank_one_frobenius_norm_is_exact():
    # For rank 1, W is a Kronecker product, so ||W||_F = prod ||G_k||_F, which the rescaling
    # fixes exactly: mean square entry of W equals std^2 up to rounding.
    cores = [torch.empty(1, 3, 2, 1, dtype=torch.float64) for _ in range(4)]
    tt_normal_(cores, std=0.1)
    from ttlayers import tt_to_dense

    w = tt_to_dense(cores)
    assert w.pow(2).mean().sqrt().item() == pytest.approx(0.1, rel=1e-12)


def test_reset_parameters_redraws_and_bias_bound():
    torch.manual_seed(1)
    layer = TTLinear(64, 32, 4, num_cores=2)
    before = [c.detach().clone() for c in layer.cores]
    layer.reset_parameters()
    assert not torch.equal(before[0], layer.cores[0])
    assert layer.bias is not None
    assert layer.bias.abs().max().item() <= 1 / math.sqrt(64)


def test_init_on_meta_and_half_precision():
    layer = TTLinear(64, 32, 4, device="meta")
    assert layer.cores[0].is_meta
    half = TTLinear(64, 32, 4, dtype=torch.float16)
    assert torch.isfinite(half.to_dense()).all()


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan"), float("inf"), 10**400])
def test_bad_std_is_a_clear_error(std):
    cores = list(TTLinear(16, 16, 2).cores)
    with pytest.raises(ValueError, match="std must be a positive finite number"):
        tt_normal_(cores, std)


@pytest.mark.parametrize("std", [True, "0.1", None])
def test_std_that_is_not_a_number_is_a_type_error(std):
    cores = list(TTLinear(16, 16, 2).cores)
    with pytest.raises(TypeError, match="std must be a positive finite number"):
        tt_normal_(cores, std)


def test_std_too_large_for_the_dtype_is_refused_not_filled_with_inf():
    # float32 holds 3.4e38; std=1e300 gave cores of inf before.
    cores = list(TTLinear(16, 16, 2).cores)
    before = [core.detach().clone() for core in cores]
    with pytest.raises(ValueError, match=r"too large for torch\.float32"):
        tt_normal_(cores, 1e300)
    assert all(torch.equal(a, b) for a, b in zip(cores, before, strict=True))
    tt_normal_([core.double() for core in cores], 1e300)  # float64 holds 1e300


def test_cores_must_be_a_chain_of_4d_tensors():
    layer = TTLinear(16, 16, 2)
    with pytest.raises(TypeError, match=r"sequence of 4-D tensors.*one tensor of shape"):
        tt_normal_(layer.cores[0], 1.0)
    with pytest.raises(ValueError, match="at least one core"):
        tt_normal_([], 1.0)
    with pytest.raises(ValueError, match="must be 4-D"):
        tt_normal_([torch.ones(3, 3)], 1.0)


def test_tt_normal_fills_a_layers_parameter_list():
    # The natural call on a layer's own cores: an nn.ParameterList, not a Sequence.
    torch.manual_seed(0)
    layer = TTLinear(256, 256, 4)
    tt_normal_(layer.cores, 0.5)
    assert abs(float(layer.to_dense().detach().std()) - 0.5) < 0.05  # 65,536 entries: ~1 %


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_tt_normal_refuses_cores_it_cannot_fill(dtype):
    # Integer cores rounded every draw to 0 silently; complex ones failed inside clamp.
    cores = [torch.empty(1, 4, 4, 2, dtype=dtype), torch.empty(2, 4, 4, 1, dtype=dtype)]
    with pytest.raises(TypeError, match=rf"real floating-point tensor .*got {dtype}"):
        tt_normal_(cores, 0.1)


@pytest.mark.parametrize("ranks", [[1], [], [1, 0, 1], [1, 2.0, 1]])
def test_core_std_needs_positive_integer_ranks(ranks):
    with pytest.raises(ValueError, match=r"ranks must be the d \+ 1 >= 2 bond ranks"):
        core_std(ranks, 1.0)


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([(1, 4, 4, 2), (3, 4, 4, 1)], "do not chain"),  # the scale needs the true bond ranks
        ([(2, 4, 4, 2), (2, 4, 4, 1)], "boundary ranks of cores must be 1"),
    ],
)
def test_tt_normal_refuses_cores_that_do_not_chain(shapes, message):
    # Before, the scale came from the cores' last ranks alone: a wrong std, no error.
    cores = [torch.zeros(shape) for shape in shapes]
    with pytest.raises(ValueError, match=message):
        tt_normal_(cores, 0.1)
    assert all(not core.any() for core in cores)  # nothing filled before the error
