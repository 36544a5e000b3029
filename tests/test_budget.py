"""One parameter budget for many layers: candidate shapes, spectra, the greedy allocation.

Reference for spectra: numpy SVDs of the bond unfoldings. Reference for errors: the errors
TT-SVD actually reaches at the chosen shapes and ranks.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from ttlayers import TTLinear, tensorize_, tt_svd, tt_to_dense
from ttlayers.budget import (
    RankChoice,
    _hull,
    allocate,
    allocate_evenly,
    bond_spectra,
    candidate_shapes,
    layer_options,
)
from ttlayers.calibration import ActivationStatistics, fit_tt
from ttlayers.shapes import max_ranks, num_parameters

F64 = torch.float64


def matrix_with_spectrum(out_features, in_features, decay, seed):
    """A random matrix whose singular values fall as ``exp(-decay * i)``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, out_features, dtype=F64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, dtype=F64, generator=g))
    k = min(out_features, in_features)
    s = torch.exp(-decay * torch.arange(k, dtype=F64))
    return (u[:, :k] * s) @ v[:, :k].T


def tt_svd_error(w, choice):
    cores = tt_svd(w, choice.in_modes, choice.out_modes, rank=list(choice.ranks[1:-1]))
    return float((w - tt_to_dense(cores)).norm() / w.norm())


def np_unfolding(w, in_modes, out_modes, k):
    d = len(in_modes)
    t = w.reshape(*out_modes, *in_modes).transpose([a for q in range(d) for a in (d + q, q)])
    return t.reshape(math.prod(m * n for m, n in zip(in_modes[:k], out_modes[:k], strict=True)), -1)


def test_candidate_shapes_start_with_plain_low_rank():
    shapes = candidate_shapes(784, 256, (2, 3))
    assert shapes[0] == ((1, 784), (256, 1))
    assert len(shapes) == len(set(shapes)) == 3
    for in_modes, out_modes in shapes:
        assert math.prod(in_modes) == 784 and math.prod(out_modes) == 256


@pytest.mark.parametrize(("in_modes", "out_modes"), [((1, 12), (10, 1)), ((2, 3, 2), (3, 1, 4))])
def test_bond_spectra_match_numpy_unfoldings(in_modes, out_modes):
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), dtype=F64)
    spectra = bond_spectra(w, in_modes, out_modes)
    for k, s in enumerate(spectra, start=1):
        reference = np.linalg.svd(np_unfolding(w.numpy(), in_modes, out_modes, k), compute_uv=False)
        np.testing.assert_allclose(s.numpy(), reference, rtol=1e-10, atol=1e-12)


def test_low_rank_error_estimates_are_exact():
    w = matrix_with_spectrum(20, 30, 0.2, seed=0)
    options = layer_options(w, shapes=[((1, 30), (20, 1))])
    for option in options[:10]:
        assert option.parameters == num_parameters(option.in_modes, option.out_modes, option.ranks)
        assert option.error == pytest.approx(tt_svd_error(w, option), rel=1e-8, abs=1e-12)


def test_tt_error_estimates_bound_tt_svd():
    w = torch.randn(16, 18, dtype=F64, generator=torch.Generator().manual_seed(1))
    for option in layer_options(w, shapes=[((2, 3, 3), (2, 4, 2))]):
        assert tt_svd_error(w, option) <= option.error * (1 + 1e-9) + 1e-12
        assert all(
            r <= cap
            for r, cap in zip(
                option.ranks, max_ranks(option.in_modes, option.out_modes), strict=True
            )
        )


@pytest.mark.parametrize(
    ("in_modes", "out_modes"), [((8, 4, 8), (2, 1, 1)), ((2, 8, 1, 4), (4, 1, 8, 2))]
)
def test_every_option_is_a_rank_tt_svd_builds(in_modes, out_modes):
    # Shapes whose small middle cores limit the bonds next to them (r_k <= r_{k-1} m_k n_k):
    # an option beyond that would count parameters, and estimate an error, for ranks the
    # layer cannot have. Before, (8, 4, 8) x (2, 1, 1) offered ranks (1, 1, 5, 1).
    w = matrix_with_spectrum(math.prod(out_modes), math.prod(in_modes), 0.05, seed=3)
    options = layer_options(w, shapes=[(in_modes, out_modes)])
    assert len(options) > 10
    for option in options:
        cores = tt_svd(w, in_modes, out_modes, rank=list(option.ranks[1:-1]))
        assert (1, *(int(core.shape[3]) for core in cores)) == option.ranks
        assert sum(core.numel() for core in cores) == option.parameters


def test_calibrated_low_rank_estimate_is_the_fitted_output_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 16, dtype=F64, generator=g)
    x = torch.randn(400, 16, dtype=F64, generator=g) * torch.logspace(0, -2, 16, dtype=F64)
    stats = ActivationStatistics.from_inputs(x)
    options = layer_options(
        w, statistics=stats, center=False, ridge=1e-12, shapes=[((1, 16), (12, 1))]
    )
    option = options[4]
    rank = list(option.ranks[1:-1])
    fit = fit_tt(w, stats, option.in_modes, option.out_modes, rank=rank, ridge=1e-12)
    # The same weighted low-rank optimum, once from the spectrum's tail and once from the
    # fitted cores' moments: equal up to rounding (measured 5e-12 relative).
    assert option.error == pytest.approx(fit.output_error, rel=1e-9)


LAYERS = [  # different spectra: one easy, one hard, one in between, different shapes
    matrix_with_spectrum(64, 64, 0.30, seed=3),
    matrix_with_spectrum(64, 64, 0.02, seed=4),
    matrix_with_spectrum(48, 96, 0.08, seed=5),
]


@pytest.mark.parametrize("budget", [1500, 4000, 9000])
def test_allocation_meets_the_budget_within_one_step(budget):
    options = [layer_options(w) for w in LAYERS]
    choices = allocate(options, budget)
    spent = sum(c.parameters for c in choices)
    assert spent <= budget
    # Within one rank step: no layer could take its next cheaper rank step and still fit.
    largest_step = max(w.shape[0] + w.shape[1] for w in LAYERS)
    assert budget - spent <= largest_step


