"""Figures a reader drives with sliders, in the book's HTML, with no kernel and no network.

A figure here is a Plotly figure (traces and layout, as plain JSON) with sliders. Every value
a slider can show is computed beforehand in Python, by `pearl_edu`, and stored in the page:

- **frames**: a trace's points for every position of the sliders it depends on (the SLERP
  arc for each angle; the point at ``t`` for each angle and ``t``);
- **linear**: a trace whose ``y`` is linear in the slider values,
  $y = c + \\sum_k v_k\\, b_k$, stored as its offset $c$ and one basis vector $b_k$ per
  slider (a per-layer schedule read off five anchors is linear in the anchors).

Moving a slider only picks or adds stored numbers, so the page needs no kernel. Plotly's
JavaScript is served from the book's own static files (``make setup`` copies it to
``_static/plotly/plotly.min.js``, as it does MathJax), so it needs no network either.

Each figure also carries a static image of its starting position: the PNG that a PDF or a
printed page shows, and what a reader sees wherever the JavaScript is not at hand (a
notebook opened in Jupyter, a page with scripts blocked).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

# Where the book serves Plotly, relative to its root (see the Makefile's `setup`).
PLOTLY_PATH = "_static/plotly/plotly.min.js"
# Decimals kept in the stored numbers: enough for a figure, and the same text on every run.
DIGITS = 4
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class Slider:
    """One control: ``values`` to step through, starting at ``values[start]``.

    ``digits`` and ``unit`` say how the current value is written beside the slider, or
    ``names`` give a word for each value (a slider that picks one of several cases).
    """

    label: str
    values: Sequence[float]
    start: int = 0
    digits: int = 2
    unit: str = ""
    names: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.names and len(self.names) != len(self.values):
            raise ValueError(f"slider {self.label!r}: {len(self.names)} names for its values")
        if len(self.values) < 2:
            raise ValueError(f"slider {self.label!r}: needs at least 2 values")
        if not 0 <= self.start < len(self.values):
            raise ValueError(
                f"slider {self.label!r}: start {self.start} is not an index of its "
                f"{len(self.values)} values"
            )


@dataclass(frozen=True)
class Frames:
    """The points of trace ``trace`` at every position of the sliders ``sliders`` depends on.

    ``points[i]`` is ``{"x": [...], "y": [...]}`` (or ``{"y": [...]}``, when ``x`` never
    changes) at the ``i``-th position of those sliders, in row-major order: the last slider
    varies fastest, as in `grid`.
    """

    trace: int
    sliders: tuple[int, ...]
    points: list[Any]


@dataclass(frozen=True)
class Linear:
    """Trace ``trace``'s ``y``: ``offset + sum_k value_k * basis[k]`` over the sliders."""

    trace: int
    offset: Sequence[float]
    basis: Sequence[Sequence[float]]


@dataclass(frozen=True)
class Readout:
    """A line of text under the figure.

    Either one string per position of ``sliders`` (``texts``), or a ``template`` whose
    ``{0}``, ``{1}``, ... are numbers linear in the slider values (``offsets``, ``bases``:
    number ``j`` is ``offsets[j] + sum_k value_k * bases[j][k]``), written with ``digits``.
    """

    sliders: tuple[int, ...] = ()
    texts: Sequence[str] = ()
    template: str = ""
    offsets: Sequence[float] = ()
    bases: Sequence[Sequence[float]] = ()
    digits: int = 3


def grid(sliders: Sequence[Slider], compute: Callable[..., Any]) -> list[Any]:
    """``compute(*values)`` at every position of ``sliders``, in the order `Frames` stores."""
    return [compute(*values) for values in itertools.product(*(s.values for s in sliders))]


