"""Clean failure, command by command: a failure before anything is produced leaves nothing
behind (no folder the command made, no ``.partial``, no empty file) and exits 2; a failure
mid-stream keeps what was written and exits 1; no decord log line or internal jargon reaches
the user; ``train`` never defaults into the installed package.

Files are made here (ffmpeg) or by ``conftest.videos``: a truncated H.264 mp4 (frames, then an
error), one cut right after its index (opens, but no frame decodes), an audio-only file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import streammem
from streammem.cli import app, train_app
from streammem.cli.common import job_errors
from streammem.io import SinkError, SourceOpenError, ffmpeg_exe
from streammem.pipelines.jobs.base import OutputDir

QUESTION = "Is there a cat in view now?"


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def leftovers(root: Path) -> list[str]:
    """Every file and folder under ``root`` (relative), for 'nothing left' checks."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def no_partial_or_empty(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*.partial*")], leftovers(folder)
    assert not [p.name for p in folder.rglob("*") if p.is_file() and p.stat().st_size == 0], leftovers(folder)


@pytest.fixture(scope="module")
def broken(videos, tmp_path_factory) -> dict[str, Path]:
    """'no_frame': an H.264 mp4 cut just after its index (it opens; no frame decodes);
    'audio': an audio-only .m4a; 'truncated': conftest's truncated H.264 mp4."""
    root = tmp_path_factory.mktemp("broken")
    data = videos["h264_mp4"].read_bytes()
    mdat = data.index(b"mdat")  # +faststart: the index (moov) comes before the frames
    (root / "no_frame.mp4").write_bytes(data[: mdat + 64])
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac",
                    str(root / "audio.m4a")], check=True)
    return {"no_frame": root / "no_frame.mp4", "audio": root / "audio.m4a", "truncated": videos["truncated_h264_mp4"]}