@pytest.mark.parametrize("budget", [4000, 8000])
def test_allocation_beats_uniform_ranks(budget):
    options = [layer_options(w) for w in LAYERS]
    choices = allocate(options, budget)
    chosen_error = sum(tt_svd_error(w, c) ** 2 for w, c in zip(LAYERS, choices, strict=True))
    assert sum(c.parameters for c in choices) <= budget
    # Uniform: the same plain low rank everywhere, as large as the budget allows.
    rank = max(r for r in range(1, 64) if sum(r * sum(w.shape) for w in LAYERS) <= budget)
    uniform = [
        RankChoice((1, w.shape[1]), (w.shape[0], 1), (1, rank, 1), rank * sum(w.shape), 0.0)
        for w in LAYERS
    ]
    uniform_error = sum(tt_svd_error(w, c) ** 2 for w, c in zip(LAYERS, uniform, strict=True))
    assert chosen_error < 0.8 * uniform_error


@pytest.mark.parametrize("seed", range(6))
def test_allocation_leaves_no_single_upgrade_that_fits(seed):
    # Small layers whose few options make the hull greedy stop with budget to spare. After
    # it, no layer may have an option with less error that the leftover would pay for. The
    # exact optimum (brute force over all combinations) can still be lower, as allocate's
    # docstring says: on these cases by at most 4.5 % (measured); 10 % leaves a margin.
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(8 + 4 * k, 12, dtype=F64, generator=g) for k in range(3)]
    options = [layer_options(w) for w in layers]  # low rank and TT: frontiers with kinks
    smallest = sum(min(o.parameters for o in layer) for layer in options)
    for budget in range(smallest, 3 * smallest, 7):
        choices = allocate(options, budget)
        spent = sum(c.parameters for c in choices)
        assert spent <= budget
        for layer, chosen in zip(options, choices, strict=True):
            for option in layer:
                if option.parameters - chosen.parameters <= budget - spent:
                    assert option.error >= chosen.error
        best = min(
            sum(c.error**2 for c in combo)
            for combo in itertools.product(*options)
            if sum(c.parameters for c in combo) <= budget
        )
        assert best <= sum(c.error**2 for c in choices) <= 1.10 * best


def test_layer_options_check_the_weight_and_shapes():
    w = torch.randn(32, 32, dtype=F64)
    with pytest.raises(ValueError, match="in_modes must multiply to in_features=32"):
        layer_options(w, shapes=[((2, 8), (4, 8))])
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        layer_options(w.long())
    with pytest.raises(ValueError, match="weight holds NaN or Inf"):
        layer_options(w.masked_fill(w > 1, math.nan))
    # A NumPy integer is a budget like any other.
    options = [layer_options(w)]
    assert allocate(options, np.int64(500)) == allocate(options, 500)


def test_allocation_rejects_impossible_budgets():
    options = [layer_options(w) for w in LAYERS]
    with pytest.raises(ValueError, match="budget"):
        allocate(options, 10)
    with pytest.raises(ValueError, match="no options"):
        allocate([[]], 100)
    with pytest.raises(TypeError, match="budget"):
        allocate(options, 100.0)


# --- tensorize_(compression= / params=) ---------------------------------------------------