@dataclass
class InteractiveFigure:
    """A Plotly figure with sliders, and a static image of it for print.

    ``traces`` and ``layout`` are Plotly's JSON; a trace's data may be left out when
    ``updates`` provide it. Displayed in a notebook, it gives the HTML of the figure (what
    the book's pages show), its static image as PNG, and a line of plain text.
    """

    name: str
    traces: list[dict[str, Any]]
    layout: dict[str, Any]
    sliders: list[Slider]
    updates: list[Frames | Linear]
    static_png: bytes
    readout: Readout | None = None
    alt: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"figure name {self.name!r}: expected lower-case letters, digits and dashes"
            )
        for update in self.updates:
            if not 0 <= update.trace < len(self.traces):
                raise ValueError(f"figure {self.name}: no trace {update.trace} to update")
            if isinstance(update, Frames):
                self._check_positions(update.sliders, len(update.points), "trace frames")
            elif len(update.basis) != len(self.sliders):
                raise ValueError(
                    f"figure {self.name}: trace {update.trace} has {len(update.basis)} basis "
                    f"vectors for {len(self.sliders)} sliders"
                )
        if self.readout is not None and self.readout.texts:
            self._check_positions(self.readout.sliders, len(self.readout.texts), "readout")

    def _check_positions(self, sliders: Sequence[int], count: int, what: str) -> None:
        expected = 1
        for index in sliders:
            expected *= len(self.sliders[index].values)
        if count != expected:
            raise ValueError(
                f"figure {self.name}: {what} has {count} entries for {expected} positions"
            )

    def spec(self) -> dict[str, Any]:
        """Everything the page's script needs, as JSON-ready data (numbers rounded)."""
        updates = []
        for update in self.updates:
            if isinstance(update, Frames):
                updates.append(
                    {
                        "trace": update.trace,
                        "sliders": list(update.sliders),
                        "frames": update.points,
                    }
                )
            else:
                updates.append(
                    {
                        "trace": update.trace,
                        "offset": list(update.offset),
                        "basis": [list(b) for b in update.basis],
                    }
                )
        readout = None
        if self.readout is not None:
            readout = {
                "sliders": list(self.readout.sliders),
                "texts": list(self.readout.texts),
                "template": self.readout.template,
                "offsets": list(self.readout.offsets),
                "bases": [list(b) for b in self.readout.bases],
                "digits": self.readout.digits,
            }
        return _rounded(
            {
                "traces": self.traces,
                "layout": self.layout,
                "sliders": [
                    {
                        "label": s.label,
                        "values": list(s.values),
                        "start": s.start,
                        "digits": s.digits,
                        "unit": s.unit,
                        "names": list(s.names),
                    }
                    for s in self.sliders
                ],
                "updates": updates,
                "readout": readout,
            }
        )

    def to_html(self) -> str:
        """The figure as HTML: static image, sliders, plot and readout, and its script."""
        spec = json.dumps(self.spec(), separators=(",", ":"), allow_nan=False)
        spec = spec.replace("</", "<\\/")  # nothing in the data may close the script tag
        picture = base64.b64encode(self.static_png).decode("ascii")
        controls = "".join(
            f'<label class="pearl-slider"><span>{html.escape(s.label)}</span>'
            f'<input type="range" min="0" max="{len(s.values) - 1}" step="1" '
            f'value="{s.start}" data-slider="{i}" aria-label="{html.escape(s.label)}">'
            f"<output>{html.escape(_shown(s, s.start))}</output></label>"
            for i, s in enumerate(self.sliders)
        )
        element = f"pearl-fig-{self.name}"
        return (
            f'<div class="pearl-interactive" id="{element}">'
            f"<style>{_STYLE}</style>"
            f'<img class="pearl-static" alt="{html.escape(self.alt)}" '
            f'src="data:image/png;base64,{picture}">'
            f'<div class="pearl-live" hidden><div class="pearl-controls">{controls}</div>'
            f'<div class="pearl-plot"></div><p class="pearl-readout"></p></div>'
            f'<script type="application/json" class="pearl-spec">{spec}</script>'
            f"<script>{_SCRIPT.replace('ELEMENT_ID', element)}</script>"
            "</div>"
        )

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        return {
            "text/html": self.to_html(),
            "image/png": base64.b64encode(self.static_png).decode("ascii"),
            "text/plain": f"<interactive figure {self.name!r}: "
            + ", ".join(s.label for s in self.sliders)
            + ">",
        }


