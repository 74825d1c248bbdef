"""Live line charts that stay smooth with a day of points.

Data lives in growable numpy buffers (capacity doubles, so appends are amortised O(1)). What
pyqtgraph gets is decimated here, per pixel column of the plot (`decimate`: the first, lowest,
highest and last point of each column, so every spike and the newest point stay on screen), and
clipped to the visible x range when the user has zoomed. Appends only mark the chart dirty; one
timer tick hands the new arrays to pyqtgraph, so a burst of events costs one redraw, not one per
event, and a series that did not change is not handed over again.

pyqtgraph's own peak downsampling is not used: it drops the last `len % factor` points (up to a
pixel's worth of the newest steps, spikes included) and bins by point count, not by pixel.
The grid is drawn in opaque colours behind the curves: Qt's raster engine blends semi-transparent
lines pixel by pixel, which made pyqtgraph's translucent grid most of a redraw's time.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QPen
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

X_MODES = ("step", "time")
REDRAW_MS = 100            # at most ~10 redraws a second however fast events come
POINTS_PER_COLUMN = 4      # decimate only above this many points per pixel column (4 are kept)
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1")


def format_elapsed(seconds: float) -> str:
    """Axis tick text for elapsed time: 45s, 12m, 3h05."""
    s = int(round(seconds))
    if abs(s) < 60:
        return f"{s}s"
    if abs(s) < 3600:
        return f"{s // 60}m{s % 60:02d}" if s % 60 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}"


class ElapsedAxis(pg.AxisItem):
    """Bottom axis that shows seconds as durations when the chart's x is time. Also the left axis:
    both draw their grid lines opaque, pre-blended over the plot's `background`."""

    def __init__(self, *args, background="w", **kwargs):
        super().__init__(*args, **kwargs)
        self.as_time = False
        self._background = pg.mkColor(background)
        self._opaque_pens: dict[tuple, QPen] = {}

    def generateDrawSpecs(self, p):
        specs = super().generateDrawSpecs(p)
        if specs is None or self.grid is False:
            return specs
        axis_spec, tick_specs, text_specs = specs
        opaque: dict[int, QPen] = {}      # pyqtgraph shares one pen per tick level
        for pen, _p1, _p2 in tick_specs:
            if id(pen) not in opaque:
                opaque[id(pen)] = self._opaque(pen)
        return axis_spec, [(opaque[id(pen)], p1, p2) for pen, p1, p2 in tick_specs], text_specs

    def updateAutoSIPrefix(self):
        # pyqtgraph re-sets the label's HTML and re-lays out the axis at every range change (each
        # live redraw); only do that when the prefix really changes.
        before = (getattr(self, "autoSIPrefixScale", None), getattr(self, "labelUnitPrefix", None))
        label_update, self._updateLabel = self._updateLabel, lambda: None
        try:
            super().updateAutoSIPrefix()
        finally:
            del self._updateLabel
        if (self.autoSIPrefixScale, self.labelUnitPrefix) != before:
            label_update()
        else:
            self.picture = None
            self.update()

    def _opaque(self, pen: QPen) -> QPen:
        """The same colour as `pen` drawn over the background, without alpha (blending is slow)."""
        color = pen.color()
        a = color.alphaF()
        if a >= 1.0:
            return pen
        key = (color.rgba(), pen.widthF(), pen.isCosmetic())
        out = self._opaque_pens.get(key)
        if out is None:
            bg = self._background
            out = QPen(pen)
            out.setColor(QColor.fromRgbF(bg.redF() + (color.redF() - bg.redF()) * a,
                                         bg.greenF() + (color.greenF() - bg.greenF()) * a,
                                         bg.blueF() + (color.blueF() - bg.blueF()) * a))
            self._opaque_pens[key] = out
        return out

    def tickStrings(self, values, scale, spacing):
        if not self.as_time:
            return super().tickStrings(values, scale, spacing)
        if spacing * scale < 1:   # a chart with little or no data yet: don't repeat "0s 0s 1s"
            return [f"{v * scale:.1f}s" for v in values]
        return [format_elapsed(v * scale) for v in values]


