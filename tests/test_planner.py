"""The planner's memory accounting, candidates, choice and cost model, by hand.

References are worked out from the documented formulas (memory sizes, chunk counts, the cost
model's speed law) or measured (what autograd keeps), never timed.
"""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

import ttlayers.planner as planner
from ttlayers import TTLinear, tt_to_dense
from ttlayers.contraction import tt_linear
from ttlayers.planner import (
    DEFAULT_COST_MODELS,
    CostModel,
    Plan,
    calibrate,
    candidate_plans,
    chain_equation,
    choose_plan,
    estimate_time,
    memory_budget,
    plan_memory,
    plan_table,
    set_cost_model,
)

F64 = torch.float64


def estimates_with(model, plan, *shape):
    """``estimate_time`` of ``plan`` in training and in inference under ``model``, set for
    the device type "mps" (which has no default model) and restored after."""
    try:
        set_cost_model("mps", model)
        return tuple(
            estimate_time(plan, *shape, device_type="mps", training=training)
            for training in (True, False)
        )
    finally:
        set_cost_model("mps", None)


def test_resetting_a_cost_model_never_leaves_the_device_without_one(monkeypatch):
    # set_cost_model(device, None) used to remove the model, then put the default back: a
    # thread planning a new shape in between read _cost_models["cpu"] and raised KeyError.
    # Every change of the dict must leave a model for the device.
    states = []

    class Recording(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            states.append("cpu" in self)

        def __delitem__(self, key):
            super().__delitem__(key)
            states.append("cpu" in self)

        def pop(self, *args):
            value = super().pop(*args)
            states.append("cpu" in self)
            return value

    monkeypatch.setattr(planner, "_cost_models", Recording(planner._cost_models))
    try:
        set_cost_model("cpu", dataclasses.replace(DEFAULT_COST_MODELS["cpu"], flops=1e9))
        set_cost_model("cpu", None)
    finally:
        planner.cached_plan_table.cache_clear()
    assert states and all(states)
    assert planner._cost_models["cpu"] == DEFAULT_COST_MODELS["cpu"]


# --- the planner: memory -------------------------------------------------------------------

# A small asymmetric 4-core layer, M = 2*3*2*2 = 24 inputs, N = 3*1*2*2 = 12 outputs. Its cores
# (r_k, m_k, n_k, r_{k+1}) hold (1,2,3,2) 12, (2,3,1,3) 18, (3,2,2,2) 24 and (2,2,2,1) 8
# numbers. At split s the blocks hold r_s (M_1 N_1 + M_2 N_2): split 1, 2 (2*3 + 12*4) = 108;
# split 2, 3 (6*3 + 4*4) = 102; split 3, 2 (12*6 + 2*2) = 152. Partial merges (a block of 3
# cores keeps its first pairwise product): split 1's right block, cores 2 and 3 merged,
# 2 * (3*2) * (1*2) * 2 = 48; split 3's left block, cores 1 and 2, 1 * (2*3) * (3*1) * 3 = 54.
SMALL = ((2, 3, 2, 2), (3, 1, 2, 2), (1, 2, 3, 2, 1))


def test_memory_budget_is_the_documented_formula():
    """Finds: memory_budget without the output term ``B N``.

    The docstring: ``3 M N + B (M + N)`` (nn.Linear's weight, its gradient, one more
    weight-sized buffer, its output and its input gradient). 24 x 12: 864 + 36 B.
    """

    assert memory_budget(0, *SMALL[:2]) == 864
    assert memory_budget(5, *SMALL[:2]) == 864 + 5 * 36
    assert memory_budget(7, (4, 8), (2, 3)) == 3 * 32 * 6 + 7 * (32 + 6)


@pytest.mark.parametrize(
    ("plan", "training", "expected"),
    [
        # Dense: W (288), the blocks made of more than one core (split 1: the right block, 96;
        # split 2: both, 102; split 3: the left block, 144; a block of one core is that
        # core); in training also W's gradient (288) and the merges.
        (("dense", 1, "right", 0, 1), False, 288 + 96),
        (("dense", 1, "right", 0, 1), True, 2 * 288 + 96 + 48),
        (("dense", 2, "right", 0, 1), True, 2 * 288 + 102),
        (("dense", 3, "right", 0, 1), True, 2 * 288 + 144 + 54),
        # Two-block, split 1, right first: M_s = 2, M_f = 12, N_s = 3, N_f = 4, r = 2; B = 5.
        # Inference: the blocks made and one chunk's Z, rows * M_s r N_f.
        (("twoblock", 1, "right", 0, 1), False, 96 + 5 * 2 * 2 * 4),
        (("twoblock", 1, "right", 0, 2), False, 96 + 3 * 2 * 2 * 4),
        # Training: the blocks made, the blocks' gradients (108) and the merges, 252; Z kept
        # with its per-row products and dZ, B M_s r (2 N_f + N_s); or else dZ and Q of a
        # chunk with its transposed input rows, rows (2 r max(M_s N_f, M_f N_s) + M_s M_f)
        # = rows (2 * 2 * max(8, 36) + 24).
        (("twoblock", 1, "right", 10, 1), True, 252 + 5 * 2 * 2 * (2 * 4 + 3)),
        (("twoblock", 1, "right", 0, 1), True, 252 + 5 * (2 * 2 * 36 + 24)),
        (("twoblock", 1, "right", 0, 2), True, 252 + 3 * (2 * 2 * 36 + 24)),
        # Left first: M_s = 12, N_f = 3, N_s = 4, and the rows transposed: copies of the
        # input and output, B (M + N) = 180, in training also of the output gradient,
        # B (2 M + N) = 300.
        (("twoblock", 1, "left", 10, 1), True, 252 + 300 + 5 * 12 * 2 * (2 * 3 + 4)),
        (("twoblock", 1, "left", 0, 1), False, 96 + 180 + 5 * 12 * 2 * 3),
        # Kept at exactly B = save_max_batch (the layer keeps Z there: <=); split 3 made
        # 144, blocks 152, merges 54.
        (("twoblock", 3, "right", 5, 1), True, 144 + 152 + 54 + 5 * 12 * 2 * (2 * 2 + 6)),
    ],
)
def test_plan_memory_by_hand(plan, training, expected):
    """Finds: plan_memory's dense estimate without the merges (training) or the blocks
    (inference); the two-block estimate with min for max, without the per-row products of
    a kept Z, without the blocks' gradients, or with ``<`` for ``<=`` at save_max_batch;
    _partial_merges counting the last (whole-block) product too.

    Expected values worked out from plan_memory's docstring for SMALL (see above), B = 5,
    without the layer's own output (B N = 60) and, in training, input gradient (B M = 120),
    which every plan adds.
    """

    kind, split, first, keep, chunks = plan
    plan = Plan(kind, split=split, first=first, save_max_batch=keep, chunks=chunks)
    own = 5 * (24 + 12) if training else 5 * 12
    assert plan_memory(plan, 5, *SMALL, training=training) == own + expected


@pytest.mark.parametrize(
    ("first", "keep", "chunks", "expected"),
    [
        # Split 1 of SMALL, right first: M_s = 2, M_f = 12, N_s = 3, N_f = 4, r = 2, N = 12;
        # the blocks made, their gradients and the merges, 252. A chunk's Z (or the kept
        # one) and then its dZ, and Z's transposed copy, 2 rows M_s r N_f, and the copy of
        # its output gradient rows, rows N: rows (2 * 16 + 12) = 44 rows.
        ("right", 0, 1, 252 + 5 * 44),
        ("right", 10, 1, 252 + 5 * 44),
        ("right", 0, 2, 252 + 3 * 44),
        # Left first: M_s = 12, N_f = 3; the output gradient's rows are laid out as the
        # product wants (no copy of them here): rows 2 * 12 * 2 * 3 = 144; the transposed
        # rows as for every left-first plan, B (2 M + N) = 300: the input copied (and kept),
        # its gradient transposed back, and the output transposed in the forward pass.
        ("left", 0, 1, 252 + 300 + 5 * 144),
    ],
)
def test_plan_memory_of_the_gradient_from_z_by_hand(first, keep, chunks, expected):
    """Finds: plan_memory of a ``second_from_z`` plan that counts the Q products, leaves
    out the copies of Z or of the output gradient, counts the output gradient's copy for
    left-first plans, which make none, or leaves out their forward pass's transposed
    output (a review measured such plans at 1.9x the estimate). See
    test_plan_memory_by_hand for SMALL."""

    plan = Plan(
        "twoblock",
        split=1,
        first=first,
        save_max_batch=keep,
        chunks=chunks,
        second_from_z=True,
    )
    assert plan_memory(plan, 5, *SMALL) == 5 * (24 + 12) + expected
    # Inference runs no backward pass: the same as without second_from_z.
    plain = dataclasses.replace(plan, second_from_z=False)
    assert plan_memory(plan, 5, *SMALL, training=False) == plan_memory(
        plain, 5, *SMALL, training=False
    )


@pytest.mark.parametrize(
    ("keep", "chunks", "training", "expected"),
    [
        # Split 1 of SMALL, the left block first, batched: M_1 = 2, M_2 = 12, N_1 = 3,
        # N_2 = 4, r = 2. No transposed copies. Inference: the blocks made (96) and a chunk's
        # Z, rows N_1 r M_2 = rows 72.
        (0, 1, False, 96 + 5 * 72),
        (0, 2, False, 96 + 3 * 72),
        # Training: the blocks made, their gradients and the merges, 252; a chunk's Z (or the
        # kept one) and its dZ, 2 rows N_1 r M_2, and x[b] dZ[b]^T per row, rows M_1 N_1 r:
        # rows (144 + 12) = 156 rows.
        (0, 1, True, 252 + 5 * 156),
        (10, 1, True, 252 + 5 * 156),
        (0, 2, True, 252 + 3 * 156),
    ],
)
def test_plan_memory_of_batched_plans_by_hand(keep, chunks, training, expected):
    """Finds: plan_memory of a ``batched_first`` plan that counts the transposed copies of
    the rows (it makes none), or leaves out dZ or the per-row products of dA. See
    test_plan_memory_by_hand for SMALL."""

    plan = Plan(
        "twoblock", split=1, first="left", save_max_batch=keep, chunks=chunks, batched_first=True
    )
    own = 5 * (24 + 12) if training else 5 * 12
    assert plan_memory(plan, 5, *SMALL, training=training) == own + expected


def test_batched_plans_are_offered_left_first_where_the_left_block_is_wide_enough():
    """Finds: candidate_plans without batched_first variants, with them for the right block
    first, with second_from_z (which they do not take), without their chunked forms, or
    where the left block has fewer than BATCHED_MIN_INPUTS inputs.

    ISSUE at batch 256: splits 2 and 3 (M_1 = 32 and 256; split 1 has M_1 = 4) have an
    unchunked batched plan and one in as many chunks as keep a chunk's Z in the cache. The
    planner takes it for the 4096 -> 11008 layer of the benchmark, rank 16, batch 128 in
    training (measured at 0.85x the time of the plan it took before).
    """

    batched = [p for p in candidate_plans(256, *ISSUE, threads=2) if p.batched_first]
    assert {p.first for p in batched} == {"left"}
    assert not any(p.second_from_z for p in batched)
    assert planner.BATCHED_MIN_INPUTS == 16
    assert {p.split for p in batched} == {2, 3}
    for split in (2, 3):
        # 256 rows of 8192 numbers (N_1 r M_2 = 32 * 8 * 32 at split 2, 256 * 8 * 4 at split
        # 3) in float32 are 8 MiB: 4 chunks for the 2 MiB of cache of 2 threads. Others may
        # follow from the memory bound.
        chunks = {p.chunks for p in batched if p.split == split}
        assert {1, 4} <= chunks, (split, chunks)
    llama = ((8, 8, 8, 8), (4, 8, 43, 8), (1, 16, 16, 16, 1))
    assert choose_plan(128, *llama, threads=2, largest=255).batched_first


@pytest.mark.parametrize(
    "shape",
    [
        ((16, 4), (10, 12), (1, 4, 1)),  # M_1 = 16 exactly: offered at split 1
        ((32, 2, 8), (4, 43, 8), (1, 8, 6, 1)),
        ((2, 512), (512, 2), (1, 8, 1)),
        ((16, 16, 16), (16, 43, 16), (1, 4, 4, 1)),
    ],
)
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_every_candidate_runs_and_batched_ones_take_no_gradient_from_z(shape, device_type):
    """Finds: candidate_plans offering a batched plan with second_from_z (tt_linear refuses
    those), or none at M_1 = BATCHED_MIN_INPUTS exactly.

    Every candidate, at batch sizes where either dS path or chunks may be offered, must pass
    the plan check of tt_linear (run on one row: the check comes before any product).
    """

    from ttlayers.planner import check_plan

    for batch in (1, 64, 4096):
        plans = candidate_plans(batch, *shape, device_type=device_type, threads=2)
        for plan in plans:
            check_plan(plan, len(shape[0]))
        assert not any(p.batched_first and p.second_from_z for p in plans)
    splits = {p.split for p in candidate_plans(64, *shape, threads=2) if p.batched_first}
    lefts = [math.prod(shape[0][:s]) for s in range(1, len(shape[0]))]
    assert splits == {s + 1 for s, m1 in enumerate(lefts) if m1 >= planner.BATCHED_MIN_INPUTS}
    if shape[0] == (16, 4):
        assert splits == {1}


def test_batched_chunks_bring_the_plan_within_the_memory_bound():
    """Finds: chunk counts of batched plans sized with another plan's memory per row (or its
    transposed copies), which leaves them over memory_budget or chunked more than needed.

    On "cuda" (no cache, so memory alone sets the count), for every batched candidate in
    chunks: within the bound at the top of the range it serves, in training (the largest
    count) or in inference, and one chunk fewer would not be.
    """

    shape = ((16, 16, 16), (16, 43, 16), (1, 4, 4, 1))
    top = 4095
    chunked = [
        p
        for p in candidate_plans(2048, *shape, device_type="cuda", largest=top)
        if p.batched_first and p.chunks > 1
    ]
    assert chunked
    for plan in chunked:
        fits = {
            training: plan_memory(plan, top, *shape, training=training)
            <= memory_budget(top, *shape[:2])
            for training in (True, False)
        }
        fewer = dataclasses.replace(plan, chunks=plan.chunks - 1)
        fits_fewer = {
            training: plan_memory(fewer, top, *shape, training=training)
            <= memory_budget(top, *shape[:2])
            for training in (True, False)
        }
        assert any(fits[t] and not fits_fewer[t] for t in (True, False)), plan


def test_the_batched_estimate_counts_its_calls():
    """Finds: _batched_time without a term per chunk (backward or forward), without the
    sum of the left block's per-row gradients, or with the merges counted once in training.

    A model where only operator calls cost (1 s each; no compute, no traffic): a three-core
    layer (2, 2, 4) x (2, 2, 3), split 2, whose left block is merged from two cores (a
    product and a permuting copy: 2 calls), in 3 chunks. Inference: the merge, and per
    chunk Z and the output product (6), and the bias added: 9. Training adds the merge
    twice (its backward: 4), the bias gradient (1) and per chunk Z again, dS, dZ, dx, the
    per-row products and their sum (18): 23.
    """

    model = CostModel(flops=1e30, half_dim=1e-12, bandwidth=1e30, overhead=1.0)
    plan = Plan("twoblock", split=2, first="left", chunks=3, batched_first=True)
    training, inference = estimates_with(model, plan, 6, (2, 2, 4), (2, 2, 3), (1, 2, 2, 1))
    assert inference == pytest.approx(9, rel=1e-9)
    assert training - inference == pytest.approx(23, rel=1e-9)


def test_a_cpu_training_step_pays_the_glue_of_its_plan_kind(monkeypatch):
    """Finds: the fixed cost of a two-block plan's autograd.Function (or of a chain's einsum
    calls) missing from CPU training estimates, added to inference, or added on GPUs.

    A model where only operator calls cost (1 s each), installed for "cpu" and "cuda": with
    the glue constants zeroed, a CPU training estimate drops by _TWOBLOCK_TRAINING_CALLS for
    a two-block plan (batched or not) and by _CHAIN_TRAINING_CALLS for a chain; a dense
    plan's, inference and every "cuda" estimate stay.
    """

    assert planner._TWOBLOCK_TRAINING_CALLS > planner._CHAIN_TRAINING_CALLS > 0
    model = CostModel(flops=1e30, half_dim=1e-12, bandwidth=1e30, overhead=1.0)
    shape = ((2, 2, 4), (2, 2, 3), (1, 2, 2, 1))
    chain = next(p for p in candidate_plans(6, *shape) if p.kind == "chain")
    plans = {
        Plan("twoblock", split=2, first="left", chunks=3): planner._TWOBLOCK_TRAINING_CALLS,
        Plan(
            "twoblock", split=1, first="left", batched_first=True
        ): planner._TWOBLOCK_TRAINING_CALLS,
        chain: planner._CHAIN_TRAINING_CALLS,
        Plan("dense", split=1): 0,
    }

    def estimates() -> dict[tuple[Plan, str, bool], float]:
        return {
            (plan, device, training): estimate_time(
                plan, 6, *shape, device_type=device, training=training
            )
            for plan in plans
            for device in ("cpu", "cuda")
            for training in (True, False)
        }

    try:
        set_cost_model("cpu", model)
        set_cost_model("cuda", model)
        with_glue = estimates()
        monkeypatch.setattr(planner, "_TWOBLOCK_TRAINING_CALLS", 0)
        monkeypatch.setattr(planner, "_CHAIN_TRAINING_CALLS", 0)
        without = estimates()
    finally:
        set_cost_model("cpu", None)
        set_cost_model("cuda", None)
    for (plan, device, training), seconds in with_glue.items():
        glue = plans[plan] if device == "cpu" and training else 0
        assert seconds - without[plan, device, training] == pytest.approx(glue), plan


def test_fresh_tensors_above_glibcs_mmap_threshold_pay_their_page_faults(monkeypatch):
    """Finds: a dense plan's W-sized temporaries charged no page faults from 32 MiB up (or
    below it, or on GPUs), or a chain's large steps charged none.

    4096 x 4096 (8, 8, 8, 8), W of 64 MiB in float32: the dense plan at split 2 makes two
    W-sized tensors in inference (the merged blocks' product and its copy in the layer's
    layout) and four in a training step, each 64 MiB of faults; 1024 x 1024's W (4 MiB)
    stays in the heap; "cuda" has none. A chain pays for its steps from 32 MiB up (at rank
    64 and 128 rows they hold tens of millions of numbers), more in training (their
    operands' gradients too).
    """

    rate = planner._FAULT_SECONDS_PER_BYTE
    big = ((8, 8, 8, 8), (8, 8, 8, 8), (1, 64, 64, 64, 1))

    def estimates(plan: Plan, shape: tuple, batch: int) -> list[float]:
        return [
            estimate_time(plan, batch, *shape, device_type=device, training=training)
            for device in ("cpu", "cuda")
            for training in (True, False)
        ]

    dense = Plan("dense", split=2)
    chain = next(p for p in candidate_plans(128, *big) if p.kind == "chain")
    # 4096 -> 2048: W of exactly 32 MiB, which glibc maps afresh too (PyTorch's aligned
    # allocation asks for a little more than the tensor).
    exactly = ((8, 8, 8, 8), (8, 8, 8, 4), (1, 4, 4, 4, 1))
    cases = [(dense, big, 128), (dense, ISSUE, 128), (chain, big, 128), (dense, exactly, 128)]
    with_faults = [estimates(*case) for case in cases]
    monkeypatch.setattr(planner, "_FAULT_SECONDS_PER_BYTE", 0.0)
    without = [estimates(*case) for case in cases]
    extra = [
        [a - b for a, b in zip(w, wo, strict=True)]
        for w, wo in zip(with_faults, without, strict=True)
    ]
    w_bytes = 4096 * 4096 * 4
    assert extra[0] == pytest.approx([4 * w_bytes * rate, 2 * w_bytes * rate, 0, 0])
    assert extra[1] == [0, 0, 0, 0]
    assert extra[2][0] > extra[2][1] > 0 and extra[2][2:] == [0, 0]
    assert extra[3] == pytest.approx([2 * w_bytes * rate, w_bytes * rate, 0, 0])
    assert planner._MMAP_THRESHOLD_MAX == 32 * 2**20


def test_a_product_in_the_cache_pays_its_share_of_the_traffic():
    """Finds: CostModel.cache_traffic ignored (cached products free of traffic whatever it
    says, or paying all of it).

    A model where only memory traffic costs: a chunked inference plan of (4, 8, 8, 4) at
    rank 8 and 64 rows, 4 chunks of 16 rows (Z 512 KiB each, in the cache). Its estimate
    is linear in cache_traffic, from the copies alone (0) to the uncached products (1).
    """

    plan = Plan("twoblock", split=2, chunks=4)
    traffic_only = CostModel(flops=1e30, half_dim=1e-12, bandwidth=1e9, overhead=0.0)

    def inference(fraction: float) -> float:
        model = dataclasses.replace(traffic_only, cache_bytes=2**20, cache_traffic=fraction)
        return estimates_with(model, plan, 64, *ISSUE)[1]

    none, half, full = inference(0.0), inference(0.5), inference(1.0)
    assert full > 2 * none > 0
    assert half == pytest.approx((none + full) / 2, rel=1e-9)
    assert DEFAULT_COST_MODELS["cpu"].cache_traffic == 0.3


def test_a_batched_plan_must_be_estimated_faster_by_the_margin():
    """Finds: choose_plan without BATCHED_MARGIN. On (4, 8, 8, 4) at rank 16, batch 256,
    inference, the cost model gives the batched plan at split 2 the time of the right block
    first (the same products in the other order; measured 15-23 % slower): a tie, which the
    margin settles for the plan without batched products."""

    shape = ((4, 8, 8, 4), (4, 8, 8, 4), (1, 16, 16, 16, 1))
    plans = candidate_plans(256, *shape, threads=2, largest=511)
    batched = next(p for p in plans if p.batched_first and p.split == 2 and p.chunks == 8)
    right = next(p for p in plans if (p.split, p.first, p.chunks) == (2, "right", 8))
    times = [estimate_time(p, 256, *shape, threads=2, training=False) for p in (batched, right)]
    assert times[0] == pytest.approx(times[1], rel=0.01)
    chosen = choose_plan(256, *shape, threads=2, training=False, largest=511)
    assert not chosen.batched_first, chosen
    assert planner.BATCHED_MARGIN == 0.05


def test_the_gradient_from_z_is_offered_where_it_takes_fewer_operations():
    """Finds: candidate_plans without second_from_z variants, or offering them where dS
    from Q takes no more operations (autograd.py: from Q, r M_f N_s (N_f + M_s) per row;
    from Z, r M_s N_f (M_f + N_s)).

    The thin layer (2, 512) x (512, 2): right first, 2 * 2 * 1024 against 512 * 512 * 4
    (256 times fewer); left first the reverse. The issue's (4, 8, 8, 4) layer at split 2:
    equal, not offered. The planner takes it for the thin layer in training: its Q products
    are twice the dense layer's work.
    """

    thin = ((2, 512), (512, 2), (1, 2, 1))
    offered = {
        (p.first, p.chunks > 1)
        for p in candidate_plans(4096, *thin, largest=8191)
        if p.second_from_z
    }
    assert offered == {("right", False), ("right", True)}
    issue = ((4, 8, 8, 4), (4, 8, 8, 4), (1, 8, 8, 8, 1))
    assert not any(p.second_from_z for p in candidate_plans(256, *issue))
    for batch in (256, 4096):
        chosen = choose_plan(batch, *thin, threads=2, largest=2 * batch - 1)
        assert chosen.kind == "twoblock" and chosen.second_from_z, chosen


def test_plan_memory_of_a_chain_by_hand():
    """Finds: plan_memory of an inference chain counting only the largest result.

    A hand-made chain for in (4, 6), out (3, 2), ranks (1, 5, 1), batch 7: x (7*24 = 168)
    meets core 1 (result a c d g: 7*6*3*5 = 630), which meets core 2 (the output, 7*3*2 = 42).
    In inference a step holds its input and its result: max(168 + 630, 630 + 42) = 798; in
    training autograd keeps every result, the input gradient comes on top, and the largest
    step's operands and result once more for its backward pass, but for the layer's input
    and output (their gradients are counted already): step 1, core 1 (4 * 3 * 5 = 60) and
    its result, 690; step 2, core 2 (5 * 6 * 2 = 60) and its operand, 690:
    630 + 42 + 168 + 690 = 1530. The plan runs (float64 reference).
    """

    terms, output = chain_equation(2)
    assert terms == ["abc", "fbdg", "gceh"] and output == "ade"
    plan = Plan(
        "chain",
        steps=((0, 1, "abc,fbdg->acdg"), (0, 1, "gceh,acdg->ade")),
        equation="abc,fbdg,gceh->ade",
    )
    shape = ((4, 6), (3, 2), (1, 5, 1))
    assert plan_memory(plan, 7, *shape, training=False) == 798
    assert plan_memory(plan, 7, *shape, training=True) == 1530
    g = torch.Generator().manual_seed(0)
    cores = [
        torch.randn(1, 4, 3, 5, dtype=F64, generator=g),
        torch.randn(5, 6, 2, 1, dtype=F64, generator=g),
    ]
    x = torch.randn(7, 24, dtype=F64, generator=g)
    torch.testing.assert_close(tt_linear(x, cores, plan=plan), x @ tt_to_dense(cores).T)


def test_dense_plan_memory_is_what_autograd_keeps_plus_the_weight_gradient():
    """Finds: plan_memory's dense training estimate without the partial merges, and
    _partial_merges counting the whole block as a partial product.

    Measured with saved-tensor hooks: autograd keeps W and the blocks and partial products
    that are new tensors; the backward pass then makes W's gradient (M N), and the layer's
    output and input gradient (B (M + N), not measured here). A block of one core is the core
    itself, not new memory, so the estimate may exceed the measurement by at most the cores'
    size (62 numbers) and never fall below it.
    """

    in_modes, out_modes, ranks = SMALL
    g = torch.Generator().manual_seed(0)
    cores = [
        torch.randn(ranks[k], in_modes[k], out_modes[k], ranks[k + 1], generator=g).requires_grad_()
        for k in range(4)
    ]
    x = torch.randn(5, 24, requires_grad=True)
    known = {t.untyped_storage().data_ptr() for t in (x, *cores)}
    for split in (1, 2, 3):
        saved = {}

        def pack(t, saved=saved):
            if t.untyped_storage().data_ptr() not in known:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // 4
            return t

        plan = Plan("dense", split=split)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tt_linear(x, cores, plan=plan)
        measured = sum(saved.values()) + 24 * 12
        estimate = plan_memory(plan, 5, *SMALL, training=True) - 5 * (24 + 12)
        assert measured <= estimate <= measured + sum(c.numel() for c in cores), split


def test_a_kept_intermediate_fits_a_linear_weight_and_its_gradient_and_the_memory_bound():
    """Finds: candidate_plans keeping Z for more rows than nn.Linear's weight and gradient
    (2 M N) hold, or for more rows than keep the plan within memory_budget; plan_memory's ``<``
    for ``<=`` at save_max_batch.

    Plan's docstring: above save_max_batch the intermediate is not kept, "so that the layer
    never keeps more memory for training than nn.Linear". Measured with saved-tensor hooks:
    what the layer keeps at B = save_max_batch minus what it keeps at B + 1 is Z, B r M_s N_f
    numbers, which must fit 2 M N. Kept, the plan holds Z, dZ and the per-row Z g^T,
    B r M_s (2 N_f + N_s) numbers (and, with the left block first, the transposed rows,
    B (2 M + N)), besides the blocks, their gradients and the merges: those must fit
    3 M N, memory_budget less the output and the input gradient, and one row more must not
    (this limit is the lower: 3 / (2 + N_s / N_f) < 2). By hand for in (2, 4, 8), out
    (8, 2, 2), ranks (1, 3, 5, 1), 3 M N = 6144; at split 1 right, 1 left, 2 right,
    2 left: kept rows of 96, 2080, 800, 1520 numbers and 816, 816, 1360, 1360 of blocks,
    gradients and merges: 55, 2, 5, 3 rows (Z rows of 24, 768, 80, 640 numbers: within
    2 M N = 4096).
    """

    in_modes, out_modes, ranks = (2, 4, 8), (8, 2, 2), (1, 3, 5, 1)
    g = torch.Generator().manual_seed(0)
    cores = [
        torch.randn(ranks[k], in_modes[k], out_modes[k], ranks[k + 1], generator=g).requires_grad_()
        for k in range(3)
    ]

    def kept(plan, batch):
        x = torch.randn(batch, 64, requires_grad=True)
        known = {t.untyped_storage().data_ptr() for t in (x, *cores)}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in known:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // 4
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tt_linear(x, cores, plan=plan)
        return sum(saved.values())

    rows = {(1, "right"): 24, (1, "left"): 768, (2, "right"): 80, (2, "left"): 640}
    plans = [p for p in candidate_plans(16, in_modes, out_modes, ranks) if p.kind == "twoblock"]
    unchunked = [p for p in plans if p.chunks == 1 and not (p.second_from_z or p.batched_first)]
    assert {(p.split, p.first): p.save_max_batch for p in unchunked} == {
        (1, "right"): 55,
        (1, "left"): 2,
        (2, "right"): 5,
        (2, "left"): 3,
    }
    shape = (in_modes, out_modes, ranks)
    for plan in unchunked:
        batch, row = plan.save_max_batch, rows[plan.split, plan.first]
        z = kept(plan, batch) - kept(plan, batch + 1)
        assert z == batch * row <= 2 * 64 * 32
        # Kept at B = save_max_batch: the memory of a plan that always keeps Z, within the
        # bound there and over it one row later.
        always = dataclasses.replace(plan, save_max_batch=10**9)
        never = dataclasses.replace(plan, save_max_batch=0)
        assert plan_memory(plan, batch, *shape) == plan_memory(always, batch, *shape)
        assert plan_memory(plan, batch + 1, *shape) == plan_memory(never, batch + 1, *shape)
        assert plan_memory(always, batch, *shape) <= memory_budget(batch, in_modes, out_modes)
        over = plan_memory(always, batch + 1, *shape)
        assert over > memory_budget(batch + 1, in_modes, out_modes)


# --- the planner: candidates and chunks ------------------------------------------------------

ISSUE = ((4, 8, 8, 4), (4, 8, 8, 4), (1, 8, 8, 8, 1))  # 1024 x 1024, rank 8


def test_each_split_and_order_has_one_unchunked_two_block_candidate():
    """Finds: candidate_plans adding a "chunked" plan of 1 chunk (``chunks >= 1``).

    candidate_plans' docstring: per split and order (and for the left block first, batched
    or not) one unchunked plan (keeping Z up to the bound), and a chunked one only where
    chunks are called for. A second unchunked plan,
    never keeping Z, is a candidate the docstring does not list.
    """

    for batch in (1, 8, 100):
        plans = [p for p in candidate_plans(batch, *ISSUE) if p.kind == "twoblock"]
        unchunked = [(p.split, p.first, p.batched_first) for p in plans if p.chunks == 1]
        forms = (("left", False), ("right", False))
        expected = [(s, *form) for s in (1, 2, 3) for form in forms]
        # Batched where the left block has BATCHED_MIN_INPUTS = 16 inputs or more: M_1 = 32
        # at split 2, 256 at split 3 (4 at split 1).
        expected += [(2, "left", True), (3, "left", True)]
        assert sorted(unchunked) == sorted(expected)
        assert all(p.save_max_batch == 0 for p in plans if p.chunks > 1)


def test_chunk_counts_by_hand():
    """Finds: the cache chunk count rounded down, the max_chunks cap ignored, the chunk count
    not capped at the batch size, the memory chunk count rounded down.

    CPU, 1 thread, 1 MiB cache: a row of Z at split 2 of ISSUE is 8 * 32 * 32 floats, 32 KiB.
    - 100 rows: 3 125 KiB, ceil(3.125) = 4 chunks of at most 25 rows (800 KiB; 3 chunks of 34
      rows would not fit).
    - 8192 rows: 256 chunks for the cache, capped at max_chunks = 128 (the memory bound needs
      ceil(8192 / 178) = 47: a row of dZ, Q and transposed rows takes 2 * 8 * 1024 + 32 * 32
      = 17 408 numbers, and 3 * 2^20 - 2 * 16 384 are free, 178 rows).
    - A 4096 x 4096 layer of rank 128, 3 rows: a row of Z is 2 MiB, 6 chunks for the cache,
      but never more chunks than rows (row_chunks: chunks <= len(x)).
    - "cuda" (no cache): (2, 512) x (512, 2), rank 4, left first (M_s = N_f = 512,
      M_f = N_s = 2), 64 rows, memory_budget 3 * 2^20 + 64 * 2048. The blocks are the cores
      (no new memory), 4 (2 * 512 + 512 * 2) = 8192 numbers, and left first transposes
      copies of the rows. In training a row takes 2 r max(M_s N_f, M_f N_s) + M_s M_f
      = 2^21 + 1024 numbers, and 3 * 2^20 - 8192 (the blocks' gradients) - 64 * 3072 (copies
      of the input, output and output gradient) are free (the output and input gradient
      count on both sides): 1 row a chunk, 64 chunks. In inference a row of Z is 2^20
      numbers and 3 * 2^20 - 64 * 1024 are free (the copies of input and output, less the
      input gradient the budget allows): 2 rows, 32 chunks (fewer would put 3 rows in a
      chunk, over the bound). Each count fits plan_memory at 64 rows.
    - The same, for a plan serving 64 to 127 rows (``largest=127``): in training and in
      inference 127 rows would need more chunks than the 64 rows at the low end: 64.
    """

    def all_chunks(batch, shape, split, first, **kwargs):
        return [
            p.chunks
            for p in candidate_plans(batch, *shape, **kwargs)
            if p.kind == "twoblock"
            and (p.split, p.first, p.batched_first) == (split, first, False)
            and p.chunks > 1
        ]

    def chunks(batch, shape, split, first, **kwargs):
        found = all_chunks(batch, shape, split, first, **kwargs)
        return found[0] if found else 1

    assert chunks(100, ISSUE, 2, "right") == 4
    assert chunks(8192, ISSUE, 2, "right") == DEFAULT_COST_MODELS["cpu"].max_chunks == 128
    big = ((64, 64), (64, 64), (1, 128, 1))
    assert chunks(3, big, 1, "right") == 3
    thin = ((2, 512), (512, 2), (1, 4, 1))
    assert all_chunks(8192, ISSUE, 2, "right", largest=16383) == [128]
    assert sorted(all_chunks(64, thin, 1, "left", device_type="cuda")) == [32, 64]
    for count, training in ((64, True), (32, False), (31, False)):
        plan = Plan("twoblock", split=1, first="left", chunks=count)
        over = plan_memory(plan, 64, *thin, training=training) - memory_budget(64, *thin[:2])
        assert (over <= 0) == (count != 31), (count, training, over)
    assert all_chunks(64, thin, 1, "left", device_type="cuda", largest=127) == [64]


@pytest.mark.parametrize(
    ("shape", "batch", "top"),
    [
        (((8, 8, 8, 8), (8, 8, 8, 8), (1, 16, 16, 16, 1)), 4096, 8191),
        (((8, 8), (64, 64), (1, 4, 1)), 256, 511),
        (((4, 4, 4), (16, 16, 16), (1, 4, 4, 1)), 1024, 2047),
    ],
    ids=["4096-r16", "thin-r4", "thin-3-cores"],
)
def test_no_chunk_count_is_offered_for_a_memory_bound_no_chunk_can_meet(shape, batch, top):
    """Finds: a chunk of one row offered for the memory bound of training or of inference
    where no chunk count meets it (the row limit clamped to 1). At 4096 rows of the first
    layer in inference such a plan was chosen: 0.75 s against 0.41 s for 128 chunks with the
    right block first, measured on the project's 2-core CPU.

    With the left block first, unbatched, the transposed copies of the input and output (in
    training also of the output gradient) grow with the batch: for 4096 x 4096 at 4096 to
    8191 rows, about ``2 * 8191 * 8192`` numbers in training, more than the ``3 * 4096^2``
    that memory_budget allows beyond the output and input gradient; for the thin layers
    (64 inputs, 4096 outputs) ``top * 4096`` already in inference. Every candidate of a
    chunk per row, or of more chunks than the cache asks for (max_chunks, 128), must fit
    the bound in training or in inference, at one end of the range.
    """

    cap = DEFAULT_COST_MODELS["cpu"].max_chunks
    plans = candidate_plans(batch, *shape, threads=2, largest=top)
    suspects = [p for p in plans if p.chunks > cap or (p.chunks == batch and batch > 1)]
    for plan in suspects:
        assert any(
            plan_memory(plan, size, *shape, training=training) <= memory_budget(size, *shape[:2])
            for training in (True, False)
            for size in (batch, top)
        ), plan
    if batch == 4096:
        chosen = choose_plan(batch, *shape, threads=2, training=False, largest=top)
        assert chosen.chunks <= cap, chosen


# --- the planner: the choice -------------------------------------------------------------------


def test_choose_plan_counts_a_plan_at_exactly_the_memory_bound_as_within(monkeypatch):
    """Finds: choose_plan's ``over <= 0`` as ``< 0``; ties going to the last candidate.

    Fake estimates (as test_contraction does): the chain is fastest and needs exactly the
    memory bound, every other plan nothing: "within" the bound includes the bound, so the
    chain wins. Then all plans equally fast in inference: "ties: the first candidate".
    """

    real_budget = planner.memory_budget
    monkeypatch.setattr(
        planner,
        "_plan_memory",
        lambda plan, batch, i, o, r, training=True: (
            real_budget(batch, i, o) if plan.kind == "chain" else 0
        ),
    )
    monkeypatch.setattr(
        planner, "_estimate_time", lambda plan, *a, **k: 1.0 if plan.kind == "chain" else 2.0
    )
    assert planner.choose_plan(64, *ISSUE, training=False).kind == "chain"
    monkeypatch.setattr(planner, "_estimate_time", lambda plan, *a, **k: 1.0)
    first = planner.candidate_plans(64, *ISSUE)[0]
    assert planner.choose_plan(64, *ISSUE, training=False) == first


def test_when_no_plan_fits_the_memory_bound_the_leanest_is_chosen(monkeypatch):
    """Finds: the fallback choosing the hungriest plan, or the fastest regardless of memory.

    SMALL, 3 rows, serving up to 12, against a bound a tenth of memory_budget's, which no
    plan fits: the one over by the least at either end must be chosen, whatever its time.
    """

    real_budget = planner._memory_budget
    monkeypatch.setattr(planner, "_memory_budget", lambda *a: real_budget(*a) // 10)
    over = {
        plan: max(
            plan_memory(plan, b, *SMALL, training=True) - planner.memory_budget(b, *SMALL[:2])
            for b in (3, 12)
        )
        for plan in candidate_plans(3, *SMALL)
    }
    assert min(over.values()) > 0
    leanest = min(over, key=over.get)
    assert list(over.values()).count(over[leanest]) == 1  # one plan is the leanest
    assert planner.choose_plan(3, *SMALL, training=True, largest=12) == leanest


def test_a_plan_serving_a_range_fits_the_memory_bound_at_both_ends():
    """Finds: choose_plan checking the memory bound only at ``largest``.

    (32, 1) x (32, 1) at rank 1 on "cuda", training: the two-block plan keeps Z up to 64 rows
    (2 M N / (r M_s N_f) = 2048 / 32), and with it Z's per-row products, 64 * 32 * (1 + 32) =
    67 584 numbers against a bound of 3 * 1024 + 64 * 64 = 7168 at 64 rows; at 127 rows it keeps
    nothing and fits. The table's plan for 64..127 rows must fit at every size it serves.
    """

    shape = ((32, 1), (32, 1), (1, 1, 1))
    table = plan_table(*shape, torch.float32, "cuda", 1, True)
    for batch in (64, 100, 127):
        plan = [plan for lowest, plan in table if batch >= lowest][-1]
        assert plan_memory(plan, batch, *shape) <= memory_budget(batch, *shape[:2]), (batch, plan)


def test_a_plan_table_sizes_its_chunks_for_the_top_of_each_range(monkeypatch):
    """Finds: chunk counts sized for the lowest batch of a table range (such as 2^k) instead
    of its top (the next tabulated size - 1), whose chunks then overflow the memory bound at
    the top and leave only the dense plan.

    4096 -> 11008 as (16, 16, 16) x (16, 43, 16), rank 4, on "cuda" in training: the
    two-block plan at split 1, right block first (M_s = 16, M_f = 256, N_f = 688), holds dZ,
    Q and the transposed rows, 2 r M_s N_f + M_s M_f = 92 160 numbers a row, against
    3 M N - 2 * 704 512 (the right block made and both blocks' gradients) - 1024 = 133.9M
    free: at most 1 452 rows a chunk, so 2 chunks for 1024..2047 rows and 3 for 2048..3071.
    Sized for each range's top it stays the choice from 1024 rows up, its count growing
    with the batch, within the bound at every size served. (Without batched_first plans,
    which the cost model prefers for this layer on "cuda", and whose rows take other sizes;
    the table is computed afresh, not taken from plan_table's cache.)
    """

    monkeypatch.setattr(planner, "BATCHED_MIN_INPUTS", 2**62)
    shape = ((16, 16, 16), (16, 43, 16), (1, 4, 4, 1))
    table = planner.cached_plan_table.__wrapped__(*shape, torch.float32, "cuda", 1, True)
    tops = [lowest - 1 for lowest, _ in table[1:]] + [2**25 - 1]
    for (lowest, plan), top in zip(table, tops, strict=True):
        for batch in (max(lowest, 1), top):
            over = plan_memory(plan, batch, *shape) - memory_budget(batch, *shape[:2])
            assert over <= 0, (lowest, top, plan)
    chunked = [(lowest, plan) for lowest, plan in table if plan.chunks > 1]
    assert chunked[0][0] == 1024 and chunked[0][1].chunks == 2
    assert len(chunked) >= 8  # one plan from 1024 rows on, its chunks growing with the batch
    start = table.index(chunked[0])
    assert list(table[start : start + len(chunked)]) == chunked  # consecutive entries
    assert all(plan.kind == "twoblock" for _, plan in chunked)
    counts = [plan.chunks for _, plan in chunked]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_an_unchunked_training_plan_gets_one_threads_cache():
    """Finds: an unchunked plan's intermediate counted as cached in training up to twice the
    threads' cache, as a chunk's is (or with any allowance that grows with the threads).

    1024 x 1024 (4, 8, 8, 4), rank 8: Z is 32 KiB a row, and one thread's cache 1 MiB. With
    two threads training took the unchunked plan up to 127 rows (4 MiB), measured 1.2-1.5
    times the fastest chunk count's time at 96-127 rows, and 1.0-1.18 times 2 chunks' time
    at 40-56 rows in a stack of such layers; it must chunk from 48 rows now, while
    inference, which makes only Z, still runs unchunked at 96 rows. At 32 rows (1 MiB, in
    one thread's cache) training stays unchunked. The page faults behind this do not depend
    on the threads: the estimate's jump in training is at 32 rows for 1, 2 or 4 threads;
    in inference it is at twice the threads' cache (64, 128, 256 rows).
    """

    one_thread = DEFAULT_COST_MODELS["cpu"].cache_bytes
    assert 32 * 32 * 1024 == one_thread
    assert choose_plan(48, *ISSUE, threads=2, training=True).chunks >= 2
    assert choose_plan(96, *ISSUE, threads=2, training=False).chunks == 1
    assert choose_plan(32, *ISSUE, threads=2, training=True).chunks == 1
    unchunked = Plan("twoblock", split=2)

    def step(plan: Plan, batch: int, threads: int, training: bool) -> float:
        # The estimate's growth from batch to batch + 1 (its fixed costs cancel): at the edge
        # the whole intermediate's traffic starts to count, many rows' worth.
        before, after = (
            estimate_time(plan, b, *ISSUE, threads=threads, training=training)
            for b in (batch, batch + 1)
        )
        return after - before

    def jumps(plan: Plan, threads: int, training: bool, edges: tuple[int, ...]) -> list[bool]:
        return [
            step(plan, edge, threads, training) > 2 * step(plan, edge - 1, threads, training)
            for edge in edges
        ]

    edges = (32, 64, 128, 256)
    for threads, inference_edge in ((1, 64), (2, 128), (4, 256)):
        assert jumps(unchunked, threads, True, edges) == [e == 32 for e in edges]
        assert jumps(unchunked, threads, False, edges) == [e == inference_edge for e in edges]
    # With dS from Z, the product of Z's and g's copies reads both: in the cache within one
    # thread's (36 KiB a row, so up to 28 rows), not within twice the threads' (56 at two).
    from_z = Plan("twoblock", split=2, second_from_z=True)
    assert jumps(from_z, 2, True, (28, 56)) == [True, False]


def test_max_chunks_caps_a_plan_of_more_chunks_instead_of_dropping_it():
    """Finds: choose_plan dropping the plans of more than ``max_chunks`` chunks.

    A compiled graph serves every batch from its bound up with at most that many chunks.
    At one thread the training table of 1024 x 1024 (4, 8, 8, 4), rank 8, first chunks at 48
    rows, and the two-block plan of 2048 rows, 64 chunks, was dropped for a graph capped at
    48: the dense plan took its place, estimated 1.3 times slower. Capped at 32 or 48 it is
    the same plan in that many (larger) chunks; at most one chunk means none. (At 16, chunks
    of 128 rows no longer fit the cache, and the dense plan is estimated as fast.)
    """

    free = choose_plan(2048, *ISSUE, threads=1)
    assert free.kind == "twoblock" and free.chunks == 64
    for cap in (32, 48):
        assert choose_plan(2048, *ISSUE, threads=1, max_chunks=cap) == dataclasses.replace(
            free, chunks=cap
        )
    assert choose_plan(2048, *ISSUE, threads=1, max_chunks=1).chunks == 1


def test_max_chunks_admits_plans_of_exactly_that_many_chunks():
    """Finds: choose_plan's ``plan.chunks <= max_chunks`` as ``<``.

    The unrestricted choice at 1024 rows is chunked (test_contraction checks it); restricted
    to at most its own chunk count, it is still the same plan.
    """

    for training in (True, False):
        free = choose_plan(1024, *ISSUE, threads=2, training=training)
        assert free.chunks > 1
        assert (
            choose_plan(1024, *ISSUE, threads=2, training=training, max_chunks=free.chunks) == free
        )


@pytest.mark.parametrize(
    ("shape", "training"),
    [(((16, 16), (16, 16), (1, 4, 1)), True), (((2, 256), (256, 2), (1, 2, 1)), False)],
)
def test_plan_table_up_to_its_largest_batch(shape, training, monkeypatch):
    """Finds: plan_table tabulating fewer batch sizes than its docstring's 2**24, or others
    (the half octaves in inference); a range's plan chosen for other sizes than it serves; a
    table repeating a plan in consecutive entries.

    Each power of two up to 2**24, and in training each 3 * 2**k below it, must get the plan
    choose_plan gives for the range it starts (up to the next such size, exclusive), and
    choose_plan is asked exactly that. Consecutive entries differ: each bound is a place where
    the plan changes (under tracing every bound becomes a guard).
    """

    sizes = sorted(
        {2**k for k in range(25)} | ({3 * 2**k for k in range(23)} if training else set())
    )
    asked = []

    def spy(batch, *args, largest=0, **kwargs):
        asked.append((batch, largest))
        return choose_plan(batch, *args, largest=largest, **kwargs)

    monkeypatch.setattr(planner, "choose_plan", spy)
    table = planner.cached_plan_table.__wrapped__(*shape, torch.float32, "cpu", 1, training)
    monkeypatch.undo()
    assert asked == [(s, t - 1) for s, t in zip(sizes, [*sizes[1:], 2**25], strict=True)]
    assert {lowest for lowest, _ in table} <= {0, *sizes}
    assert all(a[1] != b[1] for a, b in itertools.pairwise(table))
    for lowest, following in zip(sizes, [*sizes[1:], 2**25], strict=True):
        in_table = [plan for bound, plan in table if lowest >= bound][-1]
        expected = choose_plan(lowest, *shape, training=training, largest=following - 1)
        assert in_table == expected, lowest


def test_every_chain_the_planner_chooses_runs():
    # 29 cores, modes alternating 1 and 2, rank 1, 64 rows: opt_einsum's greedy path (beyond
    # 10 cores) made a pairwise step of 53 indices, more than einsum's 52 letters, and the
    # planner chose that chain (at one thread); the forward pass raised ValueError. The plan
    # depends on the thread count: each count's choice runs.
    d = 29
    in_modes = tuple(1 + k % 2 for k in range(d))
    out_modes = tuple(2 - k % 2 for k in range(d))
    layer = TTLinear(2**14, 2**15, 1, in_modes=in_modes, out_modes=out_modes)
    x = torch.randn(64, 2**14)
    with torch.no_grad():
        for threads in (1, 2, 4):
            plan = choose_plan(64, in_modes, out_modes, layer.ranks, threads=threads)
            assert tt_linear(x, list(layer.cores), plan=plan).shape == (64, 2**15)


def test_a_chain_order_is_searched_once_per_octave_and_holds_at_any_batch():
    """Finds: the chain's order searched at every batch size (a training table chooses at
    half octaves, and a 6-core order search takes up to 0.1 s), or one that gives wrong
    results at a batch it was not searched for.

    The chain candidate at 96 rows is the one at 64; run at 96 rows it matches the dense
    float64 reference (sums of products in another order: 1e-10 relative is ample).
    """

    in_modes, out_modes = (4, 4, 4, 4, 4, 4), (2, 2, 2, 2, 2, 2)
    layer = TTLinear(4**6, 2**6, 8, in_modes=in_modes, out_modes=out_modes, dtype=F64)
    ranks = layer.ranks

    def chain(batch: int) -> Plan:
        return next(
            p for p in candidate_plans(batch, in_modes, out_modes, ranks) if p.kind == "chain"
        )

    planner._chain_plan.cache_clear()
    assert chain(96) == chain(64) == chain(127)
    assert planner._chain_plan.cache_info().misses == 1  # searched at 64 only
    chain(128)
    assert planner._chain_plan.cache_info().misses == 2
    x = torch.randn(96, 4**6, dtype=F64)
    with torch.no_grad():
        got = tt_linear(x, list(layer.cores), layer.bias, plan=chain(96))
        expected = x @ tt_to_dense(list(layer.cores)).T + layer.bias
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * expected.abs().max())


@pytest.mark.parametrize("d", [29, 33, 40])
def test_every_candidate_chain_runs(d):
    # Every candidate is documented to run in tt_linear: with a greedy path a chain may have
    # a step of more than einsum's 52 letters, and must then not be a candidate. Long chains
    # of unit and small modes, ranks 1 and 2, each chain checked against the two-block
    # product at the middle split in float64 (W itself would take gigabytes).
    in_modes = tuple(1 + k % 2 for k in range(d))
    out_modes = tuple(2 - k % 2 for k in range(d))
    g = torch.Generator().manual_seed(d)
    for rank in (1, 2):
        ranks = (1, *[rank] * (d - 1), 1)
        cores = [
            torch.randn(ranks[k], m, n, ranks[k + 1], dtype=F64, generator=g) * 0.7
            for k, (m, n) in enumerate(zip(in_modes, out_modes, strict=True))
        ]
        x = torch.randn(3, math.prod(in_modes), dtype=F64, generator=g)
        expected = tt_linear(x, cores, plan=Plan("twoblock", split=d // 2))
        chains = [p for p in candidate_plans(3, in_modes, out_modes, ranks) if p.kind == "chain"]
        for plan in chains:
            got = tt_linear(x, cores, plan=plan)
            # Float64, two orders of the same sums of products: 1e-9 relative is ample.
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


# --- the planner: the cost model ------------------------------------------------------------


def test_estimate_time_follows_the_documented_speed_law():
    """Finds: gemm without the small-dimension slowdown; CostModel.speedup never finding a
    dtype; (with the traffic term) gemm without memory traffic.

    The module docstring: a product counts 2 m k n operations at peak * d / (d + half_dim),
    d its smallest dimension, plus the time to move its operands, plus a fixed overhead. A
    one-core "dense" plan in inference is one product (B, M) @ (M, N). Model (installed for
    a device type of its own): 1e9 flop/s, half_dim 6, float64 at half speed, overhead 0 and
    a bandwidth of 1e30 (traffic ~1e-25 s, nothing next to 1e-5 s). By hand, B = 4, M = 64,
    N = 32, d = 4: 2 * 4 * 64 * 32 * (4 + 6) / (1e9 * 4) = 4.096e-5 s in float32, twice that
    in float64. Then a bandwidth of 1e9 B/s adds 4 * (4*64 + 64*32 + 2*4*32) bytes / 1e9
    (the result is read before it is written) = 1.0240e-5 s. Relative 1e-12: float rounding.
    """

    def model(bandwidth):
        return CostModel(
            flops=1e9,
            half_dim=6.0,
            bandwidth=bandwidth,
            overhead=0.0,
            dtype_speedup=(("float64", 0.5),),
        )

    args = (Plan("dense"), 4, (64,), (32,), (1, 1))
    try:
        set_cost_model("mps", model(1e30))
        t32 = estimate_time(*args, device_type="mps", training=False)
        t64 = estimate_time(*args, dtype=torch.float64, device_type="mps", training=False)
        assert t32 == pytest.approx(4.096e-5, rel=1e-12)
        assert t64 == pytest.approx(2 * 4.096e-5, rel=1e-12)
        set_cost_model("mps", model(1e9))
        t32 = estimate_time(*args, device_type="mps", training=False)
        assert t32 == pytest.approx(4.096e-5 + 4 * (256 + 2048 + 256) / 1e9, rel=1e-12)
    finally:
        set_cost_model("mps", None)


@pytest.mark.parametrize(
    ("from_z", "keep_below", "flops"),
    [
        # Per batch of B = 6 rows, right first: M_s = 2, M_f = 8, N_s = 8, N_f = 2, r = 2.
        # dZ (6 products 4 x 8 x 2), dx (12 x 4 x 8) and dF (8 x 12 x 4): 768 operations each.
        # dS from Z: Z again (12 x 8 x 4), 768, unless kept, and one product 4 x 12 x 8, 768.
        (True, -1, 5 * 768),
        (True, 100, 4 * 768),
        # From Q: Q (6 products 16 x 2 x 8), 3072, and one product 2 x 48 x 16, 3072.
        (False, -1, 3 * 768 + 2 * 3072),
    ],
)
def test_the_backward_estimate_counts_the_products_of_its_path(from_z, keep_below, flops):
    """Finds: _twoblock_time costing a second_from_z plan as a Q plan, without the
    recomputed Z, or with it where Z is kept.

    With a model of pure arithmetic (1e9 flop/s at every size: a half_dim of 1e-12, which
    must be positive; no overheads; a bandwidth of 1e30, so that copies and traffic cost
    ~1e-25 s), training minus inference is the backward pass's operations over 1e9; the
    blocks of a two-core layer are its cores, so there is no merge. Relative 1e-9: float
    rounding, the 1e-12 and the 1e-25 s terms.
    """

    model = CostModel(flops=1e9, half_dim=1e-12, bandwidth=1e30, overhead=0.0)
    plan = Plan("twoblock", split=1, first="right", save_max_batch=keep_below, second_from_z=from_z)
    training, inference = estimates_with(model, plan, 6, (2, 8), (8, 2), (1, 2, 1))
    assert training - inference == pytest.approx(flops / 1e9, rel=1e-9)


@pytest.mark.parametrize(("keep_below", "flops"), [(-1, 9216), (100, 7680)])
def test_the_batched_estimate_counts_its_products(keep_below, flops):
    """Finds: _batched_time with a product of the wrong shape, without the recomputed Z, or
    with it where Z is kept; the forward pass costed as another plan's.

    As test_the_backward_estimate_counts_the_products_of_its_path (a model of pure
    arithmetic), for a batched plan on (2, 8) x (4, 3), rank 2, B = 6: M_1 = 2, M_2 = 8,
    N_1 = 4, N_2 = 3. Multiply-adds: Z, B N_1 r M_1 M_2 = 768; y and, backward, dS and dZ,
    B N_1 r M_2 N_2 = 1152 each; dx and dA, B M_1 N_1 r M_2 = 768 each. Forward 2 * 1920
    operations; backward 2 * (3 * 1152 + ... ) as below: 2 * 3840 = 7680 with Z kept, and
    2 * 768 more for Z recomputed.
    """

    model = CostModel(flops=1e9, half_dim=1e-12, bandwidth=1e30, overhead=0.0)
    plan = Plan("twoblock", split=1, first="left", save_max_batch=keep_below, batched_first=True)
    training, inference = estimates_with(model, plan, 6, (2, 8), (4, 3), (1, 2, 1))
    assert inference == pytest.approx(2 * 1920 / 1e9, rel=1e-9)
    assert training - inference == pytest.approx(flops / 1e9, rel=1e-9)


def test_cpu_threads_scale_the_cache_for_chunks():
    """Finds: _costing ignoring the thread count.

    CostModel's docstring: on CPUs cache_bytes scales with the threads. ISSUE at 200 rows,
    split 2: Z is 200 * 32 KiB = 6 250 KiB; 1 MiB per thread: 7 chunks with 1 thread, 4 with
    2 threads (2 MiB), 2 with 4. (Past one thread's cache there are at least 2 chunks for
    the unchunked training plan's sake, so 100 rows would give 4, 2 and 2.)
    """

    def chunks(threads):
        return max(
            p.chunks
            for p in candidate_plans(200, *ISSUE, threads=threads)
            if p.kind == "twoblock" and (p.split, p.first) == (2, "right")
        )

    assert [chunks(1), chunks(2), chunks(4)] == [7, 4, 2]


def test_set_cost_model_none_restores_the_fallback_of_a_device_without_a_default():
    """Finds: set_cost_model(device, None) keeping a custom model of a device type that has
    no default of its own.

    "None: the default": for "mps" that is the CPU's model (devices without a model of their
    own are planned like the CPU).
    """

    slow_calls = dataclasses.replace(DEFAULT_COST_MODELS["cpu"], overhead=1.0, cache_bytes=0)
    cpu = choose_plan(1024, *ISSUE, device_type="cpu")
    try:
        set_cost_model("mps", slow_calls)
        assert choose_plan(1024, *ISSUE, device_type="mps") != cpu  # the custom model acts
        set_cost_model("mps", None)
        assert choose_plan(1024, *ISSUE, device_type="mps") == cpu
    finally:
        set_cost_model("mps", None)


def test_set_cost_model_checks_cache_and_chunks_and_accepts_zero_costs():
    """Finds: set_cost_model without its cache_bytes or max_chunks check; with ``> 0`` for
    the costs; calibrate accepting ``repeats=True``.

    Its docstring: the costs must be >= 0 (the default CUDA model has matrix_overhead 0).
    A negative cache or no chunk at all would fail later, in the planner.
    """

    default = DEFAULT_COST_MODELS["cpu"]
    try:
        bad = (("cache_bytes", -1), ("max_chunks", 0), ("cache_traffic", -0.1))
        for field, value in (*bad, ("cache_traffic", 1.5), ("cache_traffic", math.nan)):
            with pytest.raises(ValueError, match=field):
                set_cost_model("cpu", dataclasses.replace(default, **{field: value}))
        # Found by a review (helper 73): a float passed, then a chunked plan's products
        # failed (tensor_split() got a float).
        for field, value in (("cache_bytes", 1e6), ("max_chunks", 4.0), ("max_chunks", True)):
            with pytest.raises(TypeError, match=f"model.{field} must be an int"):
                set_cost_model("cpu", dataclasses.replace(default, **{field: value}))
        # Found by a review (helper 76): a factor of 0 failed at the next plan choice
        # (ZeroDivisionError), a negative or NaN one ranked plans at random.
        for speedup in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="dtype_speedup"):
                set_cost_model(
                    "cpu", dataclasses.replace(default, dtype_speedup=(("float16", speedup),))
                )
        for speedups in ((("float16", "2"),), (("float16",),), ((torch.float16, 2.0),), "x"):
            with pytest.raises(TypeError, match="dtype_speedup"):
                set_cost_model("cpu", dataclasses.replace(default, dtype_speedup=speedups))
        for field, value in (("flops", "1e11"), ("half_dim", None), ("cache_traffic", "x")):
            with pytest.raises(TypeError, match=f"model.{field} must be a number"):
                set_cost_model("cpu", dataclasses.replace(default, **{field: value}))
        assert planner._cost_model("cpu") is default  # refused: left as it was
        set_cost_model("cpu", dataclasses.replace(default, overhead=0.0, matrix_overhead=0.0))
        set_cost_model("cpu", dataclasses.replace(default, cache_traffic=1.0))
        set_cost_model("cuda", DEFAULT_COST_MODELS["cuda"])
    finally:
        set_cost_model("cpu", None)
        set_cost_model("cuda", None)
    with pytest.raises(TypeError, match="repeats must be a positive int"):
        calibrate("cpu", repeats=True)
    with pytest.raises(TypeError, match="repeats must be a positive int"):
        calibrate("cpu", repeats="a")
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        calibrate("cpu", dtype=torch.int64)


@pytest.mark.parametrize(
    ("batch", "in_modes", "out_modes", "ranks", "error", "match"),
    [
        (8, (4, 6), (3, 5), (1, 0, 1), ValueError, "ranks must be the 3 positive bond ranks"),
        (8, (4, 6), (3, 5), (1, 2), ValueError, "ranks must be the 3 positive bond ranks"),
        (8, (4, 6), (3, 5), (2, 2, 1), ValueError, "ranks must be the 3 positive bond ranks"),
        (8, (4, 6), (3, 5), (1, 2.0, 1), TypeError, "ranks must hold ints"),
        (8, (4, 0), (3, 5), (1, 2, 1), ValueError, "in_modes must hold positive ints"),
        (8, (4, -6), (3, 5), (1, 2, 1), ValueError, "in_modes must hold positive ints"),
        (8, (4, 6), (3,), (1, 2, 1), ValueError, "in_modes and out_modes must have the same"),
        (-1, (4, 6), (3, 5), (1, 2, 1), ValueError, "batch must be an int >= 0"),
        (8.0, (4, 6), (3, 5), (1, 2, 1), TypeError, "batch must be an int >= 0"),
    ],
)
def test_public_planning_functions_check_their_shape_arguments(
    batch, in_modes, out_modes, ranks, error, match
):
    """Finds: no checks (helper 76): a rank of 0 was a ZeroDivisionError inside the cost
    model, too few ranks an IndexError, and a mode of 0 or a negative one gave a plan."""
    calls = (
        lambda: candidate_plans(batch, in_modes, out_modes, ranks),
        lambda: choose_plan(batch, in_modes, out_modes, ranks),
        lambda: estimate_time(Plan("dense", split=1), batch, in_modes, out_modes, ranks),
        lambda: plan_memory(Plan("dense", split=1), batch, in_modes, out_modes, ranks),
    )
    for call in calls:
        with pytest.raises(error, match=match):
            call()


def test_public_planning_functions_check_the_plan_and_take_numpy_arguments():
    """Finds (helpers 80 and 81): a plan that is not one, or does not fit, was an
    AttributeError, KeyError or IndexError from estimate_time and plan_memory;
    memory_budget checked nothing; NumPy ranks (taken before the checks) were refused, and a
    NumPy batch failed in candidate_plans; a dict of speedups (read with dict()) refused."""
    shape = ((4, 6), (3, 5), (1, 2, 1))
    for function in (estimate_time, plan_memory):
        for plan, error, match in (
            ("dense", TypeError, "plan must be a Plan; got str"),
            (Plan("foo"), ValueError, "plan must be a Plan of kind"),
            (Plan("twoblock", split=5), ValueError, "does not fit a chain of 2 cores"),
            (Plan("twoblock", split=1, chunks=0), ValueError, "does not fit a chain"),
            (Plan("twoblock", split=1, chunks=2.0), TypeError, "plan.chunks must be an int"),
        ):
            with pytest.raises(error, match=match):
                function(plan, 8, *shape)
    with pytest.raises(ValueError, match="batch must be an int >= 0"):
        memory_budget(-1, *shape[:2])
    with pytest.raises(TypeError, match="in_modes must be a sequence"):
        memory_budget(8, 24, 15)
    numpy = (np.array(shape[0]), np.array(shape[1]), np.array(shape[2]))
    assert candidate_plans(np.int64(8), *numpy) == candidate_plans(8, *shape)
    assert choose_plan(np.int64(8), *numpy) == choose_plan(8, *shape)
    plan = Plan("dense", split=1)
    assert estimate_time(plan, 8, *numpy) == estimate_time(plan, 8, *shape)
    assert plan_memory(plan, 8, *numpy) == plan_memory(plan, 8, *shape)
    try:
        default = DEFAULT_COST_MODELS["cpu"]
        speedups = {"float16": 2.0}
        set_cost_model("cpu", dataclasses.replace(default, dtype_speedup=speedups))
        speedups["float16"] = 0.0  # the installed model keeps its own copy, as pairs
        assert planner._cost_model("cpu").speedup(torch.float16) == 2.0
        hash(planner._cost_model("cpu"))  # a dict field made it unhashable
    finally:
        set_cost_model("cpu", None)


def test_max_chunks_of_one_never_chunks_for_the_cache():
    """Finds: chunks capped at max_chunks, then raised to 2 for an intermediate past the cache.

    CostModel.max_chunks is "at most this many chunks"; with 1, tables chunked from 128 rows
    in inference and 48 in training (helper 73). Only the memory bound may chunk then, as
    it does for a model without a cache (cache_bytes=0).
    """
    shape = ((4, 8, 8, 4), (4, 8, 8, 4), (1, 16, 64, 16, 1))
    default = DEFAULT_COST_MODELS["cpu"]
    found = {}
    try:
        for name, model in (
            ("one", dataclasses.replace(default, max_chunks=1)),
            ("no cache", dataclasses.replace(default, cache_bytes=0)),
        ):
            set_cost_model("cpu", model)
            found[name] = [
                candidate_plans(batch, *shape, threads=1) for batch in (64, 256, 1024, 8192)
            ]
    finally:
        set_cost_model("cpu", None)
    assert found["one"] == found["no cache"]