def png_of(figure) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed, so it is not shown twice."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to `DIGITS` decimals (and -0.0 written 0.0)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float) or hasattr(value, "item"):
        number = round(float(value), DIGITS)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"a figure stores finite numbers only, got {value}")
        return number + 0.0
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    if hasattr(value, "tolist"):
        return _rounded(value.tolist())
    raise TypeError(f"a figure cannot store {type(value).__name__} values")


def _shown(slider: Slider, index: int) -> str:
    """A slider's value as written beside it (the page's script writes it the same way)."""
    if slider.names:
        return slider.names[index]
    return f"{float(slider.values[index]):.{slider.digits}f}{slider.unit}"


_STYLE = (
    ".pearl-interactive{margin:0.5em 0 1em}"
    ".pearl-interactive .pearl-static{max-width:100%;height:auto}"
    ".pearl-controls{display:flex;flex-wrap:wrap;gap:0.4em 1.5em;margin-bottom:0.3em}"
    ".pearl-slider{display:flex;align-items:center;gap:0.5em;font-size:0.9em}"
    ".pearl-slider input{width:11em}"
    ".pearl-slider output{min-width:3.5em;font-variant-numeric:tabular-nums}"
    ".pearl-plot{width:100%;min-height:360px}"
    ".pearl-readout{font-size:0.9em;font-variant-numeric:tabular-nums;margin:0.2em 0}"
    "@media print{.pearl-live{display:none!important}"
    ".pearl-interactive .pearl-static{display:block!important}}"
)

# The page's side (interactive.js, shipped beside this module): draw the figure once Plotly
# is loaded, redraw on every slider move. If Plotly cannot be loaded, the static image
# simply stays. Its PLOTLY_PATH is filled in here, its ELEMENT_ID by `to_html`; it starts
# on a line of its own inside its <script> tag.
_SCRIPT = "\n" + (
    resources.files("pearl_edu.teaching")
    .joinpath("interactive.js")
    .read_text(encoding="utf-8")
    .replace("PLOTLY_PATH", PLOTLY_PATH)
)


# ---------------------------------------------------------------------------------------
# The book's three figures with sliders