def mlp(widths=(64, 96, 64, 10), seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("calibrated", [False, True])
def test_tensorize_compression_meets_the_budget(calibrated):
    model = mlp()
    dense = sum(p.numel() for p in model.parameters())
    x = torch.randn(200, 64, dtype=F64)
    report = tensorize_(model, compression=4.0, calibration=x if calibrated else None)
    assert report.budget == int(dense / 4.0)
    # The 64 -> 10 classifier has no lossless TT form smaller than its weight (rank 10 takes
    # 740 parameters against 640): the budget keeps it dense, and it counts against it.
    assert [skip.name for skip in report.skipped] == ["4"]
    assert "kept dense by the budget" in report.skipped[0].reason
    assert isinstance(model[4], nn.Linear)
    kept = 64 * 10 + 10
    assert report.params_before + kept == dense
    assert report.params_after + kept <= report.budget
    # Within one rank step, as allocate() is tested: the room left is at most the largest
    # step of one bond rank by 1 (r_k m_k n_k + m_{k+1} n_{k+1} r_{k+2}) of a chosen shape.
    # (It was a 10 % band, 327 parameters here, twice the largest step, 160.)
    steps = [
        row.ranks[k] * row.in_modes[k] * row.out_modes[k]
        + row.in_modes[k + 1] * row.out_modes[k + 1] * row.ranks[k + 2]
        for row in report.layers
        for k in range(len(row.in_modes) - 1)
    ]
    assert report.budget - report.params_after - kept <= max(steps)
    assert "budget" in str(report)
    if calibrated:
        assert all(row.output_error <= row.tt_svd_output_error for row in report.layers)


def test_tensorize_params_budget_and_num_cores():
    model = mlp()
    report = tensorize_(model, params=6000, num_cores=3, filter_fn=lambda m, n: n != "4")
    assert report.params_after <= 6000
    assert all(len(row.in_modes) == 3 for row in report.layers)
    assert [row.name for row in report.layers] == ["0", "2"]


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_budget_above_the_model_never_makes_a_layer_larger(calibrated):
    model = mlp()
    x = torch.randn(200, 64, dtype=F64)
    report = tensorize_(model, params=10**7, calibration=x if calibrated else None)
    assert report.layers  # every layer still gets its largest TT form below its dense size
    for row in report.layers:
        assert row.params_after < row.params_before, row.name
    assert report.params_after < report.params_before


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_shape_that_starts_above_the_dense_size_is_never_chosen(calibrated):
    # suggest_modes puts a prime size in one core ((1, 3) x (1, 3), (1, 17) x (1, 7)): at
    # rank 1 that shape has one parameter more than the dense weight and no error, and an
    # allocator with room chose it. Each layer of these models can be made smaller.
    torch.manual_seed(0)
    models = [
        (nn.Sequential(nn.Linear(3, 3)).double(), {"params": 10**6}),
        (
            nn.Sequential(
                nn.Linear(128, 128, bias=False),
                nn.Linear(128, 17, bias=False),
                nn.Linear(17, 7, bias=False),
            ).double(),
            {"compression": 2.0},
        ),
    ]
    for model, budget in models:
        x = torch.randn(300, model[0].in_features, dtype=F64)
        report = tensorize_(model, calibration=x if calibrated else None, **budget)
        # Every layer is converted to a smaller form, or (128 -> 17 and 17 -> 7 at 2x, whose
        # forms below their size lose 2 of 17 and 1 of 7 directions) kept dense as it was.
        assert len(report.layers) + len(report.skipped) == len(model)
        for row in report.layers:
            assert row.params_after < row.params_before, (row.name, row.in_modes, row.ranks)
        for skip in report.skipped:
            assert "kept dense by the budget" in skip.reason
            assert type(model[int(skip.name)]) is nn.Linear


def test_a_budget_below_the_smallest_forms_says_what_the_biases_took():
    # The message gave the budget less the biases as if it were the budget passed.
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(
        ValueError,
        match=r"budget 100, 36 after the 64 bias parameters, is below .* 1 selected layer, 48",
    ):
        tensorize_(model, params=100)
    assert type(model[0]) is nn.Linear


def test_num_cores_2_includes_plain_low_rank_and_larger_d_skips_what_cannot_shrink():
    # 13 -> 17 has no balanced 2-core shape below its size; plain low rank (2 cores) is one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 17), nn.Linear(64, 64)).double()
    # Selected by filter_fn, so that the budget converts it rather than keep it dense.
    report = tensorize_(model, compression=1.5, num_cores=2, filter_fn=lambda m, n: True)
    assert report.layers[0].in_modes == (1, 13)
    assert report.layers[0].params_after < report.layers[0].params_before
    # With 3 cores its only shape is (1, 13, 1) x (1, 17, 1): skipped, with the reason;
    # selected by filter_fn, converted whatever its size (as documented).
    model = nn.Sequential(nn.Linear(13, 17), nn.Linear(64, 64)).double()
    report = tensorize_(model, compression=2.0, num_cores=3)
    assert [row.name for row in report.layers] == ["1"]
    assert "shape of 3 cores, (1, 13, 1) x (1, 17, 1), takes 223" in report.skipped[0].reason
    report = tensorize_(model, params=10**4, num_cores=3, filter_fn=lambda m, n: n == "0")
    assert report.layers[0].in_modes == (1, 13, 1)


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"compression": 4.0, "params": 100}, ValueError, "either"),
        ({"compression": 4.0, "rank": 3}, ValueError, "cannot be combined"),
        ({"compression": 0.5}, ValueError, "compression"),
        ({"compression": 1.0}, ValueError, "compression"),
        ({"compression": "4"}, TypeError, "compression"),
        ({"params": 5.0}, TypeError, "params"),
        ({"params": 100}, ValueError, "bias"),
        ({"params": 200}, ValueError, "budget"),
        ({"compression": 1.01, "num_cores": 1}, ValueError, "num_cores=1 keeps each weight"),
    ],
)
def test_tensorize_bad_budgets_leave_the_model_alone(kwargs, kind, match):
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(kind, match=match):
        tensorize_(model, **kwargs)
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential)) for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_allocate_evenly_keeps_every_layer_within_its_share():
    options = [layer_options(w) for w in LAYERS]
    shares = [1000, 1000, 1500]
    choices = allocate_evenly(options, shares)
    for choice, share, layer in zip(choices, shares, options, strict=True):
        assert choice.parameters <= share
        assert choice.error == min(o.error for o in layer if o.parameters <= share)
    with pytest.raises(ValueError, match="budget"):
        allocate_evenly(options, [1, 1000, 1000])
    with pytest.raises(ValueError, match="one entry per layer"):
        allocate_evenly(options, [1000])
    # Found by a review: a str budget failed inside a comparison, a float one was taken, and
    # a layer without options was "below its smallest TT form (0)".
    for bad in ("1000", 1000.5, True):
        with pytest.raises(TypeError, match=r"budgets\[1\] must be an int"):
            allocate_evenly(options, [1000, bad, 1500])
    with pytest.raises(ValueError, match="layer 1 has no options"):
        allocate_evenly([options[0], []], [1000, 1000])
    assert allocate_evenly(options, [np.int64(s) for s in shares]) == choices


def test_bond_spectra_name_modes_that_do_not_fit_the_matrix():
    # A raw reshape error before.
    with pytest.raises(ValueError, match=r"in_modes must multiply to in_features=4"):
        bond_spectra(torch.randn(4, 4), (2, 3), (2, 2))
    with pytest.raises(ValueError, match="2-D"):
        bond_spectra(torch.randn(16), (4, 4), (1, 1))


@pytest.mark.parametrize("calibrated", [False, True])
def test_tensorize_even_allocation_compresses_every_layer(calibrated):
    model = mlp()
    x = torch.randn(200, 64, dtype=F64)
    report = tensorize_(
        model,
        compression=4.0,
        allocation="even",
        filter_fn=lambda m, n: n != "4",
        calibration=x if calibrated else None,
    )
    assert all(row.compression >= 4.0 for row in report.layers)
    with pytest.raises(ValueError, match="allocation"):
        tensorize_(mlp(), compression=4.0, allocation="uniform")


