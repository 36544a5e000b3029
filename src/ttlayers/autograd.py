r"""The two-block product and its hand-written backward pass.

Split a TT matrix at bond ``s`` into a left block (cores ``1..s``, modes ``M_1 = prod m_k``,
``N_1 = prod n_k``) and a right block (cores ``s+1..d``, ``M_2``, ``N_2``), joined by the bond
of rank ``r``. With the input row ``x[b]`` viewed as an ``(M_1, M_2)`` matrix,

.. math::

    y[b, n_1, n_2] = \sum_{a, m_1, m_2} L[m_1, a, n_1]\, x[b, m_1, m_2]\, R[m_2, a, n_2].

The input meets one block first (``F``, sizes ``M_f, N_f``) and then the other (``S``,
``M_s, N_s``), in ``2 B r M_s (M_f N_f + N_s N_f)`` operations (Novikov et al. 2015 contract
core by core; merging the cores into two blocks first is what makes the products large), a
fraction of the dense ``2 B M N`` for moderate ranks: half of it for ``1024 x 1024``, modes
``(4, 8, 8, 4)``, rank 8. The intermediate
``Z[b, m_s, a, n_f] = sum_{m_f} x[b, m_s, m_f] F[m_f, a, n_f]`` is laid out batch-major, so
that every step is one matrix product or one batched product over the rows, with no
permutation of ``Z`` (for the left block first, the rows of ``x`` and ``y`` are transposed
instead, copies of the size of the input and the output):

- forward: ``Z = x F`` as one ``(B M_s, M_f) @ (M_f, r N_f)`` product; then
  ``y[b] = S^T Z[b]``, ``B`` products ``(N_s, M_s r) @ (M_s r, N_f)`` in one batched call.
- backward, with ``g`` the output gradient: ``dZ[b] = S g[b]`` (batched),
  ``dx = dZ F^T`` and ``dF = x^T dZ`` (one product each, over ``B M_s`` rows). For ``dS``,
  ``sum_b Z[b] g[b]^T`` (batched, then summed over the rows) when ``Z`` was kept; otherwise
  ``Q[b] = F g[b]^T`` (batched) and ``dS = sum_{b, m_f} x[b, :, m_f] Q[b, m_f]``, one product
  over ``B M_f`` with the rows of ``x`` transposed, which needs no recomputed ``Z``: in all
  ``2 B r M_f N_s (N_f + M_s)`` operations. Where ``N_f`` and ``M_s`` are small next to
  ``N_s`` and ``M_f`` that is far more than the forward pass (modes ``(2, 512)`` in and
  ``(512, 2)`` out, rank 2: 256 times as much, twice the dense layer's), and the layout
  asks for a third way (``second_from_z``): ``Z`` (kept, or recomputed) and ``g``,
  transposed to ``(M_s r, B N_f)`` and ``(B N_f, N_s)``, then one product over ``B N_f``,
  in all ``2 B r M_s N_f (M_f + N_s)`` operations and copies of the size of ``Z`` and (unless
  the left block comes first, where the rows of ``g`` are laid out so) of ``g``.

Rows are processed in chunks (a static count, chosen by the planner) so that each chunk's
``Z`` stays in the CPU cache, and ``Z`` is not kept: the backward pass does without it (for
blocks of like sizes ``Q`` costs what recomputing ``Z`` would, and needs no sum over the
rows), and the layer keeps no more than its input for the backward pass. For ordinary
eager tensors (``plain_tensors``) the chunks write into buffers allocated once per call.
On GPUs the planner chunks only to stay within the memory ``nn.Linear`` would use.
Unchunked, ``Z`` is kept when the layout says so (the planner does when it fits in the
memory ``nn.Linear`` would spend on its weight gradient). No tensor of the size of ``W``
exists in either pass.

With the left block first there is a second way, ``batched`` (the cores' own layouts,
``A = L`` as ``(M_1, N_1 r)`` and ``S = R`` as ``(r M_2, N_2)``), which transposes no row:
the left block meets each row's ``(M_1, M_2)`` matrix in one batched product, and the right
block all rows at once, over the ``B N_1`` rows of ``Z[b] = A^T x[b]``, ``(N_1 r, M_2)``:

- forward: ``Z[b] = A^T x[b]`` (batched), then ``y = Z S`` as one
  ``(B N_1, r M_2) @ (r M_2, N_2)`` product, whose rows are the output's.
- backward: ``dS = Z^T g`` and ``dZ = g S^T``, one product each over the ``B N_1`` rows of
  ``Z`` (kept, or recomputed chunk by chunk) and ``g``; ``dx[b] = A dZ[b]`` (batched); and
  ``dA = sum_b x[b] dZ[b]^T`` (batched, then summed over the rows).

The same operations as the left block first with transposed rows, and the large products
(those with ``N_2``) are single matrix products instead of batched ones.

When the backward pass is itself differentiated (``create_graph=True`` or ``torch.func``), a
kept ``Z`` is not used and ``dS`` goes through ``Q`` (or, with ``second_from_z``, a
recomputed ``Z``), which autograd sees as a function of the inputs, so that second
derivatives are exact too. Forward-mode AD (``torch.func.jvp``,
``torch.func.hessian``) goes through ``EagerTwoBlockProduct.jvp``: the product is linear
in each of ``x``, ``F`` and ``S``, so its tangent is three products of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

# The autograd.Function and its helpers serve tt_linear, which checks the arguments; they
# are not API (this module is documented for the method).
__all__: list[str] = []


class TwoBlockLayout(NamedTuple):
    """The static sizes and choices of a two-block product.

    Attributes:
        m1: Product of the input modes of the left block.
        m2: Product of the input modes of the right block.
        n1: Product of the output modes of the left block.
        n2: Product of the output modes of the right block.
        first: ``"right"`` or ``"left"``: the block that meets the input first.
        keep: Keep the intermediate for the backward pass (only when ``chunks == 1``).
        chunks: Process the rows in this many chunks (``torch.tensor_split``).
        second_from_z: Form the gradient of the second block from ``Z`` (kept, or
            recomputed chunk by chunk) and the output gradient, both transposed, instead of
            from ``Q[b] = F g[b]^T``.
        batched: The left block first by a batched product over the rows in their own
            layout (``first == "left"``; the blocks as ``(M_1, N_1 r)`` and
            ``(r M_2, N_2)``, see the module docstring).
    """

    m1: int
    m2: int
    n1: int
    n2: int
    first: str
    keep: bool
    chunks: int = 1
    second_from_z: bool = False
    batched: bool = False

    @property
    def sides(self) -> tuple[int, int, int, int]:
        """``(M_s, M_f, N_s, N_f)``: the sizes of the second and of the first block."""
        if self.first == "right":
            return self.m1, self.m2, self.n1, self.n2
        return self.m2, self.m1, self.n2, self.n1


def _rows_first_major(x: torch.Tensor, layout: TwoBlockLayout) -> torch.Tensor:
    """Rows of ``x`` as ``(B, M_s, M_f)`` matrices: a view, or a transposed copy."""
    x3 = x.reshape(x.shape[0], layout.m1, layout.m2)
    return x3 if layout.first == "right" else x3.transpose(1, 2).contiguous()


def _rows_out(y: torch.Tensor, layout: TwoBlockLayout) -> torch.Tensor:
    """``(B, N_s, N_f)`` products back to rows ``(B, N_1 N_2)``."""
    if layout.first == "left":
        y = y.transpose(1, 2)
    return y.reshape(y.shape[0], layout.n1 * layout.n2)


def _grad_rows(grad_y: torch.Tensor, layout: TwoBlockLayout) -> torch.Tensor:
    """Output gradient rows as ``(B, N_s, N_f)`` matrices: a view, or a transposed copy.

    With the left block first and ``dS`` from ``Z``, a transposed view: that product wants
    the rows as ``(N_f, N_s)``, as they are, and the batched products take either layout.
    """
    g = grad_y.reshape(grad_y.shape[0], layout.n1, layout.n2)
    if layout.first == "right":
        return g
    return g.transpose(1, 2) if layout.second_from_z else g.transpose(1, 2).contiguous()


def jit_tracing() -> bool:
    """Whether ``torch.jit.trace`` is recording (``torch.jit.is_tracing``, typed)."""
    return bool(torch.jit.is_tracing())  # type: ignore[attr-defined,no-untyped-call]


def is_one(size: int | torch.SymInt) -> bool:
    """``size == 1`` for a concrete size; false for a size that a graph keeps variable.

    The single-row shortcut must not be baked into a graph that serves other sizes: under
    ``torch.jit.trace`` (sizes are traced values) it is never taken, and for a symbolic size
    (``torch.export`` with a dynamic batch dimension) only if that needs no guard. The general
    path is right for a single row too.
    """
    if isinstance(size, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(size == 1))
    if torch.compiler.is_compiling():
        # Dynamo shows symbolic sizes as ints. A data-dependent (unbacked) size, such as the
        # rows of x[mask], cannot be compared: false, with no guard.
        return guard_or_false(size == 1)
    return not jit_tracing() and size == 1


def symbolic_size(*sizes: int | torch.SymInt) -> bool:
    """Whether any of ``sizes`` may be symbolic, so that comparing it adds a guard.

    A ``SymInt``, or any size while Dynamo traces (it shows symbolic sizes as ints).
    """
    return any(isinstance(size, torch.SymInt) for size in sizes) or torch.compiler.is_compiling()


def guard_or_false(condition: bool | torch.SymBool) -> bool:
    """``condition``, guarded where a guard can decide it, else false (unbacked sizes).

    A size computed from data under ``torch.compile`` cannot be guarded on. PyTorch's
    ``guard_or_false``; on a torch without it (older than 2.7), plain ``bool``.
    """
    from torch.fx.experimental import symbolic_shapes

    decide = getattr(symbolic_shapes, "guard_or_false", None)
    return bool(decide(condition)) if decide is not None else bool(condition)


def row_chunks(x: torch.Tensor, chunks: int) -> Sequence[torch.Tensor]:
    """``x`` split along its rows into ``chunks`` pieces, as views (empty ones past its rows).

    Eagerly ``torch.tensor_split``. For a symbolic number of rows (``torch.compile`` with a
    dynamic batch size) the first ``chunks - 1`` pieces take ``B // chunks`` rows each and the
    last the rest: ``tensor_split`` would guard on ``B % chunks``, and so compile a graph for
    every remainder.
    """
    batch: int | torch.SymInt = x.shape[0]
    if not symbolic_size(batch):
        return x.tensor_split(chunks)
    size = batch // chunks
    pieces = [x.narrow(0, k * size, size) for k in range(chunks - 1)]
    return [*pieces, x.narrow(0, (chunks - 1) * size, batch - (chunks - 1) * size)]


def _intermediate(xs: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``Z[b] = x[b] F``: ``(B, M_s, M_f)`` rows and ``F`` of shape ``(M_f, r, N_f)``."""
    batch, ms, mf = xs.shape
    _, r, nf = first.shape
    z = torch.mm(xs.reshape(batch * ms, mf), first.reshape(mf, r * nf))
    return z.view(batch, ms * r, nf)


