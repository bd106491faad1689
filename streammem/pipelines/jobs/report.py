"""The main job's report: one self-contained HTML file (``outputs/report.html``).

It holds the run's figures, every answer with its evidence thumbnails and timestamps, the
detection table (detections per class and a sample of per-frame records) and the occupancy of
every memory over the stream (tokens, and the bytes those tokens take, over time; the
allocated bytes are fixed, since every memory preallocates). Images are embedded as base64
data URIs and plots drawn with matplotlib when it is installed (a PNG), else as inline SVG made
here, so the file needs nothing else to be read, offline.

What is gathered during the run is bounded (:class:`ReportCollector`): the occupancy trace and
the record sample are thinned to at most ``max_points`` / ``max_records`` (every other one is
dropped when full, and the sampling interval doubled), answers are few by nature.

Example:
    >>> import tempfile, pathlib
    >>> from streammem.memory import PyramidMemory
    >>> from streammem.pipelines.jobs.report import ReportCollector, write_report
    >>> c = ReportCollector(plotter="svg")
    >>> c.sample(0.0, {"pyramid": PyramidMemory.from_preset("ovbench", dim=8)})
    >>> p = write_report(pathlib.Path(tempfile.mkdtemp()) / "report.html", {"source": "demo"}, c)
    >>> "<svg" in p.read_text(), "http" in p.read_text()
    (True, False)
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streammem.io.sinks import atomic_path

__all__ = ["ReportCollector", "write_report", "svg_plot", "image_data_uri"]

PLOTTERS = ("auto", "matplotlib", "svg")


class _Thinned:
    """A list kept to at most ``cap`` items spread over the whole stream: every ``stride``-th
    offered item is kept; when full, every other kept item is dropped and the stride doubled."""

    def __init__(self, cap: int) -> None:
        self.cap, self.stride, self.seen, self.items = cap, 1, 0, []

    def offer(self, item: Any) -> None:
        if self.seen % self.stride == 0:
            self.items.append(item)
            if len(self.items) > self.cap:
                self.items = self.items[::2]
                self.stride *= 2
        self.seen += 1


class ReportCollector:
    """What the report needs, gathered while the job runs.

    Args:
        max_points: occupancy samples kept per memory (thinned over the stream).
        max_records: per-frame detection records kept as the table's sample.
        plotter: ``"matplotlib"``, ``"svg"``, or ``"auto"`` (matplotlib when importable).
    """

    def __init__(self, max_points: int = 1000, max_records: int = 12, plotter: str = "auto") -> None:
        if plotter not in PLOTTERS:
            raise ValueError(f"plotter must be one of {', '.join(PLOTTERS)}, got {plotter!r}")
        self.plotter = plotter
        self.trace = _Thinned(max_points)  # (time, {memory: (tokens, capacity, bytes)})
        self.records = _Thinned(max_records)  # per-frame detection records
        self.answers: list[tuple[dict, list[np.ndarray | None]]] = []  # record, thumbnail per evidence
        self.class_counts: Counter = Counter()
        self.class_frames: Counter = Counter()
        self.detection_frames = 0

    def sample(self, t: float, memories: dict) -> None:
        """The occupancy of ``memories`` (``{name: Memory}``) at stream time ``t``."""
        self.trace.offer((float(t), {k: (m.num_tokens, m.capacity, m.nbytes) for k, m in memories.items()}))

    def take(self, head, output: Any, records: list[dict]) -> None:
        """A head's ``records`` for one output: answers (records with ``question``) with the
        thumbnails of their evidence where the output carries them (``(question, answer)``
        pairs whose evidence has a ``thumbnail``); detection records (with ``detections``)
        counted per class and sampled."""
        pairs = output if isinstance(output, list) and all(isinstance(o, tuple) and len(o) == 2 for o in output) else []
        for i, rec in enumerate(records):
            if "question" in rec:
                ans = pairs[i][1] if i < len(pairs) else None
                thumbs = [e.get("thumbnail") for e in getattr(ans, "evidence", ())] or [None] * len(rec.get("evidence", []))
                self.answers.append((rec, thumbs))
            elif "detections" in rec:
                self.detection_frames += 1
                names = [str(d.get("class_name") or d.get("class_id")) for d in rec["detections"]]
                self.class_counts.update(names)
                self.class_frames.update(set(names))
                if rec["detections"]:
                    self.records.offer(rec)


# ---------------------------------------------------------------------------- images and plots
def image_data_uri(image: np.ndarray, fmt: str = ".png") -> str:
    """An RGB ``(H, W, 3)`` uint8 image as a ``data:`` URI."""
    ok, buf = cv2.imencode(fmt, np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as {fmt}")
    mime = "image/png" if fmt == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.tobytes()).decode("ascii")


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def svg_plot(t: list[float], series: dict[str, list[float]], title: str, ylabel: str, hlines: dict[str, float] = (),
             width: int = 520, height: int = 220) -> str:
    """A line plot as inline SVG: ``series`` (name -> values over ``t``) with dashed ``hlines``
    (name -> y), axes, ticks and a legend."""
    hlines = dict(hlines)
    left, right, top, bottom = 62, 10, 24, 34
    pw, ph = width - left - right, height - top - bottom
    t0, t1 = (min(t), max(t)) if t else (0.0, 1.0)
    t1 = t1 if t1 > t0 else t0 + 1.0
    ys = [v for vals in series.values() for v in vals] + list(hlines.values()) + [0.0]
    y1 = max(ys) * 1.08 or 1.0

    def x(v):
        return left + (v - t0) / (t1 - t0) * pw

    def y(v):
        return top + ph - v / y1 * ph

    e = html.escape
    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{e(title)}" font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="14" font-size="12" font-weight="bold">{e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for k in range(5):
        v = y1 * k / 4
        out.append(f'<line x1="{left - 3}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 5}" y="{y(v) + 3:.1f}" text-anchor="end">{v:,.0f}</text>')
    for k in range(5):
        v = t0 + (t1 - t0) * k / 4
        out.append(f'<text x="{x(v):.1f}" y="{top + ph + 13}" text-anchor="middle">{v:.1f}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">stream time (s)</text>')
    out.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {top + ph / 2})">'
               f'{e(ylabel)}</text>')
    for i, (name, vals) in enumerate(series.items()):
        c = _COLOURS[i % len(_COLOURS)]
        pts = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(t, vals))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        out.append(f'<text x="{left + 6}" y="{top + 12 + 12 * i}" fill="{c}">{e(name)}</text>')
    for j, (name, v) in enumerate(hlines.items()):
        c = _COLOURS[j % len(_COLOURS)]
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="{c}" '
                   f'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{left + pw - 4}" y="{y(v) - 3:.1f}" text-anchor="end" fill="{c}">{e(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _use_matplotlib(plotter: str) -> bool:
    if plotter == "svg":
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if plotter == "matplotlib":
            raise ValueError("plotter='matplotlib' but matplotlib is not installed (pip install matplotlib, "
                             "or use plotter='svg')") from None
        return False
    return True


def _occupancy_plots(c: ReportCollector) -> list[str]:
    """Per memory: tokens held over time with its capacity, and the bytes they take (tokens x
    the bytes of one token slot). SVG: one plot per memory; matplotlib: one figure, a panel
    per memory (bytes on the right axis)."""
    if not c.trace.items:
        return []
    t = [s[0] for s in c.trace.items]
    mems = []
    for name, (_, cap, nbytes) in c.trace.items[-1][1].items():
        tokens = [s[1][name][0] if name in s[1] else 0 for s in c.trace.items]
        mems.append((name, tokens, cap, nbytes, nbytes / max(cap, 1)))
    if not _use_matplotlib(c.plotter):
        return [svg_plot(t, {"tokens held": tokens}, f"{name}: {cap:,} tokens, {_fmt_bytes(nbytes)} allocated",
                         "tokens", {"capacity": cap})
                + f'<div class="note">bytes held = tokens x {_fmt_bytes(per)}; at the end {_fmt_bytes(tokens[-1] * per)}</div>'
                for name, tokens, cap, nbytes, per in mems]
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.0 * len(mems) + 0.4), dpi=90, layout="constrained")
    for ax, (name, tokens, cap, nbytes, per) in zip(fig.subplots(len(mems), 1, squeeze=False)[:, 0], mems):
        ax.plot(t, tokens, label="tokens held", color=_COLOURS[0])
        ax.axhline(cap, ls="--", color=_COLOURS[1], label="capacity")
        ax.set_ylim(0, max(cap, max(tokens)) * 1.08 or 1)
        ax.set_ylabel("tokens")
        ax.set_title(f"{name}: {cap:,} tokens, {_fmt_bytes(nbytes)} allocated", fontsize=9)
        sec = ax.secondary_yaxis("right", functions=(lambda v, p=per: v * p / 1e3, lambda b, p=per: b * 1e3 / p))
        sec.set_ylabel("kB held")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("stream time (s)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    alt = "memory occupancy: " + ", ".join(m[0] for m in mems)
    return [f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">']


# ---------------------------------------------------------------------------- the page
_CSS = """
body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:6px 0;font-size:13px}td,th{border:1px solid #ddd;padding:4px 7px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.ev{display:inline-block;margin:2px 4px;text-align:center;font-size:11px}
.ev img{display:block;border:1px solid #999}.right{color:#1a7f37}.wrong{color:#c0392b}.note{font-size:12px;color:#555}
.plots{display:flex;flex-wrap:wrap;gap:12px}td.t{white-space:nowrap}
"""


def _answers_html(c: ReportCollector) -> str:
    e = html.escape
    if not c.answers:
        return "<p>No question was asked in this run.</p>"
    rows = ["<tr><th>at</th><th>question</th><th>answer</th><th>evidence (stored frames that weighed most)</th></tr>"]
    for rec, thumbs in c.answers:
        if rec.get("refused"):
            said = f"<i>refused</i>: {e(str(rec.get('reason', '')))}"
        else:
            said = f"<b>{e(str(rec['answer']))}</b> (confidence {rec['confidence']:.2f})"
            opts = rec.get("candidates") or []
            if opts:
                said += f'<div class="note">options: {e(", ".join(map(str, opts)))}</div>'
        if "truth" in rec:
            ok = rec.get("correct")
            said += f'<div class="{"right" if ok else "wrong"}">truth: {e(str(rec["truth"]))} ' \
                    f'({"right" if ok else "wrong"})</div>'
        ev = []
        for i, evd in enumerate(rec.get("evidence", [])):
            th = thumbs[i] if i < len(thumbs) else None
            img = (f'<img alt="frame {evd["frame_index"]}" src="{image_data_uri(th, ".jpg")}">' if th is not None
                   else '<div class="note">(no thumbnail)</div>')
            weight = f" · weight {evd['weight']:.2f}" if "weight" in evd else ""
            ev.append(f'<span class="ev">{img}frame {evd["frame_index"]}<br>{evd["timestamp"]:.2f} s{weight}</span>')
        rows.append(f"<tr><td class=\"t\">{rec['at']:.2f} s</td><td>{e(rec['question'])}</td><td>{said}</td>"
                    f"<td>{''.join(ev) or '-'}</td></tr>")
    graded = [rec["correct"] for rec, _ in c.answers if "correct" in rec]
    head = f"<p>{len(c.answers)} answers" + (f"; {sum(graded)} of {len(graded)} right against StreamWorld's ground truth"
                                           if graded else "") + ".</p>"
    return head + "<table>" + "\n".join(rows) + "</table>"


def _detections_html(c: ReportCollector) -> str:
    e = html.escape
    if not c.detection_frames:
        return "<p>No detection head ran.</p>"
    total = sum(c.class_counts.values())
    rows = ["<tr><th>class</th><th>detections</th><th>frames with it</th></tr>"]
    for name, n in c.class_counts.most_common():
        rows.append(f"<tr><td>{e(name)}</td><td>{n}</td><td>{c.class_frames[name]} / {c.detection_frames}</td></tr>")
    out = [f"<p>{total} detections over {c.detection_frames} frames "
           f"({total / max(1, c.detection_frames):.2f} per frame).</p>", "<table>" + "\n".join(rows) + "</table>"]
    if c.records.items:
        rows = ["<tr><th>frame</th><th>time</th><th>detections (class, confidence, box x1 y1 x2 y2)</th></tr>"]
        for rec in c.records.items:
            dets = "; ".join(f"{e(str(d.get('class_name')))} {d['confidence']:.2f} "
                             f"[{' '.join(f'{v:.0f}' for v in d['xyxy'])}]" for d in rec["detections"])
            rows.append(f"<tr><td>{rec['frame']}</td><td>{rec['timestamp']:.2f} s</td><td>{dets}</td></tr>")
        out.append(f"<p class=\"note\">A sample of {len(c.records.items)} frames with detections, spread over the "
                   f"stream (every record is in detections.jsonl).</p><table>" + "\n".join(rows) + "</table>")
    return "\n".join(out)


def _run_html(summary: dict) -> str:
    e = html.escape
    keys = [("source", "source"), ("frames processed", "frames_processed"), ("frames dropped", "frames_dropped"),
            ("wall time (s)", "wall_s"), ("frames per second", "fps"), ("latency p50 (ms)", "latency_ms_p50"),
            ("latency p95 (ms)", "latency_ms_p95"), ("error", "error")]
    rows = []
    for label, k in keys:
        v = summary.get(k)
        if v is None:
            continue
        rows.append(f"<tr><th>{label}</th><td>{e(f'{v:.2f}' if isinstance(v, float) else str(v))}</td></tr>")
    for note in summary.get("notes", []):
        rows.append(f"<tr><th>note</th><td>{e(str(note))}</td></tr>")
    for name, path in (summary.get("outputs") or {}).items():
        if path:
            rows.append(f"<tr><th>{e(name)}</th><td><code>{e(Path(path).name)}</code></td></tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def _memory_table(c: ReportCollector) -> str:
    if not c.trace.items:
        return ""
    t, last = c.trace.items[-1]
    rows = ["<tr><th>memory</th><th>tokens held</th><th>capacity</th><th>allocated</th></tr>"]
    for name, (tok, cap, nb) in last.items():
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{tok:,}</td><td>{cap:,}</td><td>{_fmt_bytes(nb)}</td></tr>")
    return f"<p>At the end of the stream ({t:.2f} s):</p><table>" + "\n".join(rows) + "</table>"


def write_report(path: str | Path, summary: dict, collector: ReportCollector, title: str = "streammem run") -> Path:
    """Write the self-contained HTML report to ``path`` (atomically) and return it."""
    path = Path(path)
    plots = _occupancy_plots(collector)
    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Run</h2>", _run_html(summary),
            "<h2>Answers</h2>", _answers_html(collector),
            "<h2>Detections</h2>", _detections_html(collector),
            "<h2>Memory occupancy</h2>", _memory_table(collector),
            '<div class="plots">' + "\n".join(f"<div>{p}</div>" for p in plots) + "</div>"]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