def test_even_allocation_names_the_layer_whose_share_is_too_small():
    # The 64 -> 10 layer's share of a 30x budget, 13,098 / 30 * 650 / 13,098 = 21
    # parameters, cannot hold its 10 biases and its smallest TT form (32). The message names
    # that layer by its name in the model (before, by its position among the selected ones,
    # 2, also the name of another layer) and gives its whole share (before, minus the biases).
    model = mlp()
    with pytest.raises(ValueError, match=r"layer '4', 21 parameters, .*smallest TT form"):
        tensorize_(model, compression=30.0, allocation="even")
    assert not any(isinstance(module, TTLinear) for module in model)


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_budget_skips_layers_no_factorization_makes_smaller(calibrated):
    # A 1 -> 64 layer has 64 weights; rank 1 already takes 65. Before, a budget converted it
    # (1.0x, one parameter more) and counted it against the budget of the others.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64)).double()
    x = torch.randn(32, 1, dtype=torch.float64)
    report = tensorize_(model, compression=2.0, calibration=x if calibrated else None)
    assert [row.name for row in report.layers] == ["2"]
    assert (
        report.skipped[0].name == "0" and "not fewer than the dense 64" in report.skipped[0].reason
    )
    assert type(model[0]) is nn.Linear
    assert report.budget == (64 * 64 + 64) // 2  # the budget of the layers converted
    forced = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64))
    report = tensorize_(forced, compression=2.0, filter_fn=lambda module, name: True)
    assert isinstance(forced[0], TTLinear)  # selected by filter_fn: converted regardless


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_binding_budget_keeps_a_layer_dense_where_that_costs_least_error(calibrated):
    # The 64 -> 10 classifier of mlp() has no lossless TT form smaller than its 640 weights
    # (rank 10 takes 740): before, a budget truncated it (rank <= 9 of 10) whatever that
    # cost; at 6x over a Fashion-MNIST MLP, 11 points of test accuracy. Now the default
    # selection may keep it dense under a binding budget, while a layer filter_fn selects is
    # converted regardless (as documented). Reference: the allocator's own objective, the
    # sum of the layers' squared relative errors (a layer kept dense: 0), is lower than with
    # the classifier forced into TT form at the same budget; the dense choice only adds
    # options, and here it frees the other layers 230 parameters (a truncated classifier
    # still takes about 600).
    x = torch.randn(200, 64, dtype=F64) if calibrated else None
    kept, forced = mlp(), mlp()
    report = tensorize_(kept, compression=4.0, calibration=x)
    everything = tensorize_(forced, compression=4.0, calibration=x, filter_fn=lambda m, n: True)
    assert [skip.name for skip in report.skipped] == ["4"]
    assert type(kept[4]) is nn.Linear
    torch.testing.assert_close(kept[4].weight, mlp()[4].weight, rtol=0, atol=0)
    assert isinstance(forced[4], TTLinear) and forced[4].ranks[1] < 10
    assert report.budget == everything.budget
    assert report.params_after + 650 <= report.budget
    assert everything.params_after <= everything.budget

    def objective(rows):
        return sum((row.output_error if calibrated else row.relative_error) ** 2 for row in rows)

    assert objective(report.layers) < objective(everything.layers)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("compression", [3.0, 6.0])
def test_keeping_layers_dense_never_raises_the_allocators_objective(seed, compression):
    # Found by a review (helper 89): the allocator's greedy runs on convex hulls, which a
    # dense point (no error, many parameters) can strip of the steps between; with seed 7
    # at 6x below, keeping '2' dense gave a summed squared error of 1.340 against 1.193 with
    # every layer converted. Both allocations are now run and the better kept, so the
    # default selection (which may keep layers dense) is never worse by the allocator's
    # objective than filter_fn's (which converts all). With 2 cores the estimated errors are
    # the achieved ones (Eckart-Young), so the report's errors compare to rounding (1e-9).
    def model():
        torch.manual_seed(seed + 7)
        return nn.ModuleList([nn.Linear(32, 8), nn.Linear(48, 64), nn.Linear(16, 10)])

    def objective(report):
        return sum(row.relative_error**2 for row in report.layers) + 0.0  # kept dense: 0

    default = tensorize_(model(), compression=compression, num_cores=2)
    forced = tensorize_(model(), compression=compression, num_cores=2, filter_fn=lambda m, n: True)
    assert default.budget == forced.budget
    assert objective(default) <= objective(forced) * (1 + 1e-9)


def _options(points):
    return [
        RankChoice((1, 4), (4, 1), (1, k + 1, 1), p, math.sqrt(s))
        for k, (p, s) in enumerate(points)
    ]


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_budget_leaves_a_2x2_layer_dense(calibrated):
    """Kills: _cannot_shrink testing ``smallest <= dense`` (2 x 2: rank 1 costs 4 = 4)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2), nn.Linear(2, 2))
    x = torch.randn(100, 64) if calibrated else None
    report = tensorize_(model, compression=2.0, calibration=x)
    # The 64 -> 2 layer's forms below its 128 weights lose one of its two directions: the
    # budget keeps it dense instead.
    assert [row.name for row in report.layers] == ["0"]
    reasons = {skip.name: skip.reason for skip in report.skipped}
    assert sorted(reasons) == ["2", "3"]
    assert "low rank cannot make it smaller" in reasons["3"]
    assert "kept dense by the budget" in reasons["2"]
    assert type(model[3]) is nn.Linear and type(model[2]) is nn.Linear
    assert all(row.params_after < row.params_before for row in report.layers)


def test_options_never_reach_the_dense_size():
    """layer_options offers no point at the dense size (whichever of _rank_path's stop or the
    filter after it ensures that).

    A 4 x 4 weight: plain low rank 2 and the (2,2)x(2,2) TT at rank 2 both take exactly 16
    parameters, the dense count; layer_options promises fewer (except the all-ones start).
    """
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))
    for option in layer_options(w):
        assert option.parameters < 16 or set(option.ranks) == {1}, option
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    report = tensorize_(model, params=10**6)
    assert report.layers[0].params_after < report.layers[0].params_before == 16


def test_allocate_is_optimal_when_its_hull_steps_land_on_the_budget():
    """Kills: ``break`` instead of ``continue`` when the steepest hull step does not fit.

    A's step is the steepest but costs 40 of the 30 left; the greedy must go on with C (20)
    and B's first step (10), spending the budget exactly: the optimum, by brute force. A
    greedy that stops there leaves the rest to the largest-drop pass, which buys B's top
    (drop 0.60 < 0.45 + 0.21). Squared errors summed: 2.34 against 2.40.
    """
    layers = [
        _options([(10, 1.0), (50, 0.0)]),  # slope 0.025
        _options([(10, 1.0), (20, 0.79), (30, 0.59), (40, 0.40)]),  # slopes .021 .020 .019
        _options([(10, 1.0), (30, 0.55)]),  # slope 0.0225
    ]
    budget = 60
    chosen = allocate(layers, budget)
    assert sum(c.parameters for c in chosen) <= budget
    best = min(
        sum(c.error**2 for c in combo)
        for combo in itertools.product(*layers)
        if sum(c.parameters for c in combo) <= budget
    )
    assert sum(c.error**2 for c in chosen) == pytest.approx(best, rel=1e-12)
    assert best == pytest.approx(2.34, rel=1e-12)


# --- from a mutation audit: paths, ties, exact budgets -----------------------------------


def synthetic(points):
    """A layer's options from ``(parameters, squared error)`` pairs (shape is irrelevant)."""
    return [
        RankChoice((1, 4), (4, 1), (1, k + 1, 1), p, math.sqrt(s))
        for k, (p, s) in enumerate(points)
    ]