# ---------------------------------------------------------------------- OutputDir
def test_output_dir_removes_only_what_it_created(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text("{}")  # an earlier run's file
    for target in (tmp_path / "a" / "b" / "c", tmp_path / "old"):
        with pytest.raises(RuntimeError):
            with OutputDir(target) as od:
                od.jsonl("frames.jsonl").write({"frame": 0})
                assert (target / "frames.jsonl.partial").is_file()
                raise RuntimeError("before the first frame")
    assert leftovers(tmp_path) == ["old", "old/summary.json"]
    assert (tmp_path / "old" / "summary.json").read_text() == "{}"


def test_output_dir_keeps_and_finishes_after_the_first_frame(tmp_path):
    with pytest.raises(RuntimeError):
        with OutputDir(tmp_path / "o") as od:
            w = od.jsonl("frames.jsonl")
            w.write({"frame": 0})
            od.keep()
            raise RuntimeError("mid-stream")
    assert leftovers(tmp_path) == ["o", "o/frames.jsonl"]
    assert json.loads((tmp_path / "o" / "frames.jsonl").read_text()) == {"frame": 0}


def test_output_dir_refuses_a_file_or_a_folder_it_cannot_make(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        OutputDir(tmp_path / "f").__enter__()
    with pytest.raises(ValueError, match="cannot create the output folder"):
        OutputDir(tmp_path / "f" / "out").__enter__()  # a file on the way
    assert leftovers(tmp_path) == ["f"]


@pytest.mark.parametrize("exc, code", [
    (ValueError("bad option"), 2), (SourceOpenError("v.mp4", "not a video"), 2), (FileNotFoundError("ck"), 2),
    (SinkError("ffmpeg stopped"), 1), (PermissionError("disk"), 1),
], ids=["value", "source", "missing-file", "sink", "os"])
def test_job_errors_exit_codes(exc, code):
    with pytest.raises(typer.Exit) as info:
        with job_errors():
            raise exc
    assert info.value.exit_code == code


def test_library_notices_go_to_the_log_not_the_terminal(capsys, caplog, monkeypatch):
    import logging
    import os

    from streammem.cli import common

    shown = []
    monkeypatch.setattr(common, "_show", lambda message, *a, **kw: shown.append(str(message)))
    with caplog.at_level(logging.DEBUG, logger="py.warnings"):
        common._show_source_warning(FutureWarning("`resume_download` is deprecated"), FutureWarning, "hub.py", 1)
        common._show_source_warning(UserWarning("weights missing: head.bias"), UserWarning, "hub.py", 2)
    err = capsys.readouterr().err
    assert "resume_download" not in err and "resume_download" in caplog.text
    assert shown == ["weights missing: head.bias"]  # a warning meant for the user is still shown
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        assert os.environ.get(var), var  # set (to "error" unless the user chose) before the libraries load


# ---------------------------------------------------------------------- before anything: exit 2, nothing left
STREAM_COMMANDS = {
    "run": lambda src, out: ["run", src, "--out", out, "--no-progress", "--no-qa"],
    "detect": lambda src, out: ["detect", src, "--out", out, "--no-progress", "--detector", "hog"],
    "ask": lambda src, out: ["ask", src, "--at", "0.5", QUESTION, "-o", out],
}


@pytest.mark.parametrize("command", list(STREAM_COMMANDS))
@pytest.mark.parametrize("kind", ["no_frame", "audio"])
def test_a_source_that_gives_no_frame_exits_2_and_leaves_nothing(broken, tmp_path, command, kind):
    res = cli(*STREAM_COMMANDS[command](broken[kind], tmp_path / "out" / "nested"))
    assert res.exit_code == 2, res.output
    assert str(broken[kind]) in res.output
    assert leftovers(tmp_path) == []  # not even the folders it made


def test_a_failure_before_the_first_frame_keeps_an_earlier_runs_files(broken, tmp_path):
    (tmp_path / "summary.json").write_text('{"earlier": true}')
    res = cli("detect", broken["no_frame"], "--out", tmp_path, "--detector", "hog", "--no-progress")
    assert res.exit_code == 2, res.output
    assert leftovers(tmp_path) == ["summary.json"] and "earlier" in (tmp_path / "summary.json").read_text()


# ---------------------------------------------------------------------- mid-stream: exit 1, kept
def test_run_and_detect_keep_their_outputs_after_a_mid_stream_error(broken, tmp_path):
    for command, files in (("run", {"annotated.mp4", "frames.jsonl", "detections.jsonl", "memory.safetensors",
                                    "summary.json", "report.html"}),
                           ("detect", {"annotated.mp4", "detections.jsonl", "summary.json"})):
        out = tmp_path / command
        res = cli(*STREAM_COMMANDS[command](broken["truncated"], out))
        assert res.exit_code == 1, res.output
        assert "truncated" in res.output and "everything before it was written" in res.output
        assert {p.name for p in out.iterdir()} == files
        no_partial_or_empty(out)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["frames_processed"] > 0 and "truncated" in str(summary["error"])


def test_ask_keeps_the_answers_due_before_a_mid_stream_error(broken, tmp_path):
    res = cli("ask", broken["truncated"], "--at", "0.5", "--at", "1.9", QUESTION, "-o", tmp_path / "o")
    assert res.exit_code == 1, res.output
    assert "truncated" in res.output and "the answers due before it are kept" in res.output
    first, last = [json.loads(x) for x in (tmp_path / "o" / "answers.jsonl").read_text().splitlines()]
    assert first["at"] == 0.5 and first["text"] in ("yes", "no") and first["evidence"]
    assert last["at"] == 1.9 and last["refused"] is True  # after the stream's last frame
    assert leftovers(tmp_path) == ["o", "o/answers.jsonl"]


def test_ask_writes_each_answer_when_it_is_due(monkeypatch, tmp_path):
    """A failure that is not a source error (here: one raised at the 13th frame) keeps the
    answers given before it."""
    from streammem.pipelines.qa import StreamingQAPipeline

    step, seen = StreamingQAPipeline.step, []

    def interrupted(self, frame):
        if len(seen) == 12:
            raise RuntimeError("the machine ran out of memory")
        seen.append(frame.index)
        return step(self, frame)

    monkeypatch.setattr(StreamingQAPipeline, "step", interrupted)
    res = cli("ask", "world:seed=3,size=64,fps=8", "--at", "0.5", "--at", "5", QUESTION, "-o", tmp_path)
    assert isinstance(res.exception, RuntimeError)
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["at"] for a in lines] == [0.5]
    no_partial_or_empty(tmp_path)


# ---------------------------------------------------------------------- generate and world export
@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    import torch

    from streammem.models.video_dit import CausalVideoDiT

    ck = tmp_path_factory.mktemp("gen") / "ck"
    torch.manual_seed(0)
    CausalVideoDiT(sample_size=16, patch_size=4, dim=32, num_layers=1, num_heads=2).save_pretrained(ck)
    return ck


def failing_after(monkeypatch, cls, name: str, n: int) -> None:
    """Make the generator ``cls.name`` raise RuntimeError after yielding ``n`` items."""
    original = getattr(cls, name)

    def gen(*a, **kw):
        for i, x in enumerate(original(*a, **kw)):
            if i == n:
                raise RuntimeError("out of memory")
            yield x

    monkeypatch.setattr(cls, name, gen)


@pytest.mark.parametrize("made", [0, 2])
def test_generate_failing_before_or_after_its_first_frame(monkeypatch, generator, tmp_path, made):
    from streammem.pipelines.generation import StreamingGenerationPipeline

    failing_after(monkeypatch, StreamingGenerationPipeline, "stream", made)
    out = tmp_path / "g" / "nested"
    res = cli("generate", "--scene", "1", "--actions", "RRRR", "--checkpoint", generator, "--steps", "1",
              "--out", out, "--no-progress")
    if made == 0:  # not one frame: the error is raised (a bug or the machine), nothing is left
        assert isinstance(res.exception, RuntimeError)
        assert leftovers(tmp_path) == []
        return
    assert res.exit_code == 1, res.output
    assert "generation stopped: RuntimeError: out of memory" in res.output
    assert {p.name for p in out.iterdir()} == {"generated.mp4", "generation.jsonl", "summary.json"}
    assert len((out / "generation.jsonl").read_text().splitlines()) == made
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_generated"] == made and "out of memory" in summary["error"]
    no_partial_or_empty(out)


def test_world_export_bad_option_and_failure_part_way(monkeypatch, tmp_path):
    res = cli("world", "export", "--out", tmp_path / "w", "--preset", "nope", "--minutes", "0.05")
    assert res.exit_code == 2 and "preset must be one of" in res.output
    assert leftovers(tmp_path) == []

    import streammem.cli.world as world_cli

    gt, calls = world_cli.gt_to_json, []

    def failing(frame):
        calls.append(frame.index)
        if len(calls) == fail_at:
            raise RuntimeError("disk full")
        return gt(frame)

    monkeypatch.setattr(world_cli, "gt_to_json", failing)
    fail_at = 1  # the first frame: nothing is left
    res = cli("world", "export", "--out", tmp_path / "w", "--minutes", "0.05", "--size", "64")
    assert isinstance(res.exception, RuntimeError) and leftovers(tmp_path) == []
    calls.clear()
    fail_at = 4  # part-way: the frames before it are kept, finished
    res = cli("world", "export", "--out", tmp_path / "w", "--minutes", "0.05", "--size", "64")
    assert isinstance(res.exception, RuntimeError)
    assert leftovers(tmp_path / "w") == ["ground_truth.jsonl", "video.mp4"]
    assert len((tmp_path / "w" / "ground_truth.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------------- the exit-code convention
@pytest.mark.parametrize("args, says", [
    (["info", "{missing}"], "no such file"),
    (["info", "{audio}"], "no video stream"),
    (["run", "{missing}", "--out", "{out}"], "no such file"),
    (["run", "world:seed=1,frames=2,size=64", "--out", "{out}", "--retention", "newest"], "retention must be one of"),
    (["detect", "world:seed=1,frames=2,size=64", "--out", "{out}", "--memory", "nope"], "--memory must be one of"),
    (["ask", "{missing}", "--at", "1", QUESTION, "-o", "{out}"], "no such file"),
    (["generate", "--scene", "1", "--actions", "RX", "--out", "{out}", "--checkpoint", "{generator}"],
     "unknown action letters"),
    (["world", "export", "--out", "{out}", "--fps", "0"], "fps must be > 0"),
    (["train", "detector", "--minutes", "-1", "--out", "{out}"], "minutes"),
    (["train", "generator", "--minutes", "-1", "--out", "{out}"], "minutes"),
    (["train", "answerer", "--pool", "max", "--out", "{out}"], "--pool"),
], ids=["info-missing", "info-audio", "run-missing", "run-option", "detect-option", "ask-missing", "generate-option",
        "world-export-option", "train-detector", "train-generator", "train-answerer"])
def test_bad_input_or_options_exit_2_and_write_nothing(broken, generator, tmp_path, args, says):
    fill = {"missing": tmp_path / "missing.mp4", "audio": broken["audio"], "out": tmp_path / "out",
            "generator": generator}
    res = cli(*[a.format(**{k: str(v) for k, v in fill.items()}) for a in args])
    assert res.exit_code == 2, res.output
    assert says in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_done_exits_0(tmp_path):
    res = cli("detect", "world:seed=1,frames=3,size=64", "--out", tmp_path, "--detector", "hog", "--no-progress")
    assert res.exit_code == 0, res.output
    assert {p.name for p in tmp_path.iterdir()} == {"annotated.mp4", "detections.jsonl", "summary.json"}


# ---------------------------------------------------------------------- what reaches the terminal
def test_no_decord_log_line_or_jargon_reaches_the_terminal(broken, videos):
    """Run in a subprocess: decord's C++ log lines go to the process's stderr directly."""
    script = ("import sys; from typer.testing import CliRunner; from streammem.cli import app\n"
              "for path in sys.argv[1:]:\n"
              "    for backend in ('auto', 'decord'):\n"
              "        r = CliRunner().invoke(app, ['detect', path, '--backend', backend, '--detector', 'hog', "
              "'--out', '/nonexistent/never'])\n"
              "        print(r.exit_code, r.output.strip())\n")
    files = [broken["audio"], videos["text"], videos["unknown_codec"]]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, files)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # decord's "[hh:mm:ss] ...video_reader.cc:83: ERROR opening"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("2 error: ") for line in lines), proc.stdout
    for jargon in ("Check failed", "st_nb", ".cc:", "wanted index"):
        assert jargon not in proc.stdout, proc.stdout
    audio = [line for line in lines if str(broken["audio"]) in line]
    assert all("no video stream" in line for line in audio) and "only audio" in audio[0]


# ---------------------------------------------------------------------- train defaults
def test_no_train_command_defaults_into_the_installed_package(tmp_path, monkeypatch):
    package = Path(streammem.__file__).resolve().parent
    monkeypatch.chdir(tmp_path)
    group = typer.main.get_command(train_app)
    checked = []
    for name, cmd in group.commands.items():
        for param in cmd.params:
            if param.name in ("out", "out_dir", "cache_dir") and param.default not in (None, ...):
                resolved = Path(str(param.default)).expanduser().resolve()
                assert package not in resolved.parents and resolved != package, (name, param.name, resolved)
                checked.append(f"{name} --{param.name}")
    assert {"detector --out", "answerer --out", "encoder --out", "generator --out"} <= set(checked), checked
