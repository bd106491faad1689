"""``streammem batch``: a run killed midway and started again finishes every video exactly
once with a correct manifest; a corrupt video among good ones is recorded and the rest go on;
Ray Data on a local two-CPU Ray writes the same detections and answers as the process pool.

The videos are tiny (96x72, 16 to 40 frames), each a different ffmpeg test pattern so that
outputs swapped between videos would show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streammem.cli import app
from streammem.io import ffmpeg_exe
from streammem.pipelines.jobs.batch import assign_names, read_manifest, run_batch

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = {"annotated.mp4", "frames.jsonl", "detections.jsonl", "answers.jsonl", "memory.safetensors", "summary.json"}
GOOD = ("a", "b", "c")


def _video(path: Path, pattern: str, frames: int) -> None:
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size=96x72:rate=8",
                    "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """a, b, c: good (b the longest, so a run is still busy with it after a is done);
    broken.mp4: text. In path order: a, b, broken, c."""
    root = tmp_path_factory.mktemp("batch_videos")
    _video(root / "a.mp4", "testsrc2", 16)
    _video(root / "b.mp4", "mandelbrot", 40)
    _video(root / "c.mp4", "smptebars", 16)
    (root / "broken.mp4").write_text("not a video\n" * 20)
    return root


def _lines(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pool_run(videos, tmp_path_factory):
    """The CLI on a one-process pool, killed (SIGKILL, the whole process group) as soon as the
    manifest records its first finished video, then the same command again to its end.
    Returns (out, the manifest's records at the kill, the second run's CliRunner result)."""
    out = tmp_path_factory.mktemp("pool") / "out"
    args = ["batch", str(videos / "*.mp4"), "--out", str(out), "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", "from streammem.cli import app; app()", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if manifest.is_file() and any(r["status"] == "done" for r in read_manifest(manifest).values()):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1].decode()
    at_kill = read_manifest(manifest)
    assert at_kill, f"the first run recorded nothing before it ended: {err}"
    result = CliRunner().invoke(app, args)
    return out, at_kill, result


def test_a_killed_run_started_again_finishes_every_video_once(videos, pool_run):
    out, at_kill, result = pool_run
    done_at_kill = {Path(v).stem for v, r in at_kill.items() if r["status"] == "done"}
    assert done_at_kill and len(done_at_kill) < len(GOOD), f"the kill came too late to test anything: {done_at_kill}"
    assert result.exit_code == 1, result.output  # broken.mp4 failed
    assert f"{len(done_at_kill)} skipped" in result.output, result.output
    records = _lines(out / "manifest.jsonl")
    assert sorted(Path(r["video"]).name for r in records) == ["a.mp4", "b.mp4", "broken.mp4", "c.mp4"]  # once each
    by_name = {Path(r["video"]).stem: r for r in records}
    for stem in done_at_kill:  # finished before the kill: skipped, not processed again
        assert by_name[stem] == at_kill[str(videos / f"{stem}.mp4")]
    for stem in GOOD:
        rec = by_name[stem]
        assert rec["status"] == "done" and rec["error"] is None and rec["name"] == stem
        assert rec["frames"] == (40 if stem == "b" else 16) and rec["wall_s"] > 0
        assert {Path(p).name for p in rec["outputs"].values()} == OUTPUTS
        assert all((out / p).is_file() for p in rec["outputs"].values())
        assert {p.name for p in (out / stem).iterdir()} == OUTPUTS  # no .partial left by the kill, nothing twice
        assert len((out / stem / "detections.jsonl").read_text().splitlines()) == rec["frames"]
        assert len((out / stem / "answers.jsonl").read_text().splitlines()) == 4  # 2 questions x 2 times
    assert {p.name for p in out.iterdir()} == {*GOOD, "manifest.jsonl", ".batch.lock"}


def test_a_corrupt_video_is_recorded_and_the_rest_go_on(pool_run):
    out, _, result = pool_run
    records = {Path(r["video"]).name: r for r in _lines(out / "manifest.jsonl")}
    bad = records["broken.mp4"]
    assert bad["status"] == "failed" and bad["outputs"] == {}
    assert "broken.mp4" in bad["error"] and "not a video" in bad["error"], bad["error"]
    assert records["c.mp4"]["status"] == "done"  # the video after it in the queue
    assert "failed: " in result.output and "broken.mp4" in result.output
    assert "1 of 4 videos failed" in result.output


def test_the_ray_path_writes_what_the_pool_wrote(videos, pool_run, tmp_path):
    pool_out = pool_run[0]
    res = run_batch(str(videos / "*.mp4"), tmp_path / "ray", ray=True, workers=2, progress=False)
    assert res.executor.startswith("Ray Data") and (res.done, res.skipped, res.failed) == (3, 0, 1)
    assert res.exit_code == 1 and "broken.mp4" in res.failures[0]["error"]
    assert len(_lines(res.manifest)) == 4
    for stem in GOOD:
        for name in ("detections.jsonl", "answers.jsonl"):
            assert (tmp_path / "ray" / stem / name).read_text() == (pool_out / stem / name).read_text(), (stem, name)


def test_names_are_safe_unique_and_kept_across_runs():
    vids = [Path("/v/a/x.mp4"), Path("/v/b/x.mp4"), Path("/v/y z!.mp4"), Path("/v/manifest.jsonl.mp4")]
    names = assign_names(vids)
    assert len(set(names.values())) == 4 and names[Path("/v/y z!.mp4")] == "y_z"
    assert names[Path("/v/a/x.mp4")].startswith("x-") and names[Path("/v/manifest.jsonl.mp4")] != "manifest.jsonl"
    # a video the manifest knows keeps its folder even when a new video takes its stem
    again = assign_names([Path("/v/c/x.mp4"), *vids], known={"/v/a/x.mp4": names[Path("/v/a/x.mp4")]})
    assert again[Path("/v/a/x.mp4")] == names[Path("/v/a/x.mp4")]
    assert again[Path("/v/c/x.mp4")] != again[Path("/v/a/x.mp4")]


@pytest.mark.parametrize("args, says", [
    (["{videos}/*.avi"], "no video matches"),
    (["{videos}/a.mp4", "--task", "detect,segment"], "--task must be"),
    (["{videos}/a.mp4", "--workers", "-1"], "--workers must be"),
    (["{videos}/a.mp4", "--workers", "0", "--ray"], "exclude each other"),
    (["{videos}/a.mp4", "--stride", "0"], "stride must be"),
])
def test_bad_options_exit_2_and_write_nothing(videos, tmp_path, args, says):
    result = CliRunner().invoke(app, ["batch", *(a.format(videos=videos) for a in args), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_a_rerun_redoes_what_lost_an_output_and_retries_what_failed(videos, pool_run):
    """Runs last: it changes the pool run's folder (c is made again, the same)."""
    out = pool_run[0]
    before = {p: (out / p).read_text() for p in ("a/detections.jsonl", "c/detections.jsonl", "c/answers.jsonl")}
    a_record = read_manifest(out / "manifest.jsonl")[str(videos / "a.mp4")]
    (out / "c" / "detections.jsonl").unlink()
    res = run_batch([videos], out, workers=0, progress=False)  # a folder: its videos; in this process
    assert (res.done, res.skipped, res.failed) == (1, 2, 1)  # c again; a and b skipped; broken retried
    lines = _lines(out / "manifest.jsonl")
    records = {Path(r["video"]).stem: r for r in lines}
    assert len(lines) == len(records) == 4 and records["a"] == a_record and records["c"]["status"] == "done"
    assert {p: (out / p).read_text() for p in before} == before  # the same outputs in this process as in the pool