def brute_force(layers, budget):
    """The least summed squared error of one option per layer within the budget."""
    return min(
        sum(c.error**2 for c in combo)
        for combo in itertools.product(*layers)
        if sum(c.parameters for c in combo) <= budget
    )


# --- the greedy rank path of one shape ---------------------------------------------------------


@pytest.mark.parametrize(("out_features", "in_features"), [(3, 7), (4, 5), (5, 11), (6, 6), (2, 9)])
def test_low_rank_path_is_every_rank_below_the_dense_size(out_features, in_features):
    """Finds: _rank_path stopping at ``>= limit - 1`` (one parameter early).

    (A path that ran one point past the limit would not show here: layer_options drops
    points at or above the dense size, which test_options_never_reach_the_dense_size checks.)

    Plain low rank at rank r takes r (m + n) parameters; the path must offer every rank up to
    the largest with r (m + n) < m n (and r <= min(m, n)), by brute force over r. 3 x 7 is the
    sharp case: rank 2 takes 20 parameters, one below the dense 21.
    """
    w = matrix_with_spectrum(out_features, in_features, 0.3, seed=out_features)
    options = layer_options(w, shapes=[((1, in_features), (out_features, 1))])
    dense, step = out_features * in_features, out_features + in_features
    below = [r for r in range(1, min(out_features, in_features) + 1) if r * step < dense]
    expected = below or [1]  # the all-ones start is always there
    assert [option.ranks[1] for option in options] == expected


def test_each_path_step_takes_the_most_error_per_parameter():
    """Finds: _rank_path ranking bonds by their gain alone, not gain per added parameter.

    The module docstring: the path raises "the bond whose next singular value removes the most
    error per added parameter". Reference: numpy SVDs of the unfoldings for the gains and
    shapes.num_parameters for the costs; among the bonds that may still grow (a rank is at most
    its cap and its neighbours' ranks times their cores' sizes), the one taken must have the
    largest ratio (relative 1e-9: numpy and torch SVDs agree to ~1e-14).
    """
    # Bonds of unequal costs: growing bond 1 costs 8 + 9 r_2, bond 2 costs 9 r_1 + 8, so the
    # bond with the larger next singular value is not always the better buy.
    in_modes, out_modes = (2, 3, 4), (4, 3, 2)
    w = torch.randn(24, 24, dtype=F64, generator=torch.Generator().manual_seed(0))
    options = layer_options(w, shapes=[(in_modes, out_modes)])
    assert len(options) > 5
    d = len(in_modes)
    energy = [
        np.linalg.svd(np_unfolding(w.numpy(), in_modes, out_modes, k), compute_uv=False) ** 2
        for k in range(1, d)
    ]
    sizes = [m * n for m, n in zip(in_modes, out_modes, strict=True)]
    caps = [1, *(len(e) for e in energy), 1]
    for here, there in itertools.pairwise(options):
        ranks = list(here.ranks)
        ratios = {}
        for k in range(1, d):
            if ranks[k] < min(caps[k], ranks[k - 1] * sizes[k - 1], ranks[k + 1] * sizes[k]):
                grown = ranks.copy()
                grown[k] += 1
                cost = num_parameters(in_modes, out_modes, grown) - here.parameters
                ratios[k] = energy[k - 1][ranks[k]] / cost
        taken = [k for k in range(1, d) if there.ranks[k] == ranks[k] + 1]
        assert len(taken) == 1 and taken[0] in ratios
        assert ratios[taken[0]] >= max(ratios.values()) * (1 - 1e-9), (here.ranks, ratios)