# matplotlib's default colours (tab10), so the two versions of a figure look alike.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def slerp_arc(
    angles_degrees: Sequence[float] = tuple(range(10, 171, 10)),
    ts: Sequence[float] = tuple(i / 20 for i in range(21)),
    *,
    start: tuple[float, float] = (90, 0.5),
) -> InteractiveFigure:
    r"""Chapter 04: the SLERP arc against the straight path, with sliders for $\Omega$ and $t$.

    In the plane of $\hat p_0 = (1, 0)$ and $\hat p_1 = (\cos\Omega, \sin\Omega)$, every
    point is computed by `pearl_edu.slerp` and `pearl_edu.lerp`: the arc, the chord, and the
    two points at $t$, with their lengths and their angles from $\hat p_0$.
    """
    import math

    import matplotlib.pyplot as plt
    import torch

    from pearl_edu.functions import lerp, slerp

    sliders = [
        Slider("angle Ω", list(angles_degrees), _index(angles_degrees, start[0]), 0, "°"),
        Slider("t", list(ts), _index(ts, start[1])),
    ]
    path_ts = [i / 40 for i in range(41)]

    def ends(degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
        omega = math.radians(degrees)
        p1 = torch.tensor([math.cos(omega), math.sin(omega)], dtype=torch.float32)
        return torch.tensor([1.0, 0.0], dtype=torch.float32), p1

    def arc(degrees: float) -> dict:
        p0, p1 = ends(degrees)
        points = torch.stack([slerp(p0, p1, t) for t in path_ts])
        return {"x": points[:, 0].tolist(), "y": points[:, 1].tolist()}

    def chord(degrees: float) -> dict:
        p0, p1 = ends(degrees)
        return {"x": [p0[0].item(), p1[0].item()], "y": [p0[1].item(), p1[1].item()]}

    def arrow(degrees: float) -> dict:
        _, p1 = ends(degrees)
        return {"x": [0.0, p1[0].item()], "y": [0.0, p1[1].item()]}

    def at_t(interpolate) -> Callable[[float, float], dict]:
        def point(degrees: float, t: float) -> dict:
            p = interpolate(*ends(degrees), t)
            return {"x": [0.0, p[0].item()], "y": [0.0, p[1].item()]}

        return point

    def readout(degrees: float, t: float) -> str:
        p0, p1 = ends(degrees)
        on_arc, on_chord = slerp(p0, p1, t), lerp(p0, p1, t)
        turned = [math.degrees(math.atan2(p[1].item(), p[0].item())) for p in (on_arc, on_chord)]
        return (
            f"Ω = {degrees:.0f}°, t = {t:.2f}: slerp has length {on_arc.norm():.3f} and has "
            f"turned {turned[0]:.1f}° from p̂0; lerp has length {on_chord.norm():.3f} and "
            f"has turned {turned[1]:.1f}°."
        )

    both = (0, 1)
    updates = [
        Frames(1, (0,), grid(sliders[:1], arc)),
        Frames(2, (0,), grid(sliders[:1], chord)),
        Frames(4, (0,), grid(sliders[:1], arrow)),
        Frames(5, both, grid(sliders, at_t(slerp))),
        Frames(6, both, grid(sliders, at_t(lerp))),
    ]
    circle = [2 * math.pi * i / 120 for i in range(121)]
    traces = [
        _line(
            [math.cos(a) for a in circle],
            [math.sin(a) for a in circle],
            "unit circle",
            "#d9d9d9",
            width=1,
            legend=False,
        ),
        _line(None, None, "slerp path (the arc)", COLOURS[1], width=3),
        _line(None, None, "lerp path (the chord)", COLOURS[0], width=2, dash="dash"),
        # Two-point segments from the origin, with a marker at the far end only.
        _line(
            [0.0, 1.0], [0.0, 0.0], "p̂0", "black", width=2, legend=False, marker=True, size=[0, 7]
        ),
        _line(None, None, "p̂1", "black", width=2, legend=False, marker=True, size=[0, 7]),
        _line(None, None, "slerp(p̂0, p̂1; t)", COLOURS[1], width=1, marker=True, size=[0, 12]),
        _line(None, None, "lerp(p̂0, p̂1; t)", COLOURS[0], width=1, marker=True, size=[0, 12]),
    ]
    layout = _layout(
        "SLERP and the straight path in the plane of p̂0 and p̂1",
        xaxis={
            "title": {"text": "along p̂0"},
            "range": [-1.15, 1.15],
            "zeroline": False,
            "constrain": "domain",
        },
        yaxis={
            "title": {"text": "perpendicular to p̂0, in the plane"},
            "range": [-0.1, 1.15],
            "scaleanchor": "x",
            "zeroline": False,
        },
        height=440,
    )

    degrees, t = sliders[0].values[sliders[0].start], sliders[1].values[sliders[1].start]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(traces[0]["x"], traces[0]["y"], color="0.85", lw=1)
    ax.plot(*arc(degrees).values(), color="C1", lw=2.5, label="slerp path (the arc)")
    ax.plot(*chord(degrees).values(), "--", color="C0", lw=1.5, label="lerp path (the chord)")
    for point, colour, label in ((at_t(slerp), "C1", "slerp"), (at_t(lerp), "C0", "lerp")):
        xs, ys = point(degrees, t).values()
        ax.plot(xs, ys, "-o", color=colour, ms=6, markevery=[1], label=f"{label} at t = {t:g}")
    for xs, ys in ([0, 1], [0, 0]), tuple(arrow(degrees).values()):
        ax.plot(xs, ys, "k-", lw=1.5)
    ax.set_aspect("equal")
    ax.set_xlim(-1.15, 1.15)
    ax.set_ylim(-0.1, 1.15)
    ax.set_xlabel("along $\\hat p_0$")
    ax.set_ylabel("perpendicular, in the plane")
    ax.set_title(f"SLERP and the straight path, Ω = {degrees:g}°")
    ax.legend(loc="upper left", fontsize="x-small")
    fig.tight_layout()

    return InteractiveFigure(
        "slerp-arc",
        traces,
        layout,
        sliders,
        updates,
        png_of(fig),
        Readout(sliders=both, texts=grid(sliders, readout)),
        alt=f"The SLERP arc and the straight path between two unit vectors {degrees:g}° apart",
    )


def schedule_explorer(
    values: Sequence[float],
    num_layers: int,
    sizes: dict[str, int],
    *,
    choices: Sequence[float] = tuple(i / 20 for i in range(21)),
    catch_all: float = 0.5,
) -> InteractiveFigure:
    r"""Chapter 06: Pearl's schedule with its five anchors on sliders.

    The attention's $t$ follows the gradient ``values`` (one slider per anchor), the MLP's
    is its complement $1 - t$ as in Pearl's recipe, every other tensor keeps ``catch_all``.
    Each layer's $t$ is `pearl_edu.layer_schedule.gradient_value` at
    `pearl_edu.layer_schedule.layer_position`, which is linear in the anchors: the figure
    stores one basis vector per anchor.
    ``sizes`` (tensor name -> number of parameters, e.g. Mistral-7B's) weighs the readout's
    share of the second model.
    """
    import matplotlib.pyplot as plt

    from pearl_edu.layer_schedule import gradient_value, layer_position

    count = len(values)
    sliders = [
        Slider(f"anchor {k} (x = {k / (count - 1):g})", list(choices), _index(choices, v))
        for k, v in enumerate(values)
    ]
    positions = [layer_position(i, num_layers) for i in range(num_layers)]
    unit = [[1.0 if j == k else 0.0 for j in range(count)] for k in range(count)]
    basis = [[gradient_value(e, x) for x in positions] for e in unit]
    layers = list(range(num_layers))
    anchor_layers = [k * (num_layers - 1) / (count - 1) for k in range(count)]

    def layer_of(name: str) -> int | None:
        found = re.search(r"\.layers\.(\d+)\.", name)
        return int(found.group(1)) if found else None

    # The share of the second model, sum(size * t) / sum(size), is linear in the anchors.
    total = sum(sizes.values())
    share_offset, share_basis = 0.0, [0.0] * count
    for name, size in sizes.items():
        layer = layer_of(name)
        if "self_attn" in name and layer is not None:
            share_basis = [b + size * basis[k][layer] / total for k, b in enumerate(share_basis)]
        elif "mlp" in name and layer is not None:
            share_offset += size / total
            share_basis = [b - size * basis[k][layer] / total for k, b in enumerate(share_basis)]
        else:
            share_offset += size * catch_all / total
    mean_basis = [sum(b) / num_layers for b in basis]

    traces = [
        _line(layers, None, "self_attn", COLOURS[0], width=2, marker=True, size=6),
        _line(layers, None, "mlp (1 − self_attn)", COLOURS[1], width=2, marker=True, size=6),
        _line(
            layers,
            [catch_all] * num_layers,
            "norms, embeddings (catch-all)",
            COLOURS[2],
            width=2,
            dash="dash",
        ),
        _line(
            anchor_layers,
            None,
            "the anchors",
            "black",
            width=0,
            marker=True,
            size=11,
            symbol="square-open",
        ),
    ]
    updates = [
        Linear(0, [0.0] * num_layers, basis),
        Linear(1, [1.0] * num_layers, [[-v for v in b] for b in basis]),
        Linear(3, [0.0] * count, unit),
    ]
    layout = _layout(
        "The schedule: t of each layer, from five anchors",
        xaxis={"title": {"text": "layer"}, "range": [-0.8, num_layers - 0.2]},
        yaxis={"title": {"text": "t  (0 = first model, 1 = second)"}, "range": [-0.05, 1.05]},
        height=400,
    )
    readout = Readout(
        template=(
            "Mean t over the layers: self_attn {0}, mlp {1}. Share of the second model in "
            "all the weights, weighted by size: {2}."
        ),
        offsets=[0.0, 1.0, share_offset],
        bases=[mean_basis, [-m for m in mean_basis], share_basis],
    )

    attention = [sum(v * b[i] for v, b in zip(values, basis, strict=True)) for i in layers]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(layers, attention, "-o", ms=3, color="C0", label="self_attn")
    ax.plot(layers, [1 - t for t in attention], "-s", ms=3, color="C1", label="mlp")
    ax.plot(layers, [catch_all] * num_layers, "--", color="C2", label="catch-all")
    ax.plot(anchor_layers, values, "ks", ms=8, mfc="none", label="anchors")
    ax.set_xlabel("layer")
    ax.set_ylabel("t  (0 = first model, 1 = second)")
    ax.set_title("The schedule, from five anchors")
    ax.legend(loc="upper center", fontsize="x-small", ncol=4)
    fig.tight_layout()

    return InteractiveFigure(
        "schedule",
        traces,
        layout,
        sliders,
        updates,
        png_of(fig),
        readout,
        alt="The per-layer t of attention, MLP and the catch-all, from five anchor values",
    )


def path_explorer(paths: dict[str, Sequence[Any]], *, start: tuple[int, float] = (0, 0.5)):
    r"""Chapter 08: the loss and both skills along the straight path, with a slider for $t$.

    ``paths`` maps a pair's name to the points measured along its path
    (`pearl_edu.teaching.connectivity.PathPoint`: ``t``, ``loss`` and ``skills``), all at
    the same values of $t$. One slider picks the pair, the other $t$; the readout gives the
    loss, its height above or below the chord, and both skills there.
    """
    import matplotlib.pyplot as plt

    names = list(paths)
    ts = [float(p.t) for p in paths[names[0]]]
    for name, points in paths.items():
        if [float(p.t) for p in points] != ts:
            raise ValueError(f"path {name!r}: measured at other values of t than {names[0]!r}")
    sliders = [
        Slider("pair", list(range(len(names))), start[0], names=names),
        Slider("t", ts, _index(ts, start[1])),
    ]

    def chord(points, i: int) -> float:
        first, last = points[0].loss, points[-1].loss
        return (1 - ts[i]) * first + ts[i] * last

    def curves(pair: int) -> list[dict]:
        points = paths[names[pair]]
        return [
            {"y": [p.loss for p in points]},
            {"y": [points[0].loss, points[-1].loss]},
            {"y": [p.skills.text for p in points]},
            {"y": [p.skills.addition for p in points]},
        ]

    def marker(pair: int, t: float) -> list[dict]:
        p = paths[names[pair]][ts.index(t)]
        return [{"x": [t], "y": [p.loss]}, {"x": [t, t], "y": [p.skills.text, p.skills.addition]}]

    def readout(pair: int, t: float) -> str:
        points = paths[names[pair]]
        i = ts.index(t)
        above = points[i].loss - chord(points, i)
        where = (
            "on the chord"
            if abs(above) < 0.005
            else f"{abs(above):.2f} {'above' if above > 0 else 'below'} the chord"
        )
        return (
            f"{names[pair]}, t = {t:.1f}: held-out loss {points[i].loss:.2f} nats, {where}; "
            f"text {points[i].skills.text:.1%}, addition {points[i].skills.addition:.1%}."
        )

    def at_t(what: str, *, axis: int) -> dict:
        """The open circle that marks the slider's t on the loss (axis 1) or the skills (2)."""
        return _line(
            None,
            None,
            f"at t ({what})",
            "black",
            width=0,
            marker=True,
            size=12,
            legend=False,
            symbol="circle-open",
            axis=axis,
        )

    pairs = sliders[:1]
    per_pair = grid(pairs, curves)
    per_point = grid(sliders, marker)
    updates = [Frames(k, (0,), [frames[k] for frames in per_pair]) for k in range(4)]
    updates += [Frames(4 + k, (0, 1), [frames[k] for frames in per_point]) for k in range(2)]
    traces = [
        _line(ts, None, "held-out loss", COLOURS[3], width=2, marker=True, size=6),
        _line([ts[0], ts[-1]], None, "chord", "#7f7f7f", width=1.5, dash="dash"),
        _line(ts, None, "text accuracy", COLOURS[0], width=2, marker=True, size=6, axis=2),
        _line(ts, None, "addition accuracy", COLOURS[1], width=2, marker=True, size=6, axis=2),
        at_t("loss", axis=1),
        at_t("skills", axis=2),
    ]
    layout = _layout(
        "Along the straight path between two models",
        xaxis={"anchor": "y", "range": [-0.03, 1.03], "showticklabels": False},
        yaxis={
            "title": {"text": "loss (nats)"},
            "domain": [0.55, 1.0],
            "autorange": True,
        },
        xaxis2={
            "title": {"text": "t  (0 = first model of the pair)"},
            "anchor": "y2",
            "range": [-0.03, 1.03],
            "matches": "x",
        },
        yaxis2={
            "title": {"text": "accuracy"},
            "domain": [0.0, 0.45],
            "range": [0, 1],
            "tickformat": ".0%",
        },
        height=520,
    )

    pair, t = start[0], sliders[1].values[sliders[1].start]
    points = paths[names[pair]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 4.6), sharex=True)
    top.plot(ts, [p.loss for p in points], "-o", ms=3, color="C3", label="held-out loss")
    top.plot([0, 1], [points[0].loss, points[-1].loss], "--", color="0.5", label="chord")
    bottom.plot(ts, [p.skills.text for p in points], "-o", ms=3, label="text")
    bottom.plot(ts, [p.skills.addition for p in points], "-s", ms=3, label="addition")
    top.axvline(t, color="k", lw=0.8)
    bottom.axvline(t, color="k", lw=0.8)
    top.set_ylabel("loss (nats)")
    bottom.set_ylabel("accuracy")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("t  (0 = first model of the pair)")
    top.set_title(f"Along the straight path: {names[pair]}")
    top.legend(fontsize="x-small")
    bottom.legend(fontsize="x-small")
    fig.tight_layout()

    return InteractiveFigure(
        "merge-path",
        traces,
        layout,
        sliders,
        updates,
        png_of(fig),
        Readout(sliders=(0, 1), texts=grid(sliders, readout)),
        alt="The held-out loss and both skills along the straight path between two models",
    )


