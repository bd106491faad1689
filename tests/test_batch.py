"""``streammem batch``: a run killed midway and started again finishes every video exactly
once with a correct manifest; a corrupt video among good ones is recorded and the rest go on;
Ray Data on a local two-CPU Ray writes the same detections and answers as the other executors.

The videos are tiny (64x48, 10 frames), each a different ffmpeg test pattern so that outputs
swapped between videos would show; in path order: a (good), broken (text), c (good).

The videos and the scenario are made once per test session (under pytest-xdist once for all
workers, behind a file lock in the session's shared temporary folder). The scenario: the CLI
in one process (``--workers 0``) is killed with SIGKILL part way through c, after a was done
and broken failed; then the same command on a one-process pool (``--workers 1``) finishes it.
So a's outputs come from the killed in-process run and c's from the pool, and the Ray run is
compared with both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streammem.cli import app
from streammem.io import ffmpeg_exe
from streammem.pipelines.jobs.batch import assign_names, read_manifest, run_batch

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = {"annotated.mp4", "frames.jsonl", "detections.jsonl", "answers.jsonl", "memory.safetensors", "summary.json"}
GOOD = ("a", "c")
FRAMES = 10
KILL_AT_STEP = FRAMES + 4  # the 5th frame of c (broken.mp4 has no frame to step)

# the killed run: the CLI in this process (--workers 0), SIGKILLed by its own frame counter
_KILLED_RUN = f"""
import os, signal, sys
from streammem.pipelines.jobs import main
step, calls = main.MainPipeline.step, [0]
def step_then_die(self, frame):
    calls[0] += 1
    if calls[0] == {KILL_AT_STEP}:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, frame)