@pytest.mark.parametrize(
    ("in_modes", "out_modes"), [((8, 2, 2), (1, 1, 4)), ((8, 1, 1), (1, 1, 8))]
)
def test_option_ranks_are_the_ranks_of_the_matrix_tt_svd_builds(in_modes, out_modes):
    """Finds: _rank_path without the right-neighbour limit ``r_k <= r_{k+1} m_{k+1} n_{k+1}``.

    Beyond that limit a bond rank is redundant: TT-SVD builds cores of that size, so the shapes
    check passes, but the matrix they make has a smaller rank at that bond, and the option
    pays for parameters that carry nothing. Reference: numpy's matrix_rank of each bond
    unfolding of the rebuilt matrix (default tolerance, S_max * max(shape) * eps; the kept
    singular values of these float64 matrices are >= 0.1 S_max, the dropped ones ~1e-16).
    """
    w = matrix_with_spectrum(math.prod(out_modes), math.prod(in_modes), 0.05, seed=3)
    for option in layer_options(w, shapes=[(in_modes, out_modes)]):
        rebuilt = tt_to_dense(tt_svd(w, in_modes, out_modes, rank=list(option.ranks[1:-1])))
        actual = [
            int(np.linalg.matrix_rank(np_unfolding(rebuilt.numpy(), in_modes, out_modes, k)))
            for k in range(1, len(in_modes))
        ]
        assert (1, *actual, 1) == option.ranks


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "expected"),
    [
        ((8, 1, 1), (1, 1, 8), [(1, r, r, 1) for r in (1, 2, 3)]),
        ((4, 1, 1, 4), (4, 1, 1, 4), [(1, r, r, r, 1) for r in (1, 2, 3, 4, 5)]),
    ],
)
def test_bonds_that_can_only_grow_together_are_raised_together(in_modes, out_modes, expected):
    """Finds: _rank_path stuck at ranks of 1 where neighbouring bonds can only grow together.

    Around a core with m n = 1 a bond rank is at most its neighbour's and the neighbour's at
    most its own, so neither can grow alone: such explicit shapes offered one option, every
    rank 1. Parameters at rank r: (8, 1, 1) x (1, 1, 8), 8 r + r^2 + 8 r, below the dense 64
    up to r = 3 (57; r = 4 takes 80); (4, 1, 1, 4) squared, 16 r + 2 r^2 + 16 r, below 256 up
    to r = 5 (210; r = 6 takes 264). Each step must remove error, and each estimate must
    bound TT-SVD's error at its ranks (as test_tt_error_estimates_bound_tt_svd asserts).
    """
    w = matrix_with_spectrum(math.prod(out_modes), math.prod(in_modes), 0.3, seed=1)
    options = layer_options(w, shapes=[(in_modes, out_modes)])
    assert [option.ranks for option in options] == expected
    errors = [option.error for option in options]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    for option in options:
        assert tt_svd_error(w, option) <= option.error * (1 + 1e-9) + 1e-12


def _reference_path_check(w, in_modes, out_modes, options):
    """Problems with ``options`` as one shape's greedy path, against a numpy reference.

    P1: each point's ranks form a chain TT-SVD builds (each bond within its cap and its
    neighbours' ranks times their cores' sizes), with ``num_parameters`` parameters and the
    error ``sqrt(dropped energy / total)``. P2: each step is, among the moves from the point
    before, one with the most energy removed per added parameter; a move raises one bond by
    one or, only where no bond can grow alone, one bond plus the cheapest set of others that
    makes the chain valid. P3: the path stops only where the best next move would reach the
    dense size. Ratios and errors agree to 1e-9 (numpy and torch SVDs agree to ~1e-14).
    """
    d, dense = len(in_modes), w.numel()
    sizes = [m * n for m, n in zip(in_modes, out_modes, strict=True)]
    energy = [
        np.linalg.svd(np_unfolding(w.numpy(), in_modes, out_modes, k), compute_uv=False) ** 2
        for k in range(1, d)
    ]
    caps, total = [1, *(len(e) for e in energy), 1], float((w**2).sum())

    def valid(r):
        return r[0] == r[d] == 1 and all(
            r[k] <= min(caps[k], r[k - 1] * sizes[k - 1], r[k + 1] * sizes[k]) for k in range(1, d)
        )

    def cost(r):
        return num_parameters(in_modes, out_modes, r)

    def moves(r):
        single = [q for k in range(1, d) if valid(q := [*r[:k], r[k] + 1, *r[k + 1 :]])]
        if single:
            return single
        joint = []
        for k in range(1, d):
            others = [j for j in range(1, d) if j != k]
            grown = []
            for raised in itertools.product((0, 1), repeat=len(others)):
                q = list(r)
                q[k] += 1
                for j, extra in zip(others, raised, strict=True):
                    q[j] += extra
                if valid(q):
                    grown.append(q)
            if grown:
                joint.append(min(grown, key=cost))
        return joint

    def ratios(r):
        removed = {
            tuple(q): sum(float(energy[k - 1][r[k] : q[k]].sum()) for k in range(1, d))
            for q in moves(r)
        }
        return {q: gain / (cost(q) - cost(r)) for q, gain in removed.items()}

    problems = []
    for option in options:
        r = list(option.ranks)
        error = math.sqrt(sum(float(e[r[k] :].sum()) for k, e in enumerate(energy, 1)) / total)
        if not valid(r) or option.parameters != cost(r) or abs(option.error - error) > 1e-9:
            problems.append(f"P1 {option.ranks}")
    for here, there in itertools.pairwise(options):
        scores = ratios(list(here.ranks))
        taken = scores.get(tuple(there.ranks), -math.inf)
        if taken < max(scores.values()) * (1 - 1e-9):
            problems.append(f"P2 {here.ranks} -> {there.ranks}; best {max(scores, key=scores.get)}")
    scores = ratios(list(options[-1].ranks))
    if scores and cost(best := list(max(scores, key=scores.get))) < dense:
        problems.append(f"P3 stopped at {options[-1].ranks}; {best} has {cost(best)} < {dense}")
    return problems


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "seed"),
    [
        ((4, 1, 3), (1, 2, 1), 128),
        ((1, 1, 2, 1, 1), (2, 1, 1, 1, 5), 1613),
        ((5, 1, 2, 1, 1), (5, 1, 1, 4, 1), 1193),
        ((3, 1, 1, 8), (1, 2, 1, 4), 70),
        ((2, 3, 4), (4, 3, 2), 0),
        ((8, 1, 1), (1, 1, 8), 1),
    ],
)
def test_rank_path_matches_a_reference_greedy(in_modes, out_modes, seed):
    """Finds: a step cost with the cores' sizes swapped, the joint move of the least gain, and
    floor instead of ceil where a joint move propagates a raised bond to its neighbours.

    The other path tests use near-symmetric shapes, where those mistakes cost nothing; these
    shapes of unequal cores and modes of 1 (from a review helper's fuzzing) expose them.
    """
    w = matrix_with_spectrum(math.prod(out_modes), math.prod(in_modes), 0.1, seed)
    options = layer_options(w, shapes=[(in_modes, out_modes)])
    assert len(options) > 1
    assert _reference_path_check(w, in_modes, out_modes, options) == []