def _index(values: Sequence[float], wanted: float) -> int:
    """The index of ``wanted`` among a slider's ``values`` (to within rounding)."""
    for i, value in enumerate(values):
        if abs(float(value) - float(wanted)) < 1e-9:
            return i
    raise ValueError(f"{wanted} is not one of the slider's values {list(values)}")


def _line(
    x,
    y,
    name: str,
    colour: str,
    *,
    width: float = 2,
    dash: str = "solid",
    marker: bool = False,
    size: int | list[int] = 6,
    symbol: str = "circle",
    legend: bool = True,
    axis: int = 1,
) -> dict[str, Any]:
    """A Plotly scatter trace, in the book's colours."""
    trace: dict[str, Any] = {
        "type": "scatter",
        "name": name,
        "mode": ("lines+markers" if width else "markers") if marker else "lines",
        "line": {"color": colour, "width": width, "dash": dash},
        "showlegend": legend,
        "hoverinfo": "name+x+y",
    }
    if marker:
        trace["marker"] = {"color": colour, "size": size, "symbol": symbol}
    if x is not None:
        trace["x"] = list(x)
    if y is not None:
        trace["y"] = list(y)
    if axis != 1:
        trace["xaxis"], trace["yaxis"] = f"x{axis}", f"y{axis}"
    return trace


def _layout(title: str, *, height: int, **axes: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 15}},
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 50, "b": 70},
        "legend": {"orientation": "h", "y": -0.22, "font": {"size": 11}},
        "plot_bgcolor": "white",
        "hovermode": "closest",
        **{
            name: {"gridcolor": "#eeeeee", "linecolor": "#444444", **axis}
            for name, axis in axes.items()
        },
    }
