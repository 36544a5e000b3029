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
    assert report.params_before == dense
    assert report.params_after <= report.budget
    assert report.params_after >= 0.9 * report.budget
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


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"compression": 4.0, "params": 100}, ValueError, "either"),
        ({"compression": 4.0, "rank": 3}, ValueError, "cannot be combined"),
        ({"compression": 0.5}, ValueError, "compression"),
        ({"compression": "4"}, TypeError, "compression"),
        ({"params": 5.0}, TypeError, "params"),
        ({"params": 100}, ValueError, "bias"),
        ({"params": 200}, ValueError, "budget"),
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
    assert [row.name for row in report.layers] == ["0", "2"]
    assert [skip.name for skip in report.skipped] == ["3"]
    assert "no factorization" in report.skipped[0].reason
    assert type(model[3]) is nn.Linear
    assert all(row.params_after < row.params_before for row in report.layers)


def test_options_never_reach_the_dense_size():
    """Kills: _rank_path stopping at ``> limit`` instead of ``>= limit``.

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
