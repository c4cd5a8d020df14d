"""Pictures of a layout: the text grid (columns x branches) and a figure with its attention mask.

    python -m paradec.viz layout.png [--align left] [--branch-major]   # DESIGN section 1's example

Invariant: a picture shows only what :func:`paradec.layout.build_layout` laid out and what
:func:`paradec.masks.columnar_mask` allows for it, so it cannot disagree with training or
decoding. The figure uses matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .layout import IGNORE_INDEX, Layout  # noqa: E402
from .masks import columnar_mask  # noqa: E402


def _cell(tokenizer, token_id: int, width: int) -> str:
    text = tokenizer.decode([token_id]).replace("\n", "⏎")
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


def layout_table(layout: Layout, tokenizer, row: int = 0, width: int = 7,
                 max_background: int = 6) -> str:
    """The columns x branches grid of one sample; a long background is shown by its last
    ``max_background`` columns (the rest is summarised in the first line)."""
    column, branch, ids = layout.column[row], layout.branch[row], layout.input_ids[row]
    real = layout.valid[row]
    first_shown = 0
    bg_cols = column[real & (branch == 0)]
    lines = []
    if len(bg_cols) > max_background:
        first_shown = int(bg_cols.max()) - max_background + 1
        lines.append(f"background: columns {int(bg_cols.min())}..{int(bg_cols.max())} "
                     f"({len(bg_cols)} tokens), last {max_background} shown")
    last = int(column[real].max())
    cols = list(range(first_shown, last + 1))
    lines.append("column  | " + " ".join(str(c).ljust(width) for c in cols))
    n_branches = int(layout.num_branches[row])
    for k in range(n_branches + 1):
        cells = {int(c): int(t) for c, t, b, ok in zip(column, ids, branch, real)
                 if ok and int(b) == k}
        name = "bg (0)" if k == 0 else f"br {k}"
        lines.append(f"{name:<7} | " + " ".join(
            _cell(tokenizer, cells[c], width) if c in cells else " " * width for c in cols))
    return "\n".join(lines)



ROLE_COLORS = {"background": "#c9d6e8", "prompt": "#f6d29b", "target": "#b9e0b0"}


def _branch_color(k: int):
    return "#7f8c9d" if k == 0 else plt.get_cmap("tab10")((k - 1) % 10)


def _short(text: str, limit: int) -> str:
    text = text.replace("\n", "⏎").replace("\t", "⇥")
    if text.strip() == "":
        text = text.replace(" ", "␣") or "∅"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_layout(layout: Layout, row: int, path, token_text: Callable[[int], str] | None = None,
                title: str | None = None, max_background: int | None = 12):
    """Draw sample ``row`` of ``layout``: its tokens on the column x branch grid, and its mask.

    Top: one cell per real token at (column, branch), coloured by role (background, prompt,
    target), showing ``token_text(id)`` (or the id) and its linear index ``#i``; a thick edge
    marks a token that carries a label; a dashed line marks the column where targets start.
    Bottom: :func:`paradec.masks.columnar_mask` of the row (query = row, key = column, in linear
    order); a cell is filled with the key's branch colour when the query may attend it.
    A background longer than ``max_background`` tokens is shown by its last ones (every branch
    token attends the hidden ones too; None shows everything). Returns the path written.
    """
    path = Path(path)
    n = int(layout.valid[row].sum())
    column = layout.column[row][:n].tolist()
    branch = layout.branch[row][:n].tolist()
    ids = layout.input_ids[row][:n].tolist()
    target = layout.is_target[row][:n].tolist()
    labelled = (layout.labels[row][:n] != IGNORE_INDEX).tolist()
    full_mask = columnar_mask(layout.column[row:row + 1], layout.valid[row:row + 1],
                              layout.branch[row:row + 1], layout.isolate_branches)[0, 0, :n, :n]
    text_of = token_text or str
    n_branches = max(branch) + 1
    n_bg = sum(1 for b in branch if b == 0)
    hidden = n_bg - max_background if max_background is not None and n_bg > max_background else 0
    keep = [i for i in range(n) if branch[i] != 0 or i >= hidden]  # background is stored first
    first_col = min(column[i] for i in keep)
    offset = first_col - (1 if hidden else 0)  # one spare cell says what is hidden
    start = int(layout.target_start[row])  # column C: every target starts here
    n_cols = max(max(column), start) + 1 - offset

    cell = min(0.62, max(0.3, 24.0 / n_cols))  # inches per column
    grid_h = n_branches * 0.55 + 1.0
    m = len(keep)
    mask_side = min(10.0, max(4.5, m * 0.17))
    fig_w = max(n_cols * cell + 2.5, mask_side + 2.5, 7.0)
    fig = plt.figure(figsize=(fig_w, grid_h + mask_side + 1.2))
    gs = fig.add_gridspec(2, 1, height_ratios=[grid_h, mask_side + 0.6], hspace=0.25)

    # -- the grid ------------------------------------------------------------------------------
    ax = fig.add_subplot(gs[0])
    font = max(5.0, min(9.0, cell * 14))
    limit = max(3, int(cell * 11))
    if hidden:
        ax.add_patch(Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="#888888",
                               linewidth=0.5, hatch="//"))
        ax.text(0.5, 0.5, f"+{hidden}", ha="center", va="center", fontsize=font)
    for i in keep:
        x, k = column[i] - offset, branch[i]
        role = "background" if k == 0 else ("target" if target[i] else "prompt")
        ax.add_patch(Rectangle((x, k), 1, 1, facecolor=ROLE_COLORS[role],
                               edgecolor="black" if labelled[i] else "#888888",
                               linewidth=1.6 if labelled[i] else 0.5))
        ax.text(x + 0.5, k + 0.42, _short(text_of(ids[i]), limit), ha="center", va="center",
                fontsize=font)
        ax.text(x + 0.5, k + 0.85, f"#{i}", ha="center", va="center", fontsize=font * 0.7,
                color="#555555")
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_branches, 0)
    step = 1 if n_cols <= 40 else 5
    cols = [c for c in range(first_col, n_cols + offset) if (c - first_col) % step == 0]
    ax.set_xticks([c - offset + 0.5 for c in cols])
    ax.set_xticklabels([str(c) for c in cols], fontsize=7)
    ax.set_yticks([k + 0.5 for k in range(n_branches)])
    ax.set_yticklabels(["bg (0)"] + [f"br {k}" for k in range(1, n_branches)], fontsize=8)
    for k, lbl in enumerate(ax.get_yticklabels()):
        lbl.set_color(_branch_color(k))
    ax.set_xlabel("column (time step)" + (f"; the first {hidden} background tokens are hidden"
                                          if hidden else ""))
    ax.axvline(start - offset, color="#2b7a2b", linewidth=1.2, linestyle="--")
    handles = [Patch(facecolor=ROLE_COLORS[r], edgecolor="#888888", label=r)
               for r in ("background", "prompt", "target")]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.6,
                         label="has a label (trained)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              frameon=False)
    ax.set_title(title or (f"sample {row}: {n} tokens, {n_branches - 1} branches; targets "
                           f"start at column {start} (dashed)"), fontsize=10)

    # -- the mask ------------------------------------------------------------------------------
    mx = fig.add_subplot(gs[1])
    mask = full_mask[keep][:, keep]
    image = torch.ones(m, m, 3)
    for j, i in enumerate(keep):
        image[mask[:, j], j] = torch.tensor(matplotlib.colors.to_rgb(_branch_color(branch[i])))
    mx.imshow(image.numpy(), interpolation="nearest", aspect="equal")
    b = [branch[i] for i in keep]
    c = [column[i] for i in keep]
    interleaved = layout_is_interleaved(b)
    edges = [j - 0.5 for j in range(1, m)  # background | column groups (or branches)
             if (b[j] == 0) != (b[j - 1] == 0) or (b[j] > 0 and (
                 c[j] != c[j - 1] if interleaved else b[j] != b[j - 1]))]
    for e in edges:
        mx.axhline(e, color="#bbbbbb", linewidth=0.5)
        mx.axvline(e, color="#bbbbbb", linewidth=0.5)
    every = 1 if m <= 60 else math.ceil(m / 60)
    ticks = list(range(0, m, every))
    names = [f"{keep[j]}: b{b[j]} c{c[j]}" for j in ticks]
    tick_font = 6 if m <= 40 else 5
    mx.set_xticks(ticks)
    mx.set_xticklabels(names, rotation=90, fontsize=tick_font)
    mx.set_yticks(ticks)
    mx.set_yticklabels(names, fontsize=tick_font)
    for axis in (mx.get_xticklabels(), mx.get_yticklabels()):
        for lbl, j in zip(axis, ticks):
            lbl.set_color(_branch_color(b[j]))
    mx.set_xlabel("key (linear index: branch b, column c)")
    mx.set_ylabel("query")
    rule = "isolate_branches" if layout.isolate_branches else "columnar causal"
    mx.set_title(f"attention mask ({rule}): filled = the query may attend the key (key's "
                 "branch colour)" + (f"\nthe first {hidden} background tokens are not shown"
                                     if hidden else ""), fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def layout_is_interleaved(branch: Sequence[int]) -> bool:
    """True when branch tokens are stored column by column (branches alternate)."""
    seq = [b for b in branch if b > 0]
    changes = sum(1 for a, b in zip(seq, seq[1:]) if a != b)
    return changes > len(set(seq)) - 1


def design_example(align_to: str = "right", interleave: bool = True):
    """DESIGN section 1's worked example (background 3, prompts 2 and 1, targets 2 and 3) and a
    ``token_text`` that names its tokens b0.., p10.., t10..."""
    from .layout import Branch, BranchSample, build_layout

    names = ["b0", "b1", "b2", "p10", "p11", "t10", "t11", "p20", "t20", "t21", "t22"]
    ids = {name: i + 1 for i, name in enumerate(names)}
    sample = BranchSample(
        background=[ids["b0"], ids["b1"], ids["b2"]],
        branches=[Branch([ids["p10"], ids["p11"]], [ids["t10"], ids["t11"]]),
                  Branch([ids["p20"]], [ids["t20"], ids["t21"], ids["t22"]])])
    layout = build_layout([sample], align_to=align_to, interleave=interleave)
    by_id = {i: name for name, i in ids.items()}
    return layout, lambda t: by_id.get(int(t), str(t))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paradec.viz",
                                     description="Draw DESIGN section 1's worked example: its "
                                                 "column x branch grid and its attention mask.")
    parser.add_argument("png", help="the file to write")
    parser.add_argument("--align", choices=("left", "right"), default="right",
                        help="alignment of the worked example (default: right, as in DESIGN)")
    parser.add_argument("--branch-major", action="store_true",
                        help="store the worked example branch by branch (interleave=false)")
    args = parser.parse_args(argv)
    layout, names = design_example(args.align, interleave=not args.branch_major)
    out = plot_layout(layout, 0, args.png, token_text=names,
                      title=f"DESIGN worked example, align_to={args.align}, "
                            f"{'branch-major' if args.branch_major else 'interleaved'} order")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