def test_a_layer_that_cannot_shrink_gets_its_rank_one_points_only():
    """Finds: layer_options dropping the first points of a layer that has nothing smaller.

    A 2 x 2 weight (4 numbers): plain low rank at rank 1 takes 4, (1, 2) x (1, 2) takes 5,
    (1, 2, 1) x (1, 2, 1) takes 6. The docstring: only where no shape has a point below the
    dense size, the first points, all ranks 1, which have as many or more.
    """
    w = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    options = layer_options(w)
    assert [option.parameters for option in options] == [4, 5, 6]
    assert all(set(option.ranks) == {1} for option in options)


def test_candidate_shapes_are_without_duplicates_where_they_coincide():
    # A 13 -> 1 layer: the balanced 2-core shape is plain low rank's; a d given twice is one.
    assert candidate_shapes(13, 1, (2, 3)) == [((1, 13), (1, 1)), ((1, 13, 1), (1, 1, 1))]
    assert candidate_shapes(784, 256, (2, 2, 3)) == candidate_shapes(784, 256, (2, 3))


def test_bond_spectra_of_a_float32_weight_are_float64():
    # Singular values from 1 down to 1e-6: float32 SVD gets the smallest wrong by ~1e-3
    # relative, float64 to ~1e-12. Reference: numpy float64 on the same (float32) numbers.
    u, _ = torch.linalg.qr(
        torch.randn(24, 24, dtype=F64, generator=torch.Generator().manual_seed(0))
    )
    w = ((u * torch.logspace(0, -6, 24, dtype=F64)) @ u.T).float()
    (s,) = bond_spectra(w, (1, 24), (24, 1))
    assert s.dtype == torch.float64
    reference = np.linalg.svd(w.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s.numpy(), reference, rtol=1e-9)


def test_a_budget_scores_bias_free_layers_on_uncentered_moments():
    """Finds: the budget scoring every calibrated layer on centered moments.

    A layer without a bias cannot absorb the mean of its outputs, so its options' errors are
    of the uncentered outputs, as fit_tt fits it. Inputs with a large mean (5) make the two
    scores rank the options differently. Reference: the allocation computed by hand from
    layer_options(center=False) on the original model's activations (those are what the
    budget scores) and allocate().
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 32, dtype=F64, generator=g) * torch.logspace(0, -3, 32, dtype=F64)
    x = x + 5.0 * torch.randn(32, dtype=F64, generator=g)
    with torch.no_grad():
        inputs = [x, model[0](x)]
    options = [
        layer_options(
            linear.weight.detach(),
            statistics=ActivationStatistics.from_inputs(h),
            center=False,
            shapes=candidate_shapes(32, 32, (2, 3)),
        )
        for linear, h in zip(model, inputs, strict=True)
    ]
    expected = [(c.in_modes, c.out_modes, c.ranks) for c in allocate(options, 2 * 32 * 32 // 4)]
    report = tensorize_(model, compression=4.0, calibration=x)
    assert [(row.in_modes, row.out_modes, row.ranks) for row in report.layers] == expected


# --- allocate ----------------------------------------------------------------------------------


def test_allocate_rejects_a_bool_budget():
    """Finds: allocate's type check without its ``isinstance(budget, bool)`` clause.

    ``True`` is an int to Python, and allocate(options, True) would be a budget of 1.
    """
    options = [synthetic([(10, 1.0), (20, 0.5)])]
    with pytest.raises(TypeError, match="budget must be an int; got bool"):
        allocate(options, True)


def test_allocate_with_options_of_equal_parameters_in_any_order():
    """Finds: _frontier sorting by parameters only (not by error within equal parameters).

    Layer A has two options of 10 parameters, the worse one first (two candidate shapes can
    cost the same). At budget 30, A's step to (20, 0.0) lands exactly on the budget: the
    optimum (1.0, brute force). Sorted without the error, the frontier keeps both 10s and the
    hull starts at the worse one; its free step has a tiny slope, so A's real step is pushed
    after B's, which then takes the budget (1.499).
    """
    layers = [
        synthetic([(10, 1.0), (10, 0.999), (20, 0.0)]),
        synthetic([(10, 1.0), (20, 0.5)]),
    ]
    chosen = allocate(layers, 30)
    assert sum(c.parameters for c in chosen) <= 30
    assert sum(c.error**2 for c in chosen) == pytest.approx(brute_force(layers, 30), rel=1e-12)
    assert brute_force(layers, 30) == pytest.approx(1.0, rel=1e-12)


def test_allocate_never_pays_for_an_option_with_no_less_error():
    """Finds: _frontier keeping options of equal error (``<=`` for ``<``).

    Layer A's (30, 0.5) has no less error than its (20, 0.5). Kept on the hull, it is a step
    of slope 0 that the greedy takes when it fits, and its 10 parameters are then missing for
    B's (25, 0.81), an option off B's hull that the leftover pass buys otherwise. Optimum at
    45 by brute force: A (20, 0.5) with B (25, 0.81), 1.31.
    """
    layers = [
        synthetic([(10, 1.0), (20, 0.5), (30, 0.5)]),
        synthetic([(10, 1.0), (25, 0.81), (60, 0.0)]),
    ]
    chosen = allocate(layers, 45)
    for option, layer in zip(chosen, layers, strict=True):  # no option dominates the choice
        assert not any(o.parameters < option.parameters and o.error <= option.error for o in layer)
    assert sum(c.error**2 for c in chosen) == pytest.approx(brute_force(layers, 45), rel=1e-12)
    assert brute_force(layers, 45) == pytest.approx(1.31, rel=1e-12)


def test_the_leftover_goes_to_the_largest_error_drop_first():
    """Finds: the leftover pass ranking upgrades by drop per parameter instead of by drop.

    allocate's docstring: the budget left over is spent "the largest error drop first". Both
    layers' hull steps (cost 20) miss the budget of 30 by 10; off the hulls, X's (20, 0.7)
    drops 0.3 for 10 parameters and Z's (14, 0.85) drops 0.15 for 4 (the better ratio). Only
    one fits. The largest drop is also the optimum here (1.7 by brute force, against 1.85).
    """
    layers = [
        synthetic([(10, 1.0), (20, 0.7), (30, 0.0)]),
        synthetic([(10, 1.0), (14, 0.85), (30, 0.0)]),
    ]
    chosen = allocate(layers, 30)
    assert [c.parameters for c in chosen] == [20, 10]
    assert sum(c.error**2 for c in chosen) == pytest.approx(brute_force(layers, 30), rel=1e-12)
    assert brute_force(layers, 30) == pytest.approx(1.7, rel=1e-12)


def test_allocate_evenly_fits_a_share_exactly_and_never_pays_for_nothing():
    """Finds: allocate_evenly's ``<= budget`` as ``<``, and its tie-break on parameters
    dropped (first of equal errors) or reversed (most parameters).

    An option of exactly the layer's share fits it. Of two options with the same error, the
    one with fewer parameters: more would compress the layer less for nothing.
    """
    layer = synthetic([(10, 1.0), (30, 0.25), (20, 0.25), (40, 0.0)])
    assert allocate_evenly([layer], [40])[0].parameters == 40
    chosen = allocate_evenly([layer], [35])[0]
    assert (chosen.parameters, chosen.error) == (20, 0.5)
    # The same on real options: a zero weight has error 0 at every rank, so the least
    # parameters of all candidates wins, the rank-1 TT of the smallest shape.
    options = layer_options(torch.zeros(16, 16, dtype=F64))
    chosen = allocate_evenly([options], [10**6])[0]
    assert chosen.error == 0.0
    assert chosen.parameters == min(o.parameters for o in options)


# --- tensorize_ with a budget --------------------------------------------------------------


def test_a_budget_that_fits_a_rank_step_exactly_is_spent_exactly():
    """Finds: surgery._budget handing allocate one parameter less than the budget minus the
    biases (and _rank_path stopping one parameter early).

    A 7 -> 3 layer: rank 2 takes 2 (7 + 3) = 20 core parameters, with 3 biases 23, below the
    dense 24 (21 weights); rank 3 would take 33. params=23 must give rank 2, all 23 spent.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 3)).double()
    report = tensorize_(model, params=23)
    assert report.params_after == 23
    assert report.layers[0].ranks[1] == 2


