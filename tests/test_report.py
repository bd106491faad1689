"""The main job's report: one self-contained HTML file with every answer and a thumbnail per
evidence frame, the detection table and the memories' occupancy plots."""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter

import numpy as np
import pytest

from streammem.memory import PyramidMemory
from streammem.pipelines.jobs import build_detection_head, run_main_job
from streammem.pipelines.jobs.report import ReportCollector, write_report
from streammem.pipelines.qa import load_default_qa
from streammem.types import Answer

EXTERNAL = re.compile(r"""(?:src|href|action|poster)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""",
                      re.I)


def test_the_main_job_writes_a_self_contained_report(tmp_path):
    qa = load_default_qa(keep_thumbnails=True)
    questions = [("Is there a cat in view now?", None, 1.0), ("Is there a cup in view now?", None, 2.5),
                 ("Where in the frame is the cup now?", ["top left", "top right", "bottom left", "bottom right"], 2.5)]
    for q, c, at in questions:
        qa.schedule(q, c, at)
    res = run_main_job("world:seed=0,preset=medium,seconds=3,fps=8,size=96", tmp_path / "out", progress=False,
                       heads=[build_detection_head("small"), qa], report=ReportCollector(plotter="svg"))
    path = tmp_path / "out" / "report.html"
    assert res.summary["outputs"]["report"] == str(path) and path.is_file()
    page = path.read_text(encoding="utf-8")
    # self-contained: no external asset or link, no script
    assert not EXTERNAL.search(page) and "<script" not in page and "<link" not in page
    # every answer, with one thumbnail per evidence frame and its timestamp
    answers = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == [q for q, _, _ in questions]
    for a in answers:
        assert html.escape(a["question"]) in page and f"<b>{html.escape(a['answer'])}</b>" in page
        for e in a["evidence"]:
            assert f'<img alt="frame {e["frame_index"]}" src="data:image/jpeg;base64,' in page
            assert f'frame {e["frame_index"]}<br>{e["timestamp"]:.2f} s' in page
    thumbs = re.findall(r'<span class="ev"><img alt="frame \d+" src="data:image/jpeg;base64,[A-Za-z0-9+/=]+">', page)
    assert len(thumbs) == sum(len(a["evidence"]) for a in answers) > 0
    # the detection table: each class with its count
    counts = Counter(d["class_name"] for x in (tmp_path / "out" / "detections.jsonl").read_text().splitlines()
                     for d in json.loads(x)["detections"])
    assert counts
    for name, n in counts.items():
        assert f"<tr><td>{name}</td><td>{n}</td>" in page
    # an occupancy plot per memory
    for name in ("qa.memory", "detection.instance_memory", "detection.pixel_memory"):
        assert re.search(rf'<svg[^>]*aria-label="{re.escape(name)}: ', page), name


def test_the_svg_plots_and_evidence_without_thumbnails():
    """Without matplotlib (plotter="svg"): an inline SVG per memory, one point per sample."""
    c = ReportCollector(plotter="svg", max_points=8)
    mem = PyramidMemory.from_preset("ovbench", dim=8)
    for i in range(20):
        c.sample(i / 4, {"qa.memory": mem})
    assert len(c.trace.items) <= 8 and c.trace.items[0][0] == 0.0  # thinned, spread from the start
    a = Answer(index=0, letter="A", text="yes", confidence=0.9, probs=[0.9, 0.1],
               evidence=[{"frame_index": 3, "timestamp": 0.75, "weight": 1.0, "thumbnail": np.zeros((8, 8, 3), np.uint8)}])
    rec = {"at": 1.0, "question": "Is it <red>?", "candidates": ["yes", "no"], "answer": "yes", "confidence": 0.9,
           "evidence": [{"frame_index": 3, "timestamp": 0.75, "weight": 1.0}]}
    c.take(None, [(object(), a)], [rec])
    c.take(None, [], [{**rec, "question": "Is it blue?"}])  # no output pairs: evidence without thumbnail
    import tempfile
    from pathlib import Path

    page = write_report(Path(tempfile.mkdtemp()) / "r.html", {"source": "x"}, c).read_text()
    svg = re.findall(r"<svg[^>]*>.*?</svg>", page, re.S)
    assert len(svg) == 1 and 'aria-label="qa.memory: 832 tokens' in svg[0]
    assert len(re.search(r'<polyline points="([^"]+)"', svg[0]).group(1).split()) == len(c.trace.items)
    assert "Is it &lt;red&gt;?" in page and page.count("data:image/jpeg;base64,") == 1 and "(no thumbnail)" in page
    with pytest.raises(ValueError, match="plotter"):
        ReportCollector(plotter="png")


def test_with_matplotlib_the_plots_are_one_embedded_png(tmp_path):
    """matplotlib comes with supervision, a dependency, so this is the default plotter."""
    c = ReportCollector(plotter="matplotlib")
    for i in range(5):
        c.sample(i / 4, {"a": PyramidMemory.from_preset("ovbench", dim=8), "b": PyramidMemory.from_preset("ovbench", dim=4)})
    page = write_report(tmp_path / "r.html", {}, c).read_text()
    img = re.findall(r'<img alt="memory occupancy: a, b" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(img) == 1 and base64.b64decode(img[0])[:8] == b"\x89PNG\r\n\x1a\n"
