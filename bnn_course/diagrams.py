"""Diagrams of the book drawn by code, from the objects they show.

Each function builds a matplotlib figure from a model, a configuration or a computation of
the package, so a picture in the book cannot drift from the code it explains. The figures
are at most :data:`bnn_course.notebook.BOOK_FIGURE_WIDTH_INCHES` wide, with text of at least
10 pt.
"""

from __future__ import annotations

from typing import Any


def bayesian_cnn_diagram(model: Any, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> Any:
    """Draw the layers of a BayesianCNN, the shape after each step, and where it samples.

    The drawing is made from ``model`` itself: its deterministic twin
    (:func:`bnn_course.inspection.deterministic_twin`, the same layers in order, with pools,
    flatten and activations as modules) is run on zeros of ``input_shape`` and every step's
    output shape is recorded, so the shapes shown are the ones the code computes. Each
    convolution or dense step is matched, in order, with the model's Bayesian layer
    (``model.bayesian_layers()``); those boxes are drawn as *sampling* steps with their
    number of random variables (weights and biases, each a Gaussian with learned
    :math:`\\mu` and :math:`\\log\\sigma`).

    Parameters
    ----------
    model:
        A :class:`~bnn_course.models.BayesianCNN` (anything with ``convs``, ``hidden``,
        ``classifier`` and ``bayesian_layers()`` that ``deterministic_twin`` accepts).
    input_shape:
        ``(B, C, H, W)`` of the batch traced; ``B`` is shown as "B" in the shapes.

    Returns
    -------
    matplotlib.figure.Figure
        One box per step, input at the top, at most 7 inches wide.

    Raises
    ------
    ValueError
        If ``input_shape`` is not 4-dimensional, or the twin's convolution and dense steps
        do not match the model's Bayesian layers one to one.
    """
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.patches import FancyBboxPatch
    from torch import nn

    from bnn_course.inspection import deterministic_twin

    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (B, C, H, W), got {tuple(input_shape)}")
    bayesian = list(model.bayesian_layers())
    twin = deterministic_twin(model)

    def shape_text(shape: tuple[int, ...]) -> str:
        return "(" + ", ".join(["B", *(str(s) for s in shape[1:])]) + ")"

    # One step per module of the twin; an activation is folded into the step before it.
    steps: list[dict[str, Any]] = [{"label": "input image batch", "shape": input_shape,
                                    "kind": "data", "detail": ""}]
    parameter = next(twin.parameters())
    x = torch.zeros(input_shape, device=parameter.device, dtype=parameter.dtype)
    layer_index = 0
    with torch.no_grad():
        for module in twin:
            x = module(x)
            shape = tuple(x.shape)
            if isinstance(module, nn.ReLU) and steps[-1]["kind"] == "sample":
                steps[-1]["label"] += ", ReLU"
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if layer_index >= len(bayesian):
                    raise ValueError("the twin has more conv/dense steps than the model has "
                                     "Bayesian layers")
                name, layer = bayesian[layer_index]
                layer_index += 1
                random_vars = layer.weight_mu.numel() + (
                    layer.bias_mu.numel() if layer.bias_mu is not None else 0)
                if isinstance(module, nn.Conv2d):
                    kh, kw = module.kernel_size
                    label = (f"{name}: Flipout conv {kh}x{kw}, "
                             f"{module.in_channels}\u2192{module.out_channels}")
                else:
                    label = (f"{name}: Flipout dense, "
                             f"{module.in_features}\u2192{module.out_features}")
                steps.append({"label": label, "shape": shape, "kind": "sample",
                              "detail": f"{random_vars:,}"})
            elif isinstance(module, nn.MaxPool2d):
                steps.append({"label": "max pool 2x2", "shape": shape, "kind": "plain",
                              "detail": ""})
            elif isinstance(module, nn.Flatten):
                steps.append({"label": "flatten", "shape": shape, "kind": "plain",
                              "detail": ""})
            elif isinstance(module, nn.LogSoftmax):
                steps.append({"label": "log-softmax: log-probabilities", "shape": shape,
                              "kind": "plain", "detail": ""})
            else:
                steps.append({"label": type(module).__name__, "shape": shape,
                              "kind": "plain", "detail": ""})
    if layer_index != len(bayesian):
        raise ValueError(f"the twin has {layer_index} conv/dense steps, the model "
                         f"{len(bayesian)} Bayesian layers")

    row = 0.42  # inches per step
    box_right, shape_x, count_right = 3.75, 3.9, 6.95
    height = row * len(steps) + 1.55
    fig, ax = plt.subplots(figsize=(7.0, height))
    ax.set_xlim(0, 7.0)
    ax.set_ylim(-(len(steps) - 0.5) * row - 1.0, 0.5 * row + 0.3)
    ax.axis("off")
    colours = {"sample": "#fdd9b5", "plain": "#e8e8e8", "data": "#cfe2f3"}
    for index, step in enumerate(steps):
        y = -index * row
        sampling = step["kind"] == "sample"
        ax.add_patch(FancyBboxPatch((0.05, y - 0.15), box_right - 0.05, 0.30,
                                    boxstyle="round,pad=0.02",
                                    facecolor=colours[step["kind"]],
                                    edgecolor="#c05000" if sampling else "#808080",
                                    lw=1.2 if sampling else 0.8))
        ax.text(0.15, y, step["label"], va="center", ha="left", fontsize=10.5)
        ax.text(shape_x, y, shape_text(step["shape"]), va="center", ha="left",
                fontsize=10.5, family="monospace")
        if step["detail"]:
            ax.text(count_right, y, step["detail"], va="center", ha="right", fontsize=10.5,
                    color="#803000")
        if index:
            ax.annotate("", xy=(0.6, y + 0.15), xytext=(0.6, y + row - 0.15),
                        arrowprops={"arrowstyle": "-|>", "color": "#606060", "lw": 0.8})
    header_y = 0.5 * row + 0.2
    ax.text(shape_x, header_y, "output shape", va="top", ha="left", fontsize=10,
            color="#404040")
    ax.text(count_right, header_y, "random variables", va="top", ha="right", fontsize=10,
            color="#404040")
    legend_y = -(len(steps) - 0.5) * row - 0.15
    ax.add_patch(FancyBboxPatch((0.05, legend_y - 0.28), 0.35, 0.22,
                                boxstyle="round,pad=0.02", facecolor=colours["sample"],
                                edgecolor="#c05000"))
    ax.text(0.5, legend_y - 0.17,
            "samples on every call with sample=True: a fresh \u0394W ~ N(0, \u03c3\u00b2) "
            "per layer,\nshared by the batch, and random \u00b11 signs per example "
            "(Flipout)", va="center", ha="left", fontsize=10)
    ax.add_patch(FancyBboxPatch((0.05, legend_y - 0.78), 0.35, 0.22,
                                boxstyle="round,pad=0.02", facecolor=colours["plain"],
                                edgecolor="#808080"))
    ax.text(0.5, legend_y - 0.67, "deterministic step: no parameters, no sampling",
            va="center", ha="left", fontsize=10)
    fig.tight_layout(pad=0.2)
    return fig


def flipout_perturbation_diagram(
    weight_delta: Any,
    sign_in: Any,
    sign_out: Any,
) -> Any:
    r"""Draw the Flipout perturbation of a dense layer for a few examples (chapter 3).

    One row per example :math:`n`: the shared perturbation :math:`\Delta W`, the example's
    output signs :math:`s_n` (a column) and input signs :math:`r_n` (a row), their rank-one
    sign matrix :math:`s_n r_n^\top`, and the elementwise product
    :math:`\Delta W \circ (s_n r_n^\top)` that the example adds to :math:`\mu`. Colours are
    the values (red positive, blue negative, one scale for :math:`\Delta W` and the
    products), so a reader sees that every example gets the same magnitudes with some
    signs flipped. The products are computed here from the arguments.

    Shapes: ``weight_delta`` (out, in); ``sign_in`` (B, in) and ``sign_out`` (B, out) with
    entries :math:`\pm 1`; B from 1 to 3 examples, out and in at most 8 (a diagram, not a
    data plot). Returns a matplotlib figure 7 inches wide.

    Raises
    ------
    ValueError
        If the shapes do not fit together, are too large to draw, or a sign is not
        :math:`\pm 1`.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    delta = np.asarray(weight_delta, dtype=float)
    r = np.asarray(sign_in, dtype=float)
    s = np.asarray(sign_out, dtype=float)
    if delta.ndim != 2 or r.ndim != 2 or s.ndim != 2:
        raise ValueError("weight_delta must be (out, in), sign_in (B, in), sign_out (B, out)")
    out_features, in_features = delta.shape
    if r.shape[1] != in_features or s.shape[1] != out_features or r.shape[0] != s.shape[0]:
        raise ValueError(f"sign_in {r.shape} and sign_out {s.shape} do not fit "
                         f"weight_delta {delta.shape}")
    if not 1 <= r.shape[0] <= 3 or out_features > 8 or in_features > 8:
        raise ValueError("draw 1 to 3 examples of a layer with at most 8 inputs and outputs")
    if not (np.isin(r, (-1.0, 1.0)).all() and np.isin(s, (-1.0, 1.0)).all()):
        raise ValueError("signs must be +1 or -1")

    scale = float(np.abs(delta).max()) or 1.0
    value_style = {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale}
    sign_style = {"cmap": "PiYG", "vmin": -1.6, "vmax": 1.6}
    gap = 1.2  # columns between the blocks
    x_delta = 0.0
    x_s = x_delta + in_features + gap + 0.6
    x_signs = x_s + 1 + 0.3
    x_product = x_signs + in_features + gap + 0.6
    width_units = x_product + in_features
    row_height = out_features + 3.2
    num_rows = r.shape[0]
    fig_width = 7.0
    unit = fig_width / (width_units + 0.4)
    fig, ax = plt.subplots(figsize=(fig_width, unit * (num_rows * row_height + 0.3) + 0.2))
    ax.set_xlim(-0.2, width_units + 0.2)
    ax.set_ylim(num_rows * row_height, -0.3)
    ax.set_aspect("equal")
    ax.axis("off")

    def matrix(values: Any, left: float, top: float, style: dict, text: bool) -> None:
        rows, cols = values.shape
        ax.imshow(values, extent=(left, left + cols, top + rows, top), **style)
        for edge in range(rows + 1):
            ax.plot([left, left + cols], [top + edge] * 2, color="white", lw=0.8)
        for edge in range(cols + 1):
            ax.plot([left + edge] * 2, [top, top + rows], color="white", lw=0.8)
        if text:
            for (i, j), value in np.ndenumerate(values):
                ax.text(left + j + 0.5, top + i + 0.5, "+" if value > 0 else "\u2212",
                        ha="center", va="center", fontsize=11, color="black")

    for n in range(num_rows):
        top = n * row_height + 2.0
        label_y = top - 1.35
        matrix(delta, x_delta, top, value_style, False)
        ax.text(x_delta + in_features / 2, label_y, r"$\Delta W$ (shared)", ha="center",
                va="center", fontsize=11)
        ax.text(x_delta + in_features + gap / 2 + 0.3, top + out_features / 2, r"$\circ$",
                ha="center", va="center", fontsize=16)
        matrix(s[n][:, None], x_s, top, sign_style, True)
        matrix(r[n][None, :], x_signs, top - 1.2, sign_style, True)
        ax.text(x_s + 0.5, top - 0.6, rf"$s_{n + 1}$", ha="center", va="center",
                fontsize=11)
        ax.text(x_signs + in_features + 0.25, top - 0.7, rf"$r_{n + 1}^\top$", ha="left",
                va="center", fontsize=11)
        matrix(np.outer(s[n], r[n]), x_signs, top, sign_style, True)
        ax.text(x_signs + in_features / 2, top + out_features + 0.6,
                rf"$s_{n + 1} r_{n + 1}^\top$ (example {n + 1})", ha="center", va="center",
                fontsize=11)
        ax.text(x_signs + in_features + gap / 2 + 0.3, top + out_features / 2, "=",
                ha="center", va="center", fontsize=16)
        matrix(delta * np.outer(s[n], r[n]), x_product, top, value_style, False)
        ax.text(x_product + in_features / 2, label_y,
                rf"$\Delta W \circ s_{n + 1} r_{n + 1}^\top$", ha="center", va="center",
                fontsize=11)
    fig.tight_layout(pad=0.2)
    return fig


# --- The map of the chapters (book/intro.md) --------------------------------------------

CHAPTER_MAP_PATH = "book/figures/chapter_map.svg"
"""Where :func:`write_chapter_map` puts the map, relative to the repository root."""

CHAPTER_PREREQUISITES: dict[int, tuple[int, ...]] = {
    2: (1,), 3: (2,), 4: (3,), 5: (4,), 6: (5,), 7: (6,), 8: (6,), 9: (6, 8),
}
"""Which chapters each chapter builds on directly (the arrows of the chapter map)."""

_HELPER_MODULES = frozenset({"config", "notebook", "provenance", "seeding", "diagrams"})


def _repository_root() -> Any:
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def book_chapters(root: Any = None) -> list[dict[str, Any]]:
    """The chapters of the book as ``_toc.yml`` lists them, read from their notebooks.

    For every notebook chapter, in reading order: its part (the ``_toc.yml`` caption), its
    number and title (from the notebook's first heading, ``# Chapter N: Title``) and the
    ``bnn_course`` modules its code imports for the first time in the book (helpers such as
    ``config`` and ``notebook`` left out).

    Parameters
    ----------
    root:
        The repository root (holding ``_toc.yml``); the checkout this package lives in by
        default.

    Returns
    -------
    list of dict
        Keys ``part``, ``number``, ``title``, ``file``, ``new_modules`` (sorted list).

    Raises
    ------
    ValueError
        If a chapter's first heading is not ``# Chapter N: Title``.
    """
    import json
    import re
    from pathlib import Path

    root = _repository_root() if root is None else Path(root)
    # _toc.yml's jb-book format needs no YAML library: "- caption: ..." opens a part,
    # "- file: ..." lists a page of it.
    parts: list[tuple[str, list[str]]] = []
    for raw in (root / "_toc.yml").read_text(encoding="utf-8").splitlines():
        line = raw.split(" #")[0].strip()
        match = re.fullmatch(r"-\s*(caption|file):\s*(.+)", line)
        if match is None:
            continue
        value = match.group(2).strip().strip("\"'")
        if match.group(1) == "caption":
            parts.append((value, []))
        elif parts:
            parts[-1][1].append(value)
    chapters: list[dict[str, Any]] = []
    seen: set[str] = set()
    for caption, files in parts:
        for file in files:
            path = root / (file + ".ipynb")
            if not path.exists():
                continue  # a Markdown page (the references), not a chapter
            notebook = json.loads(path.read_text(encoding="utf-8"))
            heading = "".join(notebook["cells"][0]["source"]).split("\n")[0]
            match = re.fullmatch(r"# Chapter (\d+): (.+)", heading.strip())
            if match is None:
                raise ValueError(f"{path.name}: first heading {heading!r} is not "
                                 "'# Chapter N: Title'")
            code = "\n".join("".join(cell["source"]) for cell in notebook["cells"]
                             if cell["cell_type"] == "code")
            modules = set(re.findall(r"(?:from|import) bnn_course\.(\w+)", code))
            new_modules = sorted(modules - seen - _HELPER_MODULES)
            seen |= modules
            chapters.append({"part": caption, "number": int(match.group(1)),
                             "title": match.group(2), "file": file,
                             "new_modules": new_modules})
    return chapters


def chapter_map_diagram(chapters: list[dict[str, Any]] | None = None) -> Any:
    """Draw the map of the book: parts, chapters, what each builds on, what it adds.

    One row per part of ``_toc.yml`` (its caption above the row), at most two chapter boxes
    per row in reading order. Each box shows the chapter's number and title and the
    ``bnn_course`` modules it uses first; an arrow runs from every chapter to the chapters
    that build on it (:data:`CHAPTER_PREREQUISITES`).

    Parameters
    ----------
    chapters:
        As returned by :func:`book_chapters` (read from the repository by default).

    Returns
    -------
    matplotlib.figure.Figure
        7 inches wide; all text 10 pt or larger.

    Raises
    ------
    ValueError
        If a part holds more than two chapters, or an arrow names a chapter that is not in
        ``chapters``.
    """
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    chapters = book_chapters() if chapters is None else chapters
    parts: list[tuple[str, list[dict[str, Any]]]] = []
    for chapter in chapters:
        if not parts or parts[-1][0] != chapter["part"]:
            parts.append((chapter["part"], []))
        parts[-1][1].append(chapter)
    if any(len(members) > 2 for _, members in parts):
        raise ValueError("the chapter map draws at most two chapters per part")

    width, box_width, box_height = 7.0, 3.2, 1.0
    caption_height, row_gap, margin = 0.3, 0.3, 0.1
    line = 0.19  # inches per line of 10-11 pt text
    row_height = caption_height + box_height + row_gap
    height = margin * 2 + row_height * len(parts) - row_gap
    columns = (0.1, width - 0.1 - box_width)
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")

    boxes: dict[int, tuple[float, float]] = {}  # number -> (left, bottom) of its box
    for row, (caption, members) in enumerate(parts):
        top = height - margin - row * row_height
        ax.text(0.1, top - 0.02, caption, ha="left", va="top", fontsize=11,
                style="italic", color="#404040")
        bottom = top - caption_height - box_height
        for column, chapter in enumerate(members):
            left = columns[column]
            boxes[chapter["number"]] = (left, bottom)
            ax.add_patch(FancyBboxPatch((left, bottom), box_width, box_height,
                                        boxstyle="round,pad=0.0,rounding_size=0.08",
                                        facecolor="#e8f0f8", edgecolor="#4a6f94", lw=1.0))
            title = textwrap.fill(f"{chapter['number']}  {chapter['title']}", width=30)
            ax.text(left + 0.12, bottom + box_height - 0.1, title, ha="left", va="top",
                    fontsize=11, fontweight="bold", linespacing=1.1)
            if chapter["new_modules"]:
                modules = textwrap.fill(", ".join(chapter["new_modules"]), width=34)
                title_lines = title.count("\n") + 1
                ax.text(left + 0.12, bottom + box_height - 0.18 - line * title_lines,
                        modules, ha="left", va="top", fontsize=10, family="monospace",
                        color="#303030", linespacing=1.1)

    for number, prerequisites in sorted(CHAPTER_PREREQUISITES.items()):
        for before in prerequisites:
            if number not in boxes or before not in boxes:
                raise ValueError(f"arrow {before} -> {number}: chapter not in the map")
            (x0, y0), (x1, y1) = boxes[before], boxes[number]
            if abs(y0 - y1) < 1e-9:  # same row: side to side
                start = (x0 + box_width, y0 + box_height / 2)
                end = (x1, y1 + box_height / 2)
            else:  # a later row: bottom edge to top edge, clear of the part captions
                start = (x0 + (0.5 if x0 > x1 else box_width - 0.5), y0)
                end = (x1 + box_width - 0.5, y1 + box_height)
            ax.annotate("", xy=end, xytext=start,
                        arrowprops={"arrowstyle": "-|>", "color": "#4a6f94", "lw": 1.2,
                                    "shrinkA": 2, "shrinkB": 2})
    ax.text(width - 0.1, height - margin - 0.02,
            "monospace: bnn_course modules first used", ha="right", va="top",
            fontsize=10, family="monospace", color="#404040")
    return fig


def write_chapter_map(path: Any = None) -> Any:
    """Render :func:`chapter_map_diagram` to a reproducible SVG file and return its path.

    The SVG is byte-for-byte the same on every run with the same matplotlib: text stays
    text (``svg.fonttype = "none"``), element ids come from a fixed hash salt, and the file
    carries no date. ``tests/test_diagrams.py`` checks that the committed file equals a
    fresh render.

    Parameters
    ----------
    path:
        Output file; :data:`CHAPTER_MAP_PATH` under the repository root by default.
    """
    from pathlib import Path

    import matplotlib
    import matplotlib.pyplot as plt

    path = _repository_root() / CHAPTER_MAP_PATH if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bnn-course",
                                "font.family": "DejaVu Sans", "font.size": 11}):
        fig = chapter_map_diagram()
        try:
            fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
        finally:
            plt.close(fig)
    return path


def main() -> None:
    """``python -m bnn_course.diagrams``: (re)write the committed diagram files."""
    print(write_chapter_map())


if __name__ == "__main__":
    main()
