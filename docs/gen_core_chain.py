"""Draw the TT-matrix core chain of docs/tt-format.md as a small, dependency-free SVG.

Run ``python docs/gen_core_chain.py`` to rewrite ``docs/img/core-chain.svg``;
``tests/test_docs.py`` checks that the committed file is what this script draws.

The picture is the tensor-network diagram of a 4-core TT matrix: one box per core ``G_k``,
an edge between neighbours for each bond rank ``r_k``, a leg up for the output index ``i_k``
(size ``n_k``) and a leg down for the input index ``j_k`` (size ``m_k``). The outer bonds
``r_0 = r_4 = 1`` are dashed: they carry no index. Subscripts are Unicode characters, so
the file renders the same in every viewer.
"""

from __future__ import annotations

from pathlib import Path

D = 4
WIDTH, HEIGHT = 760, 270
X0, DX, Y = 145, 157, 130  # centre of core 1, spacing between cores, centre line
BOX = 58  # side of a core's box
LEG = 46  # length of a mode leg
INK, MUTED, FILL, ACCENT = "#1f2937", "#6b7280", "#e0e7ff", "#3f51b5"
SUB = str.maketrans("0123456789k-", "₀₁₂₃₄₅₆₇₈₉ₖ₋")


def _sub(text: str) -> str:
    return text.translate(SUB)


def _text(x: float, y: float, body: str, size: int, color: str, italic: bool = True) -> str:
    style = ' font-style="italic"' if italic else ""
    return (
        f'<text x="{x:g}" y="{y:g}" font-size="{size}" fill="{color}" '
        f'text-anchor="middle"{style}>{body}</text>'
    )


def _line(x1: float, y1: float, x2: float, y2: float, color: str, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="6 5"' if dashed else ""
    return (
        f'<line x1="{x1:g}" y1="{y1:g}" x2="{x2:g}" y2="{y2:g}" stroke="{color}" '
        f'stroke-width="2.5"{dash}/>'
    )


def draw() -> str:
    """The SVG document as a string; deterministic."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" font-family="Helvetica, Arial, sans-serif" '
        'role="img" aria-label="A TT matrix as a chain of four cores">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
    ]
    centres = [X0 + k * DX for k in range(D)]
    half = BOX / 2
    left, right = centres[0] - half - 70, centres[-1] + half + 70
    bonds = [(left, centres[0] - half, 0)]
    bonds += [(centres[k] + half, centres[k + 1] - half, k + 1) for k in range(D - 1)]
    bonds += [(centres[-1] + half, right, D)]
    for x1, x2, k in bonds:
        outer = k in (0, D)
        color = MUTED if outer else INK
        parts.append(_line(x1, Y, x2, Y, color, dashed=outer))
        label = "r" + _sub(str(k)) + (" = 1" if outer else "")
        parts.append(_text((x1 + x2) / 2, Y - 10, label, 16, color))
    for k, x in enumerate(centres, start=1):
        top, bottom = Y - half - LEG, Y + half + LEG
        parts.append(_line(x, Y - half, x, top, ACCENT))
        parts.append(_line(x, Y + half, x, bottom, ACCENT))
        parts.append(_text(x, top - 8, f"i{_sub(str(k))} &lt; n{_sub(str(k))}", 16, ACCENT))
        parts.append(_text(x, bottom + 20, f"j{_sub(str(k))} &lt; m{_sub(str(k))}", 16, ACCENT))
        parts.append(
            f'<rect x="{x - half:g}" y="{Y - half:g}" width="{BOX}" height="{BOX}" rx="9" '
            f'fill="{FILL}" stroke="{INK}" stroke-width="2"/>'
        )
        parts.append(_text(x, Y + 7, "G" + _sub(str(k)), 20, INK))
    parts.append(
        _text(
            WIDTH / 2,
            HEIGHT - 12,
            f"core G{_sub('k')} has shape (r{_sub('k-1')}, m{_sub('k')}, n{_sub('k')}, "
            f"r{_sub('k')}); legs up: output index i, legs down: input index j",
            14,
            MUTED,
            italic=False,
        )
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("img") / "core-chain.svg"
    target.write_text(draw(), encoding="utf-8")
    print(f"wrote {target}")