def _forward_chunk(
    xs: torch.Tensor, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y[b] = S^T Z[b] (+ bias)`` for a chunk of rows: ``(Bc, N_s, N_f)``, and ``Z``."""
    batch = xs.shape[0]
    ms, r, ns = second.shape
    z = _intermediate(xs, first)  # (Bc, Ms r, Nf)
    if is_one(batch):  # one product, without the batched call's expands
        s_t1 = second.reshape(ms * r, ns).t()
        y1 = torch.mm(s_t1, z[0]) if bias is None else torch.addmm(bias, s_t1, z[0])
        return y1.unsqueeze(0), z
    s_t = second.reshape(ms * r, ns).t().unsqueeze(0).expand(batch, ns, ms * r)
    if bias is None:
        return torch.bmm(s_t, z), z
    # The bias enters the batched product (beta = 1): no separate pass over the output.
    return torch.baddbmm(bias.unsqueeze(0).expand(batch, -1, -1), s_t, z), z


def plain_tensors(*tensors: torch.Tensor | None) -> bool:
    """Whether ``tensors`` are ordinary eager tensors, outside every AD transform.

    False while Dynamo or ``torch.jit.trace`` traces, inside a forward-mode AD level, for the
    wrapped tensors of ``torch.func`` transforms, and for the batched tensors of the older
    vmap that ``torch.autograd.grad(..., is_grads_batched=True)`` and
    ``torch.autograd.functional.jacobian(..., vectorize=True)`` use. Only then may products
    write into buffers (``out=``, which those have no rules for) or results be cached by
    value (a cache drops tangents, and a trace would keep the cached values as constants).
    Also false under any ``TorchDispatchMode``: ``make_fx``'s tracer is one, and its graph
    kept a cached block as a constant, blind to later changes of the cores; others (a FLOP
    counter) then see the products that merge the blocks.
    """
    # The current forward-mode AD level (-1 outside any); unknown on another torch: say no.
    level = getattr(torch.autograd.forward_ad, "_current_level", None)
    if torch.compiler.is_compiling() or jit_tracing() or level is None or level >= 0:
        return False
    modes = getattr(torch._C, "_len_torch_dispatch_stack", None)  # user and infra modes
    if modes is None or modes():
        return False
    functorch = torch._C._functorch
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    legacy = getattr(functorch, "is_legacy_batchedtensor", None)
    if wrapped is None or legacy is None:
        return False
    # Anything but a tensor is not plain either: the caller's checks then name it.
    return all(
        t is None or (isinstance(t, torch.Tensor) and not (wrapped(t) or legacy(t)))
        for t in tensors
    )


def _forward_into(
    xs: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    bias: torch.Tensor | None,
    chunks: int,
) -> torch.Tensor:
    """The chunked forward, ``(B, M_s, M_f)`` rows to ``(B, N_s, N_f)``, into one output.

    One buffer holds every chunk's ``Z`` in turn and each chunk's product is written into its
    rows of the output, so there is no concatenation and no fresh ``Z`` per chunk: freeing and
    allocating a few MiB per chunk lets the C allocator hand the pages back to the system and
    fault them in again, which cost as much as the products.
    """
    batch, ms, mf = xs.shape
    _, r, nf = first.shape
    ns = second.shape[2]
    first2 = first.reshape(mf, r * nf)
    s_t = second.reshape(ms * r, ns).t().unsqueeze(0)
    bias3 = None if bias is None else bias.unsqueeze(0)
    out = xs.new_empty(batch, ns, nf)
    pieces = xs.tensor_split(chunks)
    z_buffer = xs.new_empty(pieces[0].shape[0] * ms * r * nf)  # the first chunk is the largest
    start = 0
    for rows in pieces:
        bc = rows.shape[0]
        z = z_buffer[: bc * ms * r * nf].view(bc * ms, r * nf)
        torch.mm(rows.reshape(bc * ms, mf), first2, out=z)
        s_tb = s_t.expand(bc, ns, ms * r)
        target = out[start : start + bc]
        if bias3 is None:
            torch.bmm(s_tb, z.view(bc, ms * r, nf), out=target)
        else:
            torch.baddbmm(bias3.expand(bc, ns, nf), s_tb, z.view(bc, ms * r, nf), out=target)
        start += bc
    return out


def two_block_forward(
    x: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    bias: torch.Tensor | None,
    layout: TwoBlockLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass of :class:`TwoBlockProduct` (also the whole of inference).

    Returns ``y`` and ``Z`` when the layout keeps it (else an empty tensor).
    """
    if layout.batched:
        return _batched_forward(x, first, second, bias, layout)
    xs = _rows_first_major(x, layout)  # (B, Ms, Mf)
    if bias is not None:  # as the products' (N_s, N_f)
        bias = bias.view(layout.n1, layout.n2)
        bias = bias if layout.first == "right" else bias.t()
    if layout.chunks > 1 and plain_tensors(x, first, second, bias):
        y = _rows_out(_forward_into(xs, first, second, bias, layout.chunks), layout)
        z = x.new_empty(0)
    elif layout.chunks > 1:
        pieces = [
            _forward_chunk(rows, first, second, bias)[0] for rows in row_chunks(xs, layout.chunks)
        ]
        y = _rows_out(torch.cat(pieces), layout)
        z = x.new_empty(0)
    else:
        yb, z = _forward_chunk(xs, first, second, bias)
        y = _rows_out(yb, layout)
        if not layout.keep:
            z = x.new_empty(0)
    return y, z


def _setup(
    ctx: Any, inputs: tuple[Any, ...], output: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Set ``ctx`` up for :class:`TwoBlockProduct`; what it keeps for the backward pass.

    That is ``x``, the blocks, and ``Z`` if the layout says so.
    """
    x, first, second, _, layout = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    # Z has no gradient: without this, autograd would fill a tensor of Z's size with zeros
    # for it before every backward pass.
    ctx.set_materialize_grads(False)
    ctx.layout = layout
    kept = z if layout.keep and layout.chunks == 1 else None
    # The input only for the blocks' gradients (the input's needs the blocks alone): a frozen
    # layer neither keeps it nor refuses a later in-place change of it, as nn.Linear does
    # not. A placeholder of its shape, zero strides, holds no memory (under vmap it is
    # batched as x is, made from it).
    if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        x = x.new_empty(()).expand(x.shape)
    return x, first, second, kept


class TwoBlockProduct(torch.autograd.Function):
    """``y = x W^T (+ bias)`` for ``W`` given as two blocks; see the module docstring.

    Inputs of :meth:`forward`: ``x`` of shape ``(B, M_1 M_2)``; ``first`` of shape
    ``(M_f, r, N_f)``; ``second`` of shape ``(M_s, r, N_s)`` (both contiguous; with
    ``layout.batched``, ``(M_1, N_1 r)`` and ``(r M_2, N_2)``); ``bias`` of
    shape ``(N_1 N_2,)`` or ``None``; a :class:`TwoBlockLayout`. All tensors of one dtype and
    device.

    Outputs: ``y`` of shape ``(B, N_1 N_2)``, and the intermediate ``Z`` when it is kept
    (else an empty tensor), not differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        bias: torch.Tensor | None,
        layout: TwoBlockLayout,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute ``y``, and ``Z`` if it is to be kept."""
        y, z = two_block_forward(x, first, second, bias, layout)
        # y is often a view of a product made here ((B, N_s, N_f) as rows), and autograd
        # forbids changing a custom Function's view output in place (nn.ReLU(inplace=True)
        # after the layer, y += residual). Its base is internal, never an input: detached,
        # y is a tensor of its own to autograd.
        return y.detach(), z

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        """Keep the input, the blocks, and ``Z`` if the layout says so."""
        ctx.save_for_backward(*_setup(ctx, inputs, output))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor | None, grad_z: Any) -> tuple[Any, ...]:
        """Gradients of ``x``, ``first``, ``second`` and ``bias``."""
        if grad_y is None:  # grads are not materialized: y took no part in the result
            return None, None, None, None, None
        layout: TwoBlockLayout = ctx.layout
        x, first, second, z = ctx.saved_tensors
        need_x, need_first, need_second, need_bias, _ = ctx.needs_input_grad
        if not torch.is_grad_enabled():
            z_kept = z
        else:
            z_kept = None  # the backward is differentiated: Z must be a function of x
        needs = need_x, need_first, need_second
        grad_bias = grad_y.sum(0) if need_bias else None
        if layout.batched:
            grad_x, grad_first, grad_second = _batched_backward(
                x, first, second, z_kept, grad_y, layout, *needs
            )
            return grad_x, grad_first, grad_second, grad_bias, None
        xs_all = _rows_first_major(x, layout)
        g_all = _grad_rows(grad_y, layout)  # (B, Ns, Nf)
        if _buffered_backward(layout, x, first, second, grad_y):
            grad_xs_rows, grad_first, grad_second = _backward_into(
                xs_all, g_all, first, second, layout.chunks, layout.second_from_z, *needs
            )
        else:
            grad_xs_rows, grad_first, grad_second = _backward_by_chunks(
                xs_all,
                g_all,
                layout.chunks,
                lambda xs, g: _backward_chunk(
                    xs, g, first, second, z_kept, layout.second_from_z, *needs
                ),
            )
        grad_x = None
        if grad_xs_rows is not None:
            ms, mf, _, _ = layout.sides
            grad_x = grad_xs_rows.view(-1, ms, mf)
            if layout.first == "left":
                grad_x = grad_x.transpose(1, 2)
            grad_x = grad_x.reshape(x.shape)
        if grad_first is not None:
            grad_first = grad_first.to(first.dtype)
        if grad_second is not None:
            grad_second = grad_second.to(second.dtype)
        return grad_x, grad_first, grad_second, grad_bias, None


class EagerTwoBlockProduct(TwoBlockProduct):
    """:class:`TwoBlockProduct` with forward-mode AD, for use outside ``torch.compile``.

    Dynamo cannot trace an ``autograd.Function`` that defines ``jvp``; compiled code uses
    :class:`TwoBlockProduct`, eager code this class (``torch.func.jvp``, ``hessian``, dual
    tensors of ``torch.autograd.forward_ad``).
    """

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        """As :meth:`TwoBlockProduct.setup_context`; also keep the inputs for :meth:`jvp`."""
        saved = _setup(ctx, inputs, output)
        ctx.save_for_backward(*saved)
        # The same number of tensors as for the backward pass, each batched as its twin there
        # (x itself, where that keeps a placeholder): torch.func's generated vmap rule records
        # one set of batch dimensions, the last save's, for both (three tensors here failed
        # every backward pass under vmap).
        ctx.save_for_forward(inputs[0], *saved[1:])

    @staticmethod
    def jvp(
        ctx: Any,
        x_t: torch.Tensor | None,
        first_t: torch.Tensor | None,
        second_t: torch.Tensor | None,
        bias_t: torch.Tensor | None,
        _: Any,
    ) -> tuple[torch.Tensor | None, None]:
        """Forward-mode derivative: the product is linear in each of ``x``, ``F`` and ``S``."""
        x, first, second, _ = ctx.saved_tensors
        layout: TwoBlockLayout = ctx.layout._replace(keep=False)
        terms = []
        if x_t is not None:
            terms.append(two_block_forward(x_t, first, second, None, layout)[0])
        if first_t is not None:
            terms.append(two_block_forward(x, first_t, second, None, layout)[0])
        if second_t is not None:
            terms.append(two_block_forward(x, first, second_t, None, layout)[0])
        if bias_t is not None:
            terms.append(bias_t.expand(x.shape[0], -1))
        if not terms:
            return None, None
        return sum(terms[1:], terms[0]), None


def _buffered_backward(layout: TwoBlockLayout, x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a chunked backward may write into buffers (``_backward_into`` and its twin).

    Only where it is not itself differentiated, its dtype accumulates in itself, and the
    tensors are plain (``plain_tensors``).
    """
    return (
        layout.chunks > 1
        and not torch.is_grad_enabled()  # else the backward is itself differentiated
        and _accumulation(x.dtype) == x.dtype
        and plain_tensors(x, *tensors)
    )


_Gradients = tuple["torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


def _backward_by_chunks(
    xs_all: torch.Tensor,
    g_all: torch.Tensor,
    chunks: int,
    step: Callable[[torch.Tensor, torch.Tensor], _Gradients],
) -> _Gradients:
    """The allocating chunked backward: ``step(xs, g)`` per chunk of rows.

    Returns the chunks' input gradients concatenated (``None`` if ``step`` gave none) and
    the two blocks' gradients summed, in the accumulation dtype.
    """
    grad_rows: list[torch.Tensor] = []
    grad_first = grad_second = None
    for xs, g in zip(row_chunks(xs_all, chunks), row_chunks(g_all, chunks), strict=True):
        gx, gf, gs = step(xs, g)
        if gx is not None:
            grad_rows.append(gx)
        grad_first = _accumulate(grad_first, gf)
        grad_second = _accumulate(grad_second, gs)
    if not grad_rows:
        return None, grad_first, grad_second
    rows = grad_rows[0] if len(grad_rows) == 1 else torch.cat(grad_rows)
    return rows, grad_first, grad_second


def _backward_into(
    xs_all: torch.Tensor,
    g_all: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    chunks: int,
    from_z: bool,
    need_x: bool,
    need_first: bool,
    need_second: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The chunked backward with buffers, as :func:`_forward_into` (same dtype throughout).

    ``xs_all`` ``(B, M_s, M_f)`` and ``g_all`` ``(B, N_s, N_f)``; returns the input gradient
    as ``(B M_s, M_f)`` rows, written chunk by chunk into one tensor, and the gradients of
    ``F`` and ``S``, accumulated in place; ``dS`` from ``Q``, or with ``from_z`` from each
    chunk's ``Z`` recomputed.
    """
    batch, ms, mf = xs_all.shape
    _, r, nf = first.shape
    ns = second.shape[2]
    first2 = first.reshape(mf, r * nf)
    first_b = first.reshape(1, mf * r, nf)
    s_b = second.reshape(ms * r, ns).unsqueeze(0)
    x_pieces, g_pieces = xs_all.tensor_split(chunks), g_all.tensor_split(chunks)
    largest = x_pieces[0].shape[0]
    by_q = need_second and not from_z
    by_z = need_second and from_z
    xt_buffer = xs_all.new_empty(largest * ms * mf) if by_q else None
    # A chunk's Z, then its dZ: the one is done with before the other is made.
    zt_buffer = xs_all.new_empty(largest * ms * r * nf) if by_z else None
    g_laid_out = g_all.transpose(1, 2).is_contiguous()  # as (N_f, N_s) rows already
    gt_buffer = xs_all.new_empty(0 if g_laid_out else largest * nf * ns) if by_z else None
    # Likewise Q is summed into dS before dZ is made: one buffer holds both in turn, which
    # keeps the step within nn.Linear's memory (1024 x 1024 at rank 8, batch 8192: 66.4 MiB
    # over the input and parameters, against nn.Linear's 68.0; two buffers took 68.4).
    need_gz = need_x or need_first or by_z
    q_size = largest * mf * r * ns if by_q else 0
    gz_buffer = xs_all.new_empty(max(largest * ms * r * nf, q_size)) if need_gz else None
    q_buffer = (gz_buffer if gz_buffer is not None else xs_all.new_empty(q_size)) if by_q else None
    grad_x = xs_all.new_empty(batch * ms, mf) if need_x else None
    grad_first = first.new_zeros(mf, r * nf) if need_first else None
    grad_second = second.new_zeros(ms, r * ns) if need_second else None
    start = 0
    for xs, g in zip(x_pieces, g_pieces, strict=True):
        bc = xs.shape[0]
        if (
            grad_second is not None
            and zt_buffer is not None
            and gt_buffer is not None
            and gz_buffer is not None
        ):
            z = gz_buffer[: bc * ms * r * nf].view(bc * ms, r * nf)
            torch.mm(xs.reshape(bc * ms, mf), first2, out=z)
            zt = zt_buffer[: bc * ms * r * nf].view(ms * r, bc, nf)
            zt.copy_(z.view(bc, ms * r, nf).transpose(0, 1))
            gt = g.transpose(1, 2)
            if not gt.is_contiguous():
                gt = gt_buffer[: bc * nf * ns].view(bc, nf, ns).copy_(gt)
            grad_second.view(ms * r, ns).addmm_(zt.view(ms * r, bc * nf), gt.view(bc * nf, ns))
        if q_buffer is not None and xt_buffer is not None and grad_second is not None:
            q = q_buffer[: bc * mf * r * ns].view(bc, mf * r, ns)
            torch.bmm(first_b.expand(bc, mf * r, nf), g.transpose(1, 2), out=q)
            xt = xt_buffer[: bc * ms * mf].view(ms, bc, mf)
            xt.copy_(xs.transpose(0, 1))
            grad_second.addmm_(xt.view(ms, bc * mf), q.view(bc * mf, r * ns))
        if gz_buffer is not None and (grad_x is not None or grad_first is not None):
            gz = gz_buffer[: bc * ms * r * nf].view(bc, ms * r, nf)
            torch.bmm(s_b.expand(bc, ms * r, ns), g, out=gz)
            gz2 = gz.view(bc * ms, r * nf)
            if grad_x is not None:
                torch.mm(gz2, first2.t(), out=grad_x[start * ms : (start + bc) * ms])
            if grad_first is not None:
                grad_first.addmm_(xs.reshape(bc * ms, mf).t(), gz2)
        start += bc
    return (
        grad_x,
        None if grad_first is None else grad_first.view(mf, r, nf),
        None if grad_second is None else grad_second.view(ms, r, ns),
    )


def _backward_chunk(
    xs: torch.Tensor,
    g: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    z: torch.Tensor | None,
    from_z: bool,
    need_x: bool,
    need_first: bool,
    need_second: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for one chunk of rows: ``xs`` ``(Bc, Ms, Mf)``, ``g`` ``(Bc, Ns, Nf)``.

    ``z``: the kept intermediate, or ``None``; ``from_z``: form ``dS`` from ``Z`` (``z``, or
    recomputed), see :class:`TwoBlockLayout`.
    """
    batch, ms, mf = xs.shape
    _, r, nf = first.shape
    ns = second.shape[2]
    grad_xs = grad_first = grad_second = None
    if need_second and from_z:
        grad_second = _second_from_z(z if z is not None else _intermediate(xs, first), g)
        grad_second = grad_second.to(_accumulation(grad_second.dtype)).view(ms, r, ns)
    elif need_second and z is not None:
        # sum_b Z[b] g[b]^T from the kept Z, in float32 for low-precision dtypes (one rounding).
        if is_one(batch):  # one product, no sum over rows (which would zero-fill and add)
            per_one = torch.mm(z[0], g[0].t())
            grad_second = per_one.to(_accumulation(per_one.dtype)).view(ms, r, ns)
        else:
            per_row = torch.bmm(z, g.transpose(1, 2))  # (Bc, Ms r, Ns)
            grad_second = per_row.sum(0, dtype=_accumulation(per_row.dtype)).view(ms, r, ns)
    elif need_second:
        # Without Z: Q[b] = F g[b]^T, then one product that sums over the rows and M_f at once
        # (no recomputed Z, no per-row products to sum; the product rounds once).
        first_b = first.reshape(1, mf * r, nf).expand(batch, mf * r, nf)
        q = torch.bmm(first_b, g.transpose(1, 2)).reshape(batch * mf, r * ns)
        xt = xs.transpose(0, 1).reshape(ms, batch * mf)
        grad_second = torch.mm(xt, q).to(_accumulation(q.dtype)).view(ms, r, ns)
    if need_x or need_first:
        s2 = second.reshape(ms * r, ns)
        if is_one(batch):
            gz = torch.mm(s2, g[0]).view(ms, r * nf)
        else:
            gz = torch.bmm(s2.unsqueeze(0).expand(batch, ms * r, ns), g).reshape(batch * ms, r * nf)
        if need_x:
            grad_xs = torch.mm(gz, first.reshape(mf, r * nf).t())  # (Bc Ms, Mf)
        if need_first:
            grad_first = torch.mm(xs.reshape(batch * ms, mf).t(), gz).view(mf, r, nf)
    return grad_xs, grad_first, grad_second


def _second_from_z(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_b Z[b] g[b]^T``, ``(M_s r, N_s)``, as one product over ``Bc N_f``.

    ``z`` ``(Bc, M_s r, N_f)`` and ``g`` ``(Bc, N_s, N_f)``, both transposed (copies, unless
    laid out so already).
    """
    batch, msr, nf = z.shape
    ns = g.shape[1]
    zt = z.transpose(0, 1).reshape(msr, batch * nf)
    return torch.mm(zt, g.transpose(1, 2).reshape(batch * nf, ns))


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    # Sums over chunks and rows of low-precision products run in float32: one rounding.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _accumulate(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    if part is None:
        return total
    if total is None:
        return part.to(_accumulation(part.dtype))
    return total.add_(part)


# --- the left block first, batched over the rows in their own layout ---------------------------


def _batched_z(xs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``Z[b] = A^T x[b]``: ``(Bc, N_1 r, M_2)`` from rows ``(Bc, M_1, M_2)`` and ``A``."""
    batch, m1, _ = xs.shape
    if is_one(batch):
        return torch.mm(a.t(), xs[0]).unsqueeze(0)
    return torch.bmm(a.t().unsqueeze(0).expand(batch, a.shape[1], m1), xs)


def _batched_forward(
    x: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    bias: torch.Tensor | None,
    layout: TwoBlockLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`two_block_forward` for a ``batched`` layout: ``y`` and the kept ``Z`` (or empty)."""
    m1, m2, n1, n2 = layout.m1, layout.m2, layout.n1, layout.n2
    batch = x.shape[0]
    xs = x.reshape(batch, m1, m2)
    bias2 = None if bias is None else bias.reshape(n1, n2)
    if layout.chunks > 1 and plain_tensors(x, a, s, bias):
        # Into one output, with one buffer for every chunk's Z (see _forward_into).
        out = x.new_empty(batch * n1, n2)
        pieces = xs.tensor_split(layout.chunks)
        z_buffer = x.new_empty(pieces[0].shape[0] * a.shape[1] * m2)
        a_t = a.t().unsqueeze(0)
        start = 0
        for rows in pieces:
            bc = rows.shape[0]
            z = z_buffer[: bc * a.shape[1] * m2].view(bc, a.shape[1], m2)
            torch.bmm(a_t.expand(bc, a.shape[1], m1), rows, out=z)
            target = out[start * n1 : (start + bc) * n1]
            z2 = z.view(bc * n1, s.shape[0])
            if bias2 is None:
                torch.mm(z2, s, out=target)
            elif _accumulation(x.dtype) != x.dtype:  # one rounding, as in F.linear
                torch.addmm(bias2.repeat(bc, 1), z2, s, out=target)
            else:  # while the chunk's rows are in the cache
                torch.mm(z2, s, out=target).view(bc, n1, n2).add_(bias2)
            start += bc
        return out.view(batch, n1 * n2), x.new_empty(0)
    results = [_batched_forward_chunk(rows, a, s, bias2) for rows in row_chunks(xs, layout.chunks)]
    y = results[0][0] if len(results) == 1 else torch.cat([result[0] for result in results])
    keep = layout.keep and layout.chunks == 1
    return y.reshape(batch, n1 * n2), results[0][1] if keep else x.new_empty(0)


def _batched_forward_chunk(
    xs: torch.Tensor, a: torch.Tensor, s: torch.Tensor, bias2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = Z S (+ bias)`` for rows ``(Bc, M_1, M_2)``: ``(Bc N_1, N_2)``, and ``Z``."""
    batch = xs.shape[0]
    z = _batched_z(xs, a)  # (Bc, N1 r, M2)
    rm2, n2 = s.shape
    z2 = z.view(-1, rm2)  # (Bc N1, r M2)
    if bias2 is None:
        return torch.mm(z2, s), z
    if is_one(batch):  # the bias enters the product (beta = 1)
        return torch.addmm(bias2, z2, s), z
    if _accumulation(xs.dtype) != xs.dtype:  # one rounding, as in F.linear
        return torch.addmm(bias2.repeat(batch, 1), z2, s), z
    n1 = bias2.shape[0]
    return (torch.mm(z2, s).view(batch, n1, n2) + bias2).view(-1, n2), z


def _batched_backward(
    x: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    z_kept: torch.Tensor | None,
    grad_y: torch.Tensor,
    layout: TwoBlockLayout,
    need_x: bool,
    need_first: bool,
    need_second: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x``, ``A`` and ``S`` for a ``batched`` layout."""
    m1, m2, n1, n2 = layout.m1, layout.m2, layout.n1, layout.n2
    batch = x.shape[0]
    xs_all = x.reshape(batch, m1, m2)
    g_all = grad_y.reshape(batch, n1, n2)
    needs = need_x, need_first, need_second
    if _buffered_backward(layout, x, a, s, grad_y):
        grad_xs, grad_a, grad_s = _batched_backward_into(xs_all, g_all, a, s, layout.chunks, *needs)
    else:
        grad_xs, grad_a, grad_s = _backward_by_chunks(
            xs_all,
            g_all,
            layout.chunks,
            lambda xs, g: _batched_backward_chunk(xs, g, a, s, z_kept, *needs),
        )
    return (
        None if grad_xs is None else grad_xs.reshape(x.shape),
        None if grad_a is None else grad_a.to(a.dtype),
        None if grad_s is None else grad_s.to(s.dtype),
    )


def _batched_backward_chunk(
    xs: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    need_x: bool,
    need_first: bool,
    need_second: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for one chunk: rows ``xs`` ``(Bc, M_1, M_2)``, ``g`` ``(Bc, N_1, N_2)``.

    ``z``: the kept ``Z``, or ``None`` (recomputed). The input gradient as ``(Bc, M_1, M_2)``.
    """
    batch, m1, m2 = xs.shape
    rm2, n2 = s.shape
    n1r = a.shape[1]
    g2 = g.reshape(-1, n2)  # (Bc N1, N2)
    grad_xs = grad_a = grad_s = None
    if need_second:
        zz = z if z is not None else _batched_z(xs, a)
        grad_s = torch.mm(zz.reshape(-1, rm2).t(), g2)
        grad_s = grad_s.to(_accumulation(grad_s.dtype))
    if need_x or need_first:
        dz = torch.mm(g2, s.t()).view(batch, n1r, m2)
        if need_x:
            if is_one(batch):
                grad_xs = torch.mm(a, dz[0]).unsqueeze(0)
            else:
                grad_xs = torch.bmm(a.unsqueeze(0).expand(batch, m1, n1r), dz)
        if need_first:
            if is_one(batch):
                one = torch.mm(xs[0], dz[0].t())
                grad_a = one.to(_accumulation(one.dtype))
            else:
                # Per row, then summed in the accumulation dtype (one rounding per row).
                per_row = torch.bmm(xs, dz.transpose(1, 2))  # (Bc, M1, N1 r)
                grad_a = per_row.sum(0, dtype=_accumulation(per_row.dtype))
    return grad_xs, grad_a, grad_s


def _batched_backward_into(
    xs_all: torch.Tensor,
    g_all: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    chunks: int,
    need_x: bool,
    need_first: bool,
    need_second: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The chunked backward of a ``batched`` layout with buffers, as :func:`_backward_into`."""
    batch, m1, m2 = xs_all.shape
    rm2, n2 = s.shape
    n1r = a.shape[1]
    n1 = g_all.shape[1]
    a_t, a_b = a.t().unsqueeze(0), a.unsqueeze(0)
    x_pieces, g_pieces = xs_all.tensor_split(chunks), g_all.tensor_split(chunks)
    largest = x_pieces[0].shape[0]
    # A chunk's Z, then its dZ: the one is done with before the other is made.
    z_buffer = xs_all.new_empty(largest * n1r * m2)
    per_row_buffer = xs_all.new_empty(largest * m1 * n1r) if need_first else None
    grad_x = xs_all.new_empty(batch, m1, m2) if need_x else None
    grad_a = a.new_zeros(m1, n1r) if need_first else None
    grad_s = s.new_zeros(rm2, n2) if need_second else None
    start = 0
    for xs, g in zip(x_pieces, g_pieces, strict=True):
        bc = xs.shape[0]
        g2 = g.reshape(bc * n1, n2)
        z = z_buffer[: bc * n1r * m2].view(bc, n1r, m2)
        if grad_s is not None:
            torch.bmm(a_t.expand(bc, n1r, m1), xs, out=z)
            grad_s.addmm_(z.view(bc * n1, rm2).t(), g2)
        if grad_x is not None or grad_a is not None:
            torch.mm(g2, s.t(), out=z.view(bc * n1, rm2))  # dZ
            if grad_x is not None:
                torch.bmm(a_b.expand(bc, m1, n1r), z, out=grad_x[start : start + bc])
            if grad_a is not None and per_row_buffer is not None:
                per_row = per_row_buffer[: bc * m1 * n1r].view(bc, m1, n1r)
                torch.bmm(xs, z.transpose(1, 2), out=per_row)
                grad_a.add_(per_row.sum(0))
        start += bc
    return grad_x, grad_a, grad_s
