import math

import pytest
import torch

from ttlayers import TTLinear, tt_normal_, tt_to_dense
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


@pytest.mark.parametrize(
    ("in_modes", "out_modes"), [((32, 32), (16, 16)), ((4, 8, 8, 4), (4, 8, 8, 4)), ((1000,), (3,))]
)
def test_default_init_at_rank_one_gives_nn_linears_entry_scale_exactly(in_modes, out_modes):
    # The factor-of-2 check above cannot tell 1/sqrt(3 in) from 1/sqrt(in) (sqrt(3) < 2). At
    # rank 1 W is a Kronecker product and tt_normal_ rescales its norm exactly, so the root mean
    # square entry is the target up to float64 rounding (1e-12 relative).
    torch.manual_seed(0)
    in_features, out_features = math.prod(in_modes), math.prod(out_modes)
    layer = TTLinear(
        in_features, out_features, 1, in_modes=in_modes, out_modes=out_modes, dtype=torch.float64
    )
    rms = layer.to_dense().detach().pow(2).mean().sqrt().item()
    assert rms == pytest.approx(1.0 / math.sqrt(3 * in_features), rel=1e-12)


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


@pytest.mark.parametrize(
    ("dtypes", "std"),
    [
        # One float16 core: scale 3e4 is below float16's 65,504, but draws of 6 sigma are not.
        ((torch.float16,), 3e4),
        # Two rank-1 cores of scale sqrt(1e10) = 1e5: fine for float32, not for the float16 one.
        ((torch.float32, torch.float16), 1e10),
    ],
)
def test_std_is_checked_against_six_sigma_of_the_narrowest_dtype(dtypes, std):
    cores = [torch.zeros(1, 64, 64, 1, dtype=dtype) for dtype in dtypes]
    with pytest.raises(ValueError, match=r"too large for torch\.float16"):
        tt_normal_(cores, std)
    assert all(not core.any() for core in cores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rank_one_cores_keep_the_entry_scale(dtype):
    # Sampled in float32 and rounded once, each of the 256 entries of a core moves by at most
    # 2^-8 (bfloat16) relative and the errors average out in the mean square: the RMS of W
    # stays within 4e-3 of std (the largest deviation seen over 20 draws was 7e-4). Sampled in
    # bfloat16 itself, the rescaling works on rounded sums and misses by about 1e-2.
    torch.manual_seed(0)
    for _ in range(20):
        cores = [torch.empty(1, 16, 16, 1, dtype=dtype) for _ in range(3)]
        tt_normal_(cores, std=0.05)
        w = tt_to_dense([core.double() for core in cores])
        assert w.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=4e-3)


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


@pytest.mark.parametrize("ranks", [[1], [], [1, 0, 1], [2, 2, 1]])
def test_core_std_needs_positive_integer_ranks(ranks):
    with pytest.raises(ValueError, match=r"ranks must be the d \+ 1 >= 2 bond ranks"):
        core_std(ranks, 1.0)


@pytest.mark.parametrize("ranks", [[1, 2.0, 1], [1, True, 1], [1, "2", 1]])
def test_core_std_names_ranks_that_are_not_ints(ranks):
    with pytest.raises(TypeError, match="ranks must hold ints"):
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
