"""The CLI's option defaults live in the config dataclasses: every option named after a config
field has that field's default (exceptions listed, with the reason)."""

import dataclasses

import pytest
import typer.main

from streammem.cli import app
from streammem.pipelines.detection import DetectionConfig
from streammem.pipelines.generation import GenerationConfig
from streammem.pipelines.qa import QAConfig
from streammem.train.answerer import AnswererTrainConfig
from streammem.train.detector import TrainConfig
from streammem.train.generator import TrainConfig as GeneratorTrainConfig
from streammem.train.grid_encoder import EncoderTrainConfig

#: (command path, config class, options deliberately not the field's default: why)
CHECKED = [
    (("run",), QAConfig, {}),
    (("ask",), QAConfig, {}),
    (("webcam",), QAConfig, {}),
    (("detect",), DetectionConfig, {"score_threshold": "per detector (small 0.3, hog 0.0), see DEFAULT_THRESHOLDS",
                                    "image_size": "None: the detector's own"}),
    (("train", "detector"), TrainConfig, {"model": "JSON text on the command line",
                                          "resume": "the same None"}),
    (("train", "answerer"), AnswererTrainConfig, {"data": "a Path option", "init": "a Path option",
                                                  "log": "the same None"}),
    (("train", "encoder"), EncoderTrainConfig, {}),
    (("generate",), GenerationConfig, {}),
    (("train", "generator"), GeneratorTrainConfig, {}),
]


def command(path):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def mismatches(cmd, cls, exempt) -> tuple[list[str], list[str]]:
    """Options of ``cmd`` whose default differs from the same-named field of ``cls``, and those checked."""
    fields = field_defaults(cls)
    bad, checked = [], []
    for param in cmd.params:
        if param.name in fields and param.name not in exempt:
            checked.append(param.name)
            if param.default != fields[param.name]:
                bad.append(f"--{param.name.replace('_', '-')} defaults to {param.default!r}, "
                           f"{cls.__name__}.{param.name} to {fields[param.name]!r}")
    return bad, checked


@pytest.mark.parametrize("path,cls,exempt", CHECKED, ids=[" ".join(c[0]) for c in CHECKED])
def test_option_defaults_come_from_the_config(path, cls, exempt):
    bad, checked = mismatches(command(path), cls, exempt)
    assert not bad, f"streammem {' '.join(path)}: " + "; ".join(bad)
    assert checked, f"no option of streammem {' '.join(path)} is a field of {cls.__name__}"


def test_a_changed_default_is_caught():
    """The check can fail: an option whose default differs from its field is reported."""
    cmd = command(("detect",))
    param = next(p for p in cmd.params if p.name == "memory")
    param.default = "dual"
    bad, _ = mismatches(cmd, DetectionConfig, CHECKED[3][2])
    assert bad == ["--memory defaults to 'dual', DetectionConfig.memory to 'feature_bank'"]


def test_ask_returns_on_an_endless_source_and_bad_input_exits_2(tmp_path):
    from typer.testing import CliRunner

    # world:seed=77 without seconds/frames never ends: ask stops once its last question is answered
    res = CliRunner().invoke(app, ["ask", "world:seed=77,fps=8,size=64", "--at", "0.5", "--at", "1",
                                   "Is there a cat in view now?", "-c", "yes", "-c", "no", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.output.count("Is there a cat in view now?") == 2 and "2 answers ->" in res.output
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2
    res = CliRunner().invoke(app, ["ask", str(tmp_path / "missing.mp4"), "--at", "1", "q?", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such file" in res.output
    assert not (tmp_path / "o" / "answers.jsonl").exists()


def test_generate_writes_the_video_and_per_frame_records(tmp_path):
    import json

    import cv2
    import numpy as np
    import torch
    from typer.testing import CliRunner

    from streammem.models.video_dit import CausalVideoDiT

    torch.manual_seed(0)
    CausalVideoDiT(sample_size=16, patch_size=4, dim=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "ck")
    run = CliRunner().invoke
    res = run(app, ["generate", "--scene", "3", "--actions", "RRU", "--frames", "5", "-p", "clean", "-p", "hard",
                    "--checkpoint", str(tmp_path / "ck"), "--steps", "2", "--out", str(tmp_path / "g"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "5 frames in 3 chunks" in res.output
    lines = [json.loads(x) for x in (tmp_path / "g" / "generation.jsonl").read_text().splitlines()]
    assert [r["action"] for r in lines] == list("RRURR") and [r["prompt"] for r in lines] == ["clean"] * 2 + ["hard"] * 3
    assert [r["seed"] for r in lines] == [0, 0, 1, 1, 2] and lines[1]["pose"][0][3] == lines[0]["pose"][0][3] + 20
    cap = cv2.VideoCapture(str(tmp_path / "g" / "generated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6  # the start frame and 5 generated
    img = tmp_path / "start.png"
    cv2.imwrite(str(img), np.full((40, 30, 3), 90, np.uint8))
    res = run(app, ["generate", "--image", str(img), "--actions", "F", "--checkpoint", str(tmp_path / "ck"),
                    "--steps", "1", "--out", str(tmp_path / "i"), "--no-progress"])
    assert res.exit_code == 0 and "1 frames in 1 chunks" in res.output
    for args, message in ((["--actions", "RX"], "unknown action letters 'X'"), (["--frames", "0"], "--frames must be >= 1"),
                          (["--image", str(tmp_path / "nope.png"), "--scene", "1"], "exactly one of"),
                          (["--image", str(tmp_path / "g" / "summary.json")], "not a readable image")):
        base = ["generate", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "bad"), "--no-progress"]
        if "--image" not in args:
            base += ["--scene", "1"]
        res = run(app, base + args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    res = run(app, ["generate", "--scene", "1", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "bad"),
                    "-p", "clean", "-p", "sunset", "--no-progress"])  # every prompt is checked before writing
    assert res.exit_code == 2 and "sunset" in res.output
    assert not (tmp_path / "bad").exists()
    res = run(app, ["generate", "--scene", "1", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "train generator" in res.output


def test_the_command_line_starts_without_loading_the_generation_model_code():
    """``streammem --help`` and the reading commands do not import diffusers (several seconds);
    the generation commands import it when they run."""
    import subprocess
    import sys

    code = "import sys, streammem.cli; print(sorted(m for m in ('diffusers', 'streammem.models.video_dit') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