main.MainPipeline.step = step_then_die
from streammem.cli import app
app(sys.argv[1:], prog_name="streammem")
"""


def _video(path: Path, pattern: str) -> None:
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size=64x48:rate=8",
                    "-frames:v", str(FRAMES), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)


def _lines(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _make_videos(root: Path) -> dict:
    videos = root / "videos"
    videos.mkdir()
    _video(videos / "a.mp4", "testsrc2")
    (videos / "broken.mp4").write_text("not a video\n" * 20)
    _video(videos / "c.mp4", "smptebars")
    return {"videos": str(videos)}


def _make_scenario(root: Path, videos: Path) -> dict:
    out = root / "pool"
    args = ["batch", str(videos / "*.mp4"), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, *args, "--workers", "0"], env=env,
                            capture_output=True, text=True, timeout=240)
    at_kill = read_manifest(out / "manifest.jsonl")
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    result = CliRunner().invoke(app, [*args, "--workers", "1"])
    return {"videos": str(videos), "out": str(out), "killed_rc": killed.returncode, "killed_err": killed.stderr,
            "at_kill": at_kill, "left_at_kill": left, "exit_code": result.exit_code, "output": result.output}


def _once(name: str, make, tmp_path_factory, request) -> dict:
    """``make(folder)``'s record, made once per session: under xdist the first worker to get
    here makes it (behind a file lock in the session's folder that its workers share), the
    others read it."""
    if not hasattr(request.config, "workerinput"):  # no xdist: this process is the only one
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            root = shared / name
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            record.write_text(json.dumps(make(root)))
        return json.loads(record.read_text())


@pytest.fixture(scope="module")
def videos(tmp_path_factory, request) -> Path:
    """a (good), broken (text), c (good)."""
    return Path(_once("batch_videos", _make_videos, tmp_path_factory, request)["videos"])


@pytest.fixture(scope="module")
def scenario(videos, tmp_path_factory, request) -> dict:
    """The killed-then-restarted run (see the module docstring)."""
    return _once("batch_scenario", lambda root: _make_scenario(root, videos), tmp_path_factory, request)


def test_a_killed_run_started_again_finishes_every_video_once(videos, scenario):
    out, at_kill = Path(scenario["out"]), scenario["at_kill"]
    assert scenario["killed_rc"] == -9, scenario["killed_err"]  # SIGKILL, part way through c
    assert {Path(v).name: r["status"] for v, r in at_kill.items()} == {"a.mp4": "done", "broken.mp4": "failed"}
    assert any(p.startswith("c/") for p in scenario["left_at_kill"]), scenario["left_at_kill"]  # c was under way
    assert scenario["exit_code"] == 1, scenario["output"]  # broken.mp4 failed again
    assert "1 done, 1 skipped" in scenario["output"], scenario["output"]  # a skipped, c done
    records = _lines(out / "manifest.jsonl")
    assert sorted(Path(r["video"]).name for r in records) == ["a.mp4", "broken.mp4", "c.mp4"]  # once each
    by_name = {Path(r["video"]).stem: r for r in records}
    assert by_name["a"] == at_kill[str(videos / "a.mp4")]  # finished before the kill: skipped, not redone
    assert by_name["c"]["worker"] != by_name["a"]["worker"]  # c by the pool's process
    for stem in GOOD:
        rec = by_name[stem]
        assert rec["status"] == "done" and rec["error"] is None and rec["name"] == stem
        assert rec["frames"] == FRAMES and rec["wall_s"] > 0
        assert {Path(p).name for p in rec["outputs"].values()} == OUTPUTS
        assert all((out / p).is_file() for p in rec["outputs"].values())
        assert {p.name for p in (out / stem).iterdir()} == OUTPUTS  # no .partial left by the kill, nothing twice
        assert len((out / stem / "detections.jsonl").read_text().splitlines()) == FRAMES
        assert len((out / stem / "answers.jsonl").read_text().splitlines()) == 4  # 2 questions x 2 times
    assert {p.name for p in out.iterdir()} == {*GOOD, "manifest.jsonl", ".batch.lock"}


def test_a_corrupt_video_is_recorded_and_the_rest_go_on(scenario):
    records = {Path(r["video"]).name: r for r in _lines(Path(scenario["out"]) / "manifest.jsonl")}
    bad = records["broken.mp4"]
    assert bad["status"] == "failed" and bad["outputs"] == {}
    assert "broken.mp4" in bad["error"] and "not a video" in bad["error"], bad["error"]
    assert records["c.mp4"]["status"] == "done"  # the video after it in the queue
    assert "failed: " in scenario["output"] and "broken.mp4" in scenario["output"]
    assert "1 of 3 videos failed" in scenario["output"]
    assert not (Path(scenario["out"]) / "broken").exists()


def test_the_ray_path_writes_what_the_pool_wrote(videos, tmp_path, monkeypatch, request):
    """Ray Data on a local Ray of two CPUs, one actor (one process loads the heads); the
    scenario is read after the Ray run (under xdist another worker may be making it meanwhile)."""
    import ray

    # the local Ray's workers inherit this environment: they import this checkout's streammem
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        assert ray.cluster_resources()["CPU"] == 2
        res = run_batch(str(videos / "*.mp4"), tmp_path / "ray", ray=True, workers=1, progress=False)
    finally:
        ray.shutdown()
    pool_out = Path(request.getfixturevalue("scenario")["out"])
    assert res.executor.startswith("Ray Data") and (res.done, res.skipped, res.failed) == (2, 0, 1)
    assert res.exit_code == 1 and "broken.mp4" in res.failures[0]["error"]
    assert len(_lines(res.manifest)) == 3
    assert {r["worker"] for r in res.records if r["status"] == "done"}.isdisjoint(
        {r["worker"] for r in _lines(pool_out / "manifest.jsonl")})  # another process did them
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
def test_bad_options_exit_2_and_write_nothing(tmp_path, args, says):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"")  # never opened: the options fail first
    result = CliRunner().invoke(app, ["batch", *(a.format(videos=videos) for a in args), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_a_rerun_redoes_what_lost_an_output_and_retries_what_failed(videos, scenario, tmp_path):
    """On a copy of the scenario's output folder (the other tests read the original)."""
    out = tmp_path / "out"
    shutil.copytree(scenario["out"], out)
    with contextlib.suppress(FileNotFoundError):
        (out / ".batch.lock").unlink()
    before = {p: (out / p).read_text() for p in ("a/detections.jsonl", "c/detections.jsonl", "c/answers.jsonl")}
    a_record = read_manifest(out / "manifest.jsonl")[str(videos / "a.mp4")]
    (out / "c" / "detections.jsonl").unlink()
    res = run_batch([videos], out, workers=0, progress=False)  # a folder: its videos; in this process
    assert (res.done, res.skipped, res.failed) == (1, 1, 1)  # c again; a skipped; broken retried
    lines = _lines(out / "manifest.jsonl")
    records = {Path(r["video"]).stem: r for r in lines}
    assert len(lines) == len(records) == 3 and records["a"] == a_record and records["c"]["status"] == "done"
    assert {p: (out / p).read_text() for p in before} == before  # the same outputs in this process as in the pool