def decimate(x: np.ndarray, y: np.ndarray, columns: int, x_range: tuple[float, float] | None = None,
             x_sorted: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """What a line plot of (x, y) needs for `columns` pixel columns: per column its first, lowest,
    highest and last point (in that order), so the drawn line covers the same pixels as the full
    data's, spikes and the last point included. `x_range` (lo, hi): only that range is shown;
    one point beyond each end is kept so the line runs to the edges. Data with at most
    POINTS_PER_COLUMN points per column comes back as it is (views, not copies).

    `x` must be sorted unless `x_sorted` is False; then columns are runs of equal point counts."""
    columns = max(1, int(columns))
    n = len(x)
    if x_range is not None and n and x_sorted:
        lo, hi = x_range
        i0 = max(0, int(np.searchsorted(x, lo, side="left")) - 1)
        i1 = min(n, int(np.searchsorted(x, hi, side="right")) + 1)
        x, y, n = x[i0:i1], y[i0:i1], i1 - i0
    else:
        lo, hi = (float(x[0]), float(x[-1])) if n else (0.0, 1.0)
    if n <= POINTS_PER_COLUMN * columns:
        return x, y
    if x_sorted and hi > lo:
        edges = np.linspace(lo, hi, columns + 1)[1:-1]
        starts = np.empty(columns, dtype=np.intp)
        starts[0] = 0
        starts[1:] = np.searchsorted(x, edges, side="left")
        starts = np.unique(starts)            # columns with no point drop out
        starts = starts[starts < n]
    else:
        starts = np.arange(0, n, -(-n // columns), dtype=np.intp)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = n
    last = ends - 1
    mid = (starts + last) // 2
    out_x = np.empty((len(starts), 4), dtype=x.dtype)
    out_y = np.empty((len(starts), 4), dtype=y.dtype)
    out_x[:, 0] = x[starts]
    out_x[:, 1] = out_x[:, 2] = x[mid]        # within the column: which x inside it does not show
    out_x[:, 3] = x[last]
    out_y[:, 0] = y[starts]
    out_y[:, 1] = np.minimum.reduceat(y, starts)
    out_y[:, 2] = np.maximum.reduceat(y, starts)
    out_y[:, 3] = y[last]
    return out_x.reshape(-1), out_y.reshape(-1)


def _as_array(values) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, dtype=np.float64))


def keep_last_per_x(xs: np.ndarray) -> np.ndarray:
    """Mask keeping a strictly increasing x: where x goes back (a run resumed from an earlier
    checkpoint repeats steps), the later points replace the earlier ones. Vectorised."""
    if len(xs) < 2:
        return np.ones(len(xs), dtype=bool)
    # point i survives if every later x is larger: x[i] < min(x[i+1:])
    suffix_min = np.minimum.accumulate(xs[::-1])[::-1]
    keep = np.empty(len(xs), dtype=bool)
    keep[:-1] = xs[:-1] < suffix_min[1:]
    keep[-1] = True
    return keep


BUFFER_DTYPE = np.float32   # what a chart shows needs no more: steps are exact below 2**24 (16.7 M),
#                             elapsed seconds keep 1/128 s over a day, and a day of points takes half the memory


class SeriesBuffer:
    """x (step), t (elapsed seconds) and y columns in one growable block."""

    def __init__(self, capacity: int = 1024):
        self._data = np.empty((3, capacity), dtype=BUFFER_DTYPE)
        self.n = 0
        self.t_sorted = True     # x always is (extend keeps it strictly increasing); t usually

    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        cap = self._data.shape[1]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        grown = np.empty((3, cap), dtype=BUFFER_DTYPE)
        grown[:, :self.n] = self._data[:, :self.n]
        self._data = grown

    @property
    def x(self) -> np.ndarray:
        return self._data[0, :self.n]

    @property
    def t(self) -> np.ndarray:
        return self._data[1, :self.n]

    @property
    def y(self) -> np.ndarray:
        return self._data[2, :self.n]

    def extend(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> None:
        # compared with what is stored as it is stored
        x, t, y = (np.asarray(a, dtype=BUFFER_DTYPE) for a in (x, t, y))
        if len(x) > 1 and not np.all(np.diff(x) > 0):
            keep = keep_last_per_x(x)
            x, t, y = x[keep], t[keep], y[keep]
        if self.n and len(x) and x[0] <= self._data[0, self.n - 1]:
            # x went back (a resume repeats steps): drop our points at or after the new first x
            self.n = int(np.searchsorted(self.x, x[0], side="left"))
        if self.t_sorted and len(t) and ((self.n and t[0] < self._data[1, self.n - 1])
                                         or (len(t) > 1 and np.any(np.diff(t) < 0))):
            self.t_sorted = False
        self._reserve(len(x))
        self._data[0, self.n:self.n + len(x)] = x
        self._data[1, self.n:self.n + len(x)] = t
        self._data[2, self.n:self.n + len(x)] = y
        self.n += len(x)

    def clear(self) -> None:
        self.n = 0
        self.t_sorted = True


def _html(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class TimeSeriesChart(QWidget):
    """A pyqtgraph plot with named curves; x is the step or the elapsed time (`set_x_mode`).

    The legend is a line of text above the plot, not pyqtgraph's legend inside it: that one sits
    on the data (it covered the speed line)."""

    def __init__(self, title: str = "", y_label: str = "", parent=None, x_mode: str = "step"):
        super().__init__(parent)
        self._redrawing = False
        self._drawn_columns = 0
        self._drawn_range: tuple[float, float] | None = None   # the x range the data was clipped to
        self._axis = ElapsedAxis("bottom")
        self.plot_widget = pg.PlotWidget(axisItems={"bottom": self._axis, "left": ElapsedAxis("left")})
        self.plot_widget.setBackground("w")
        self.plot = self.plot_widget.getPlotItem()
        if title:
            self.plot.setTitle(title)
        if y_label:
            self.plot.setLabel("left", y_label)
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.getAxis("left").enableAutoSIPrefix(False)   # no "(x0.001)" beside the unit
        for side in ("left", "bottom", "top", "right"):
            self.plot.getAxis(side).setZValue(-200)   # the (opaque) grid behind the curves (view box: -100)
        self._view = self.plot.getViewBox()
        # What redraw() hands pyqtgraph depends on the plot's width and, once zoomed, on its x range.
        self._view.sigXRangeChanged.connect(self._view_changed)
        self._view.sigStateChanged.connect(self._view_changed)    # also auto-range turned back on
        self._view.sigResized.connect(self._resized)
        self.legend = QLabel()
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.legend.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.legend)
        layout.addWidget(self.plot_widget)

        self._buffers: dict[str, SeriesBuffer] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._labels: dict[str, tuple[str, str]] = {}   # name -> (label, colour), for the legend
        self._dirty: set[str] = set()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self.redraw)
        self.x_mode = ""
        self.set_x_mode(x_mode)

    # ---- series ---------------------------------------------------------------------
    def add_series(self, name: str, label: str | None = None, color: str | None = None,
                   symbol: str | None = None) -> None:
        if name in self.curves:
            return
        color = color or PALETTE[len(self.curves) % len(PALETTE)]
        kwargs = {"symbol": symbol, "symbolSize": 6, "symbolBrush": color, "symbolPen": None} if symbol else {}
        # skipFiniteCheck: non-finite values are dropped on append, so pyqtgraph need not scan for them
        curve = self.plot.plot(name=label or name, pen=pg.mkPen(color, width=1), skipFiniteCheck=True,
                               connect="all", **kwargs)
        self.curves[name] = curve
        self._buffers[name] = SeriesBuffer()
        self._labels[name] = (label or name, color)
        self._update_legend()

    def set_series_visible(self, name: str, visible: bool) -> None:
        """Show or hide a series (its data is kept); a hidden one leaves the legend and the autorange."""
        curve = self.curves.get(name)
        if curve is not None and curve.isVisible() != visible:
            curve.setVisible(visible)
            self._update_legend()

    def series_visible(self, name: str) -> bool:
        return name in self.curves and self.curves[name].isVisible()

    def legend_labels(self) -> list[str]:
        """The labels the legend shows (none for a one-series chart: its title says it)."""
        return [self._labels[n][0] for n in self.curves if self.curves[n].isVisible()] \
            if self.legend.isVisibleTo(self) else []

    def _update_legend(self) -> None:
        shown = [self._labels[n] for n in self.curves if self.curves[n].isVisible()]
        self.legend.setText("&nbsp;&nbsp;".join(
            f"<span style='color:{color}'>\u2501\u2501</span>&nbsp;{_html(label)}" for label, color in shown))
        # With another series hidden (VRAM without a GPU) the one left is still named: "Memory"
        # alone does not say whose.
        self.legend.setVisible(len(self.curves) > 1 and bool(shown))

    def append(self, name: str, x, y, t=None) -> None:
        """Add one point or arrays of points. `t` is elapsed seconds (for the time axis);
        without it the step doubles as t. Points whose x or y is not finite are skipped."""
        if name not in self.curves:
            self.add_series(name)
        x, y = _as_array(x), _as_array(y)
        t = x if t is None else _as_array(t)
        ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(t)
        if not ok.all():
            x, y, t = x[ok], y[ok], t[ok]
        if len(x) == 0:
            return
        self._buffers[name].extend(x, t, y)
        self._mark(name)

    def set_series(self, name: str, xs, ys, ts=None) -> None:
        """Replace a series' points (e.g. reloaded from the store)."""
        if name not in self.curves:
            self.add_series(name)
        self._buffers[name].clear()
        self.append(name, xs, ys, ts)
        self._mark(name)

    def count(self, name: str) -> int:
        buf = self._buffers.get(name)
        return buf.n if buf else 0

    def data(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) a series shows in the current x mode (views, not copies)."""
        buf = self._buffers[name]
        return (buf.t if self.x_mode == "time" else buf.x), buf.y

    def series_names(self) -> list[str]:
        return list(self.curves)

    def clear(self) -> None:
        """Drop every point and forget the axes: the next data is fitted afresh, also after a zoom
        (pyqtgraph keeps the last range of an empty plot, so the previous run's axes showed)."""
        for name, buf in self._buffers.items():
            buf.clear()
            self._dirty.add(name)
        self.redraw()
        self.plot.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
        self.plot.enableAutoRange()

    # ---- display --------------------------------------------------------------------
    def set_x_mode(self, mode: str) -> None:
        if mode not in X_MODES:
            raise ValueError(f"x mode must be one of {X_MODES}")
        if mode == self.x_mode:
            return
        self.x_mode = mode
        self._axis.as_time = mode == "time"
        self.plot.setLabel("bottom", "elapsed time" if mode == "time" else "step")
        self._axis.picture = None      # re-render tick labels in the new format
        self._dirty.update(self.curves)
        self.plot.enableAutoRange()    # first: the data is then decimated whole, not clipped to a zoom
        self.redraw()

    def _mark(self, name: str) -> None:
        self._dirty.add(name)
        if not self._timer.isActive():
            self._timer.start()

    def _columns(self) -> int:
        width = self._view.width()
        return int(width * self.devicePixelRatioF()) if width >= 2 else 1000

    def _clip_range(self) -> tuple[float, float] | None:
        """The x range to clip to: None while x is auto-ranged (everything is shown)."""
        return None if self._view.autoRangeEnabled()[0] else tuple(self._view.viewRange()[0])

    def _view_changed(self, *_args) -> None:
        # Range changes that auto-range makes follow the data, which is already decimated whole;
        # a zoom or pan by the user shows another part, and auto-range turned back on all of it:
        # decimate anew.
        if not self._redrawing and self._clip_range() != self._drawn_range:
            self._dirty.update(self.curves)
            self.redraw()

    def _resized(self, *_args) -> None:
        if self._columns() != self._drawn_columns and not self._redrawing:
            self._dirty.update(self.curves)
            self.redraw()

    def shown(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) handed to pyqtgraph for a series: decimated per pixel column, clipped to the
        visible x range when the user zoomed."""
        x, y = self.data(name)
        x_range = self._clip_range()
        sorted_x = self.x_mode == "step" or self._buffers[name].t_sorted
        return decimate(x, y, self._columns(), x_range, x_sorted=sorted_x)

    def redraw(self) -> None:
        """Push pending data to pyqtgraph now (the timer does this on its own)."""
        self._timer.stop()
        if not self._dirty:
            return
        self._redrawing = True
        try:
            self._drawn_columns = self._columns()
            self._drawn_range = self._clip_range()
            for name in self._dirty:
                # Few points come as views of the buffer: it only grows past n, so they stay valid
                # until the next setData, and pyqtgraph copies nothing.
                self.curves[name].setData(*self.shown(name))
            self._dirty.clear()
        finally:
            self._redrawing = False