def test_a_budget_of_just_the_biases_is_refused_for_the_biases():
    """Finds: surgery._budget accepting a budget equal to the biases (``<`` for ``<=``).

    Nothing is then left for the cores; the message must say so, not report a budget of 0
    that the caller never gave.
    """
    model = nn.Sequential(nn.Linear(7, 3)).double()
    with pytest.raises(
        ValueError, match=r"\(params=3\) does not even cover the 3 bias .*\(a larger params\)"
    ):
        tensorize_(model, params=3)
    model = nn.Sequential(nn.Linear(7, 3, bias=False)).double()
    # The budget is what the caller's compression made of the 21 parameters: named with it.
    with pytest.raises(
        ValueError,
        match=r"budget 0 \(compression=100 of their 21 parameters\) leaves no parameters",
    ):
        tensorize_(model, compression=100.0)


def test_even_share_that_exactly_holds_the_smallest_form_is_accepted():
    """Finds: the even allocation refusing a share equal to the smallest form (``<=``).

    One 7 -> 3 layer: its share is the whole budget, 13 = 3 biases + the 10 core parameters
    of rank 1 (10 < 24 dense), which fits.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 3)).double()
    report = tensorize_(model, params=13, allocation="even")
    assert report.params_after == 13


@pytest.mark.parametrize("compression", [2.0, 3.0, 6.0, 8.0])
def test_even_allocation_counts_each_layers_bias_in_its_share(compression):
    """Finds: the even allocation giving the cores the whole share, biases not subtracted.

    Every layer at least ``compression`` times smaller, biases included (the docstring: the
    same compression for every layer), and the total within the budget. At 2x and 6x the
    mutant overshoots (the 64 -> 96 layer: 3,136 > 3,120 at 2x).
    """
    model = mlp()
    report = tensorize_(
        model,
        compression=compression,
        allocation="even",
        filter_fn=lambda module, name: isinstance(module, nn.Linear),
    )
    assert len(report.layers) == 3
    assert report.params_after <= report.budget
    for row in report.layers:
        assert row.params_before >= compression * row.params_after, row.name


def _option(parameters: int, error: float) -> RankChoice:
    return RankChoice((1, 1), (1, 1), (1, 1, 1), parameters, error)


def test_hull_drops_points_on_the_segment():
    # Found by mutation testing (review helper 86): no test failed when this was broken.
    # _hull's contract ("Drop b if it lies on or above the segment a -> option"): squared
    # errors 1, 0.25, 0.0625 at 1, 5, 6 parameters are exactly collinear in float64
    # (4 * (0.0625 - 1) == 5 * (0.25 - 1) == -3.75), so the middle point goes.
    points = [_option(1, 1.0), _option(5, 0.5), _option(6, 0.25)]
    assert [p.parameters for p in _hull(points)] == [1, 6]


def test_allocate_with_collinear_options_finds_the_optimum():
    # Found by mutation testing (review helper 86): no test failed when this was broken.
    # Two layers whose (parameters, squared error) options lie on lines of slope -1. At a
    # budget of 16 the optimum (brute force over the 15 pairs) is 5 + 11 parameters, squared
    # error 7 + 2 = 9. Keeping the collinear points on the hulls made allocate take layer 0
    # step by step to 8 parameters and stop at 8 + 7 = 15, squared error 10. Tolerance 1e-9:
    # the errors are square roots of small integers, squared back.
    a = [_option(p, math.sqrt(e)) for p, e in [(1, 11), (2, 10), (5, 7), (8, 4), (11, 1)]]
    b = [_option(p, math.sqrt(e)) for p, e in [(7, 6), (9, 4), (11, 2)]]
    best = min(
        (x.error**2 + y.error**2, x.parameters, y.parameters)
        for x in a
        for y in b
        if x.parameters + y.parameters <= 16
    )
    chosen = allocate([a, b], 16)
    assert sum(c.parameters for c in chosen) <= 16
    assert abs(sum(c.error**2 for c in chosen) - best[0]) < 1e-9
    assert [c.parameters for c in chosen] == [5, 11]
