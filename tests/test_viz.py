"""paradec.viz: the text grid and the figure of a layout."""

import matplotlib.image as mpimg

from paradec.layout import Branch, BranchSample, build_layout
from paradec.masks import columnar_mask
from paradec.viz import design_example, layout_table, main, plot_layout

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_layout_of_the_design_example(tmp_path):
    layout, names = design_example("right")
    assert [names(t) for t in layout.input_ids[0].tolist()] == [
        "b0", "b1", "b2", "p10", "p11", "p20", "t10", "t20", "t11", "t21", "t22"]
    path = plot_layout(layout, 0, tmp_path / "layout.png", token_text=names)
    assert path.read_bytes()[:8] == PNG
    assert mpimg.imread(path).shape[0] > 400


def test_plot_layout_of_a_padded_row_with_a_long_background(tmp_path):
    samples = [BranchSample(list(range(1, 4)), [Branch([5], [6])]),
               BranchSample(list(range(1, 41)), [Branch([50, 51], [52, 53, 54]),
                                                 Branch([60], [61]), Branch([], [70, 71])])]
    layout = build_layout(samples, align_to="left", interleave=False)
    layout.isolate_branches = True
    for row in (0, 1):
        path = plot_layout(layout, row, tmp_path / f"row{row}.png")
        assert path.read_bytes()[:8] == PNG
    # plot_layout draws paradec.masks.columnar_mask; check the rule it shows on this row.
    mask = columnar_mask(layout.column, layout.valid, layout.branch, True)[1, 0]
    assert not mask[layout.branch[1] == 2][:, layout.branch[1] == 1].any()


def test_layout_table_of_the_design_example():
    """The grid of DESIGN section 1: right-aligned prompts end at column C-1 = 4, targets from 5."""
    layout, names = design_example("right")

    class Names:
        def decode(self, ids):
            return names(ids[0])

    lines = layout_table(layout, Names(), width=4).splitlines()
    assert lines[0].split("|")[1].split() == [str(c) for c in range(8)]
    assert lines[1].split("|")[1].split() == ["b0", "b1", "b2"]
    assert lines[2].split("|")[1].split() == ["p10", "p11", "t10", "t11"]
    assert lines[3].split("|")[1].split() == ["p20", "t20", "t21", "t22"]


def test_cli_draws_the_design_example(tmp_path, capsys):
    assert main([str(tmp_path / "demo.png"), "--align", "left"]) == 0
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG
    assert "wrote" in capsys.readouterr().out
