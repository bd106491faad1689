"""The batch job (``streammem batch``): many videos, each through the main job's heads, on a
local process pool or on Ray Data.

One video is one unit of work, always processed whole by one worker, because the memories are
stateful and ordered within a video. Each worker loads the heads once (the shipped detector,
encoder and answerer) and resets them before every video (the heads reseed their samplers on
``reset``, so a video's outputs do not depend on which worker ran it or what it ran before).
Per video it runs :func:`~streammem.pipelines.jobs.main.run_main_job` into ``OUT/<name>/``:
``annotated.mp4``, ``frames.jsonl``, ``detections.jsonl`` (task ``detect``),
``answers.jsonl`` (task ``qa``: :func:`~streammem.pipelines.jobs.main.default_questions`,
"is there a person / a cat in view now?" at the middle and near the end), ``memory.safetensors``
and ``summary.json``, each file written under a temporary name and moved into place whole. The
main job's ``report.html`` is not written per video (its plots would cost about as much as
processing a short video; ``streammem run`` makes one for a single video).

``OUT/manifest.jsonl`` holds one line per video: its status (``done`` or ``failed``), timings,
outputs (relative to ``OUT``) and error. A line is appended (and flushed to disk) when a video
ends, so it is the commit point: a video without a ``done`` line is not finished, whatever its
folder holds. A rerun skips every video whose ``done`` line matches the run's options and the
source file's size and modification time and whose outputs are all present; any other video is
processed again from scratch (its folder is emptied first, so a run killed midway leaves
nothing behind twice). The manifest is compacted (one line per video, the latest) at the start
and end of every run. Only one batch may write to a folder at a time (a lock file,
``OUT/.batch.lock``).

Executors:

- ``workers >= 1`` (default: one per CPU, at most one per video): a
  :class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method; the heads are
  loaded by the pool's initializer, once per process.
- ``workers == 0``: in this process, one video after another (for debugging).
- ``ray``: Ray Data. ``ray=True`` starts a local Ray (``num_cpus=workers``) unless one is
  already initialised; ``ray="ADDRESS"`` joins a cluster (``ray.init(address=...)``). Each video
  is its own block, mapped by :class:`VideoWorker` (a callable class, so one instance, with its
  heads, per Ray actor) in an actor pool of ``workers`` actors (default: the cluster's CPUs),
  one video in flight per actor. A dead actor (a lost node, a video that crashes its process) is
  restarted and its video retried up to :data:`RAY_RETRIES` times; past that, the videos not
  yet finished are recorded as failed. On a cluster, the video paths and ``OUT`` must be on a file
  system every node can reach, and streammem must be installed on every node.

A video that fails (a corrupt file, a decoding error midway) is recorded as ``failed`` with its
error and the others go on; a mid-stream failure keeps what was written before it, but the
video is still ``failed`` and is processed again on the next run.

Example:
    >>> import tempfile, pathlib
    >>> from streammem.pipelines.jobs.batch import run_batch
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "broken.mp4").write_text("not a video")
    11
    >>> res = run_batch([str(root / "*.mp4")], root / "out", workers=0, progress=False)
    >>> res.failed, res.records[0]["status"], res.exit_code
    (1, 'failed', 1)
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from streammem.io.sinks import atomic_path

__all__ = ["TASKS", "VIDEO_SUFFIXES", "BatchResult", "VideoWorker", "find_videos", "assign_names", "read_manifest",
           "run_batch"]

log = logging.getLogger(__name__)

#: batch task name -> the main job's head name
TASKS = {"detect": "detection", "qa": "qa"}
#: files a folder argument expands to
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv")
MANIFEST = "manifest.jsonl"
LOCK = ".batch.lock"
#: how often Ray restarts a dead actor and retries its video (Ray Data's default, forever, would
#: loop on a video that crashes its process)
RAY_RETRIES = 2
#: source options a batch passes on to every video
SOURCE_OPTIONS = ("stride", "max_side", "backend")


# ---------------------------------------------------------------------------- inputs
def find_videos(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """The video files named by ``patterns``: glob patterns (``**`` recurses), file paths, or
    folders (their files with a :data:`VIDEO_SUFFIXES` suffix, not recursing); absolute,
    sorted, each once. Raises ValueError naming the patterns that match nothing."""
    found: set[Path] = set()
    empty = []
    for pattern in patterns:
        p = str(pattern)
        hits = [Path(h) for h in glob.glob(os.path.expanduser(p), recursive=True)] if glob.has_magic(p) else [Path(p)]
        files = []
        for h in hits:
            if h.is_dir():
                files += [f for f in h.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES]
            elif h.is_file():
                files.append(h)
        if not files:
            empty.append(p)
        found.update(f.absolute() for f in files)
    if empty:
        raise ValueError(f"no video matches {', '.join(repr(e) for e in empty)}")
    return sorted(found)


def _safe(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80]
    return name or "video"


def _short_hash(path: Path) -> str:
    return hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:8]


def assign_names(videos: Sequence[Path], known: dict[str, str] | None = None) -> dict[Path, str]:
    """An output folder name per video: a video already in the manifest (``known``: path ->
    name) keeps its name; any other gets its file stem made safe (letters, digits, ``._-``),
    or, when that stem is taken by another video or is reserved, the stem plus 8 hex digits of
    its path's hash.

    >>> names = assign_names([Path("/v/a/x.mp4"), Path("/v/b/x.mp4"), Path("/v/y z.mp4")])
    >>> names[Path("/v/a/x.mp4")] != names[Path("/v/b/x.mp4")], names[Path("/v/y z.mp4")]
    (True, 'y_z')
    """
    known = known or {}
    names: dict[Path, str] = {}
    taken = {MANIFEST}
    for v in videos:
        if str(v) in known:
            names[v] = known[str(v)]
            taken.add(names[v])
    stems: dict[str, int] = {}
    for v in videos:
        if v not in names:
            stems[_safe(v.stem)] = stems.get(_safe(v.stem), 0) + 1
    for v in videos:
        if v in names:
            continue
        stem = _safe(v.stem)
        name = stem if stems[stem] == 1 and stem not in taken else f"{stem}-{_short_hash(v)}"
        names[v] = name
        taken.add(name)
    return names


# ---------------------------------------------------------------------------- manifest
def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """The latest record per video (by its ``video`` path) in a manifest; an unreadable line
    (a run killed while writing it) is skipped with a warning."""
    path = Path(path)
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[rec["video"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s line %d is not a manifest record (a run killed while writing it?); skipped", path, n)
    return records


def _write_manifest(path: Path, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


class _Manifest:
    """Appends one record per line, each flushed and synced to disk before the next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


class _Lock:
    """An exclusive lock on ``OUT/.batch.lock`` for the whole run (released by the OS if the
    process dies); a second batch on the same folder is refused."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self._fh = None

    def __enter__(self) -> "_Lock":
        self._fh = open(self.path, "a")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise ValueError(f"another streammem batch is writing to {self.path.parent}; wait for it or use "
                             f"another --out")
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def _source_stamp(video: Path) -> dict:
    st = video.stat()
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def _is_finished(rec: dict | None, options: dict, stamp: dict, out: Path) -> bool:
    """A ``done`` record of the same options and the same source file, with every output present."""
    if rec is None or rec.get("status") != "done" or rec.get("options") != options:
        return False
    if any(rec.get(k) != v for k, v in stamp.items()):
        return False
    outputs = [p for p in rec.get("outputs", {}).values() if p]
    return bool(outputs) and all((out / p).is_file() for p in outputs)


# ---------------------------------------------------------------------------- one video
class VideoWorker:
    """The heads of ``tasks``, loaded once, run over one video after another.

    A Ray Data callable class as well: ``__call__`` takes a batch of work items
    (``{"item": [json, ...]}``) and returns ``{"record": [json, ...]}``, one manifest record
    per video.

    Args:
        tasks: batch task names (:data:`TASKS`).
        options: the main job's ``memory``, ``retention``, ``max_frames`` and the source options
            (:data:`SOURCE_OPTIONS`).
        threads: torch intra-op threads of this worker (None: leave torch's setting).
    """

    def __init__(self, tasks: Sequence[str], options: dict, threads: int | None = None) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        from streammem.pipelines.jobs.main import default_heads

        self.tasks = list(tasks)
        self.options = dict(options)
        self.heads, notes = default_heads([TASKS[t] for t in self.tasks], memory=options.get("memory", "ovbench"),
                                          retention=options.get("retention", "spread"))
        if notes:  # a missing checkpoint: every video would fail the same way
            raise ValueError("; ".join(notes))
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def process(self, item: dict) -> dict:
        """Run the heads over ``item["video"]`` into ``item["out"]`` (emptied first); returns the
        video's manifest record. Every error is caught and recorded."""
        from streammem.io import probe
        from streammem.pipelines.jobs.main import default_questions, run_main_job

        video, out, root = item["video"], Path(item["out"]), Path(item["root"])
        rec = {"video": video, "name": item["name"], "options": self.options, **item["stamp"],
               "status": "failed", "outputs": {}, "error": None, "worker": self.where,
               "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        t0 = time.perf_counter()
        src_opts = {k: self.options[k] for k in SOURCE_OPTIONS if self.options.get(k) is not None}
        try:
            if out.is_dir():  # what a killed or failed run left: this video starts from scratch
                shutil.rmtree(out)
            for h in self.heads:
                h.reset()
            if "qa" in self.tasks:
                info = probe(video, **src_opts)
                qa = next(h for h in self.heads if h.name == "qa")
                for q in default_questions(video, info.duration):
                    qa.schedule(q["question"], q["candidates"], float(q["middle_frame_timestamp"]), id=q)
            res = run_main_job(video, out, heads=self.heads, max_frames=self.options.get("max_frames"),
                               progress=False, memory=self.options.get("memory", "ovbench"), report=False, **src_opts)
            s = res.summary
            rec["outputs"] = {k: os.path.relpath(v, root) for k, v in s["outputs"].items() if v}
            rec["outputs"]["summary"] = os.path.relpath(res.summary_path, root)
            fps = s["fps"]
            rec.update(frames=s["frames_processed"], fps=round(fps, 3) if math.isfinite(fps) else None)
            if res.error is not None:
                rec["error"] = f"{res.error} (the frames before it were written)"
            else:
                rec["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - one video's failure is recorded; the batch goes on
            log.debug("%s failed", video, exc_info=True)
            from streammem.io import SourceError

            user_facing = isinstance(exc, (SourceError, ValueError))  # their messages name the file and the fix
            rec["error"] = str(exc) if user_facing else f"{type(exc).__name__}: {exc}"
        rec["wall_s"] = round(time.perf_counter() - t0, 3)
        return rec

    def __call__(self, batch: dict) -> dict:
        return {"record": [json.dumps(self.process(json.loads(s))) for s in batch["item"]]}


# the pool's per-process worker, made by the initializer (a module attribute is how
# ProcessPoolExecutor hands state from its initializer to its tasks)
_worker: VideoWorker | None = None


def _init_pool_worker(tasks, options, threads) -> None:
    global _worker
    _worker = VideoWorker(tasks, options, threads)


def _pool_process(item: dict) -> dict:
    assert _worker is not None, "the pool's initializer did not run"
    return _worker.process(item)


# ---------------------------------------------------------------------------- executors
def _run_inline(items, tasks, options, threads):
    import torch

    before = torch.get_num_threads()
    try:
        worker = VideoWorker(tasks, options, threads)
        for item in items:
            yield worker.process(item)
    finally:
        torch.set_num_threads(before)


def _failed(item: dict, options: dict, error: str) -> dict:
    return {"video": item["video"], "name": item["name"], "options": options, **item["stamp"], "status": "failed",
            "outputs": {}, "error": error, "worker": None, "wall_s": None}


def _run_pool(items, tasks, options, workers, threads) -> Iterator[dict]:
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_pool_worker,
                             initargs=(tasks, options, threads)) as pool:
        futures = {pool.submit(_pool_process, it): it for it in items}
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker died (or its initializer failed)
                    yield _failed(futures[fut], options, f"the worker process failed: {type(exc).__name__}: {exc}")
        finally:
            for fut in futures:
                fut.cancel()


def _run_ray(items, tasks, options, workers, threads, address) -> Iterator[dict]:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ValueError("--ray needs Ray Data: pip install 'ray[data]' (or streammem[ray])") from exc
    started, runtime_env = False, None
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
        if address and address != "local":
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **kw)
            # local workers import the streammem this process runs, wherever it was imported from
            path = os.pathsep.join([_code_root(), os.environ.get("PYTHONPATH", "")])
            runtime_env = {"env_vars": {"PYTHONPATH": path}}
        started = True
    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # the batch's own bar counts videos
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    try:
        size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = max(1, min(size, len(items)))
        ds = ray.data.from_items([{"item": json.dumps(it)} for it in items], override_num_blocks=len(items))
        with warnings.catch_warnings():  # Ray 2.60 takes the actors' retry limits only as (deprecated) extra kwargs
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            mapped = ds.map_batches(
                VideoWorker, batch_size=1, fn_constructor_kwargs={"tasks": tasks, "options": options,
                                                                  "threads": threads}, runtime_env=runtime_env,
                compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1), num_cpus=1,
                max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES)
        seen: set[str] = set()
        try:
            for row in mapped.iter_rows():
                rec = json.loads(row["record"])
                seen.add(rec["video"])
                yield rec
        except Exception as exc:  # noqa: BLE001 - Ray itself failed: what did not come back is recorded
            for it in items:
                if it["video"] not in seen:
                    yield _failed(it, options, f"Ray failed: {type(exc).__name__}: {exc}")
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = before
        if started:
            ray.shutdown()


def _code_root() -> str:
    """The folder this streammem is imported from."""
    import streammem

    return str(Path(streammem.__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------- the job
@dataclass
class BatchResult:
    """What a batch did. ``records``: every matched video's manifest record (those skipped as
    already done included), in path order; ``done`` / ``skipped`` / ``failed``: counts (``done``
    counts videos finished in this run; ``skipped`` those finished before it)."""

    records: list[dict]
    manifest: Path
    done: int = 0
    skipped: int = 0
    failed: int = 0
    wall_s: float = 0.0
    executor: str = ""
    failures: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every video is done, 1 when one failed."""
        return 1 if self.failed else 0

    def summary(self) -> str:
        """A few lines for the terminal."""
        n = len(self.records)
        lines = [f"streammem batch: {n} video{'s' if n != 1 else ''}: {self.done} done, {self.skipped} skipped "
                 f"(done before), {self.failed} failed, in {self.wall_s:.1f} s ({self.executor})"]
        lines += [f"  failed: {r['error'] if r['video'] in (r['error'] or '') else r['video'] + ': ' + str(r['error'])}"
                  for r in self.failures]
        lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def run_batch(patterns: Sequence[str | os.PathLike] | str, out: str | os.PathLike,
              tasks: Sequence[str] = ("detect", "qa"), workers: int | None = None, ray: bool | str = False,
              memory: str = "ovbench", retention: str = "spread", max_frames: int | None = None,
              progress: bool = True, threads: int = 1, **source_options) -> BatchResult:
    """Process every video matched by ``patterns`` (:func:`find_videos`) with the heads of
    ``tasks`` into ``OUT/<name>/``, recording each in ``OUT/manifest.jsonl`` (see the module
    docstring); videos already done are skipped.

    ``workers``: processes (or Ray actors); None: one per CPU (with Ray on a cluster: the
    cluster's CPUs), at most one per video; 0: in this process. ``ray``: False, True (a local
    Ray unless one is initialised) or a cluster address. ``threads``: torch threads per worker
    (1: the parallelism is across videos, one worker per CPU; more threads per worker on busy
    CPUs slow every worker down). ``source_options``: ``stride``,
    ``max_side``, ``backend``.

    Videos inside ``out`` (a batch's own ``annotated.mp4``, matched by a ``**`` pattern) are
    left out. Raises ValueError on bad options, no matching video, or another batch writing to
    ``out``, before anything is written."""
    # 1. check inputs
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    tasks = list(dict.fromkeys(tasks))
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"--task must be a comma-separated list of {', '.join(TASKS)}; "
                         f"got {','.join(tasks) or 'none'}")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if ray is not False and workers == 0:
        raise ValueError("--workers 0 (in this process) and --ray exclude each other")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {max_frames}")
    unknown = set(source_options) - set(SOURCE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown source option(s) {sorted(unknown)}; allowed: {list(SOURCE_OPTIONS)}")
    from streammem.pipelines.qa import RETENTIONS

    if retention not in RETENTIONS:
        raise ValueError(f"--retention must be one of {', '.join(sorted(RETENTIONS))}, got {retention!r}")
    from streammem.pipelines.jobs.main import default_heads

    _, notes = default_heads([TASKS[t] for t in tasks], memory=memory, retention=retention)
    if notes:  # a missing checkpoint: found here rather than once per worker
        raise ValueError("; ".join(notes))
    videos = find_videos(patterns)
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the output must be a folder")
    videos = [v for v in videos if out not in v.parents]  # never a batch's own annotated.mp4
    if not videos:
        raise ValueError(f"every video matched is inside the output folder {out}")
    from streammem.io.options import SourceOptions

    src = {k: getattr(SourceOptions(), k) for k in SOURCE_OPTIONS}  # every one, so that reruns compare alike
    src.update({k: v for k, v in source_options.items() if v is not None})
    SourceOptions(**src)  # a bad value fails here, before anything is written
    options = {"tasks": tasks, "memory": memory, "retention": retention, "max_frames": max_frames, **src}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _Lock(out):
        # 2. what is done already; name and queue the rest
        manifest_path = out / MANIFEST
        previous = read_manifest(manifest_path)
        _write_manifest(manifest_path, previous.values())  # compacted: one line per video
        names = assign_names(videos, {k: r["name"] for k, r in previous.items() if "name" in r})
        records: dict[str, dict] = {}
        todo = []
        for v in videos:
            stamp = _source_stamp(v)
            rec = previous.get(str(v))
            if _is_finished(rec, options, stamp, out):
                records[str(v)] = rec
            else:
                todo.append({"video": str(v), "name": names[v], "out": str(out / names[v]), "root": str(out),
                             "stamp": stamp})
        skipped = len(records)
        n_cpu = os.cpu_count() or 1
        if workers is None:
            workers = None if (ray and ray is not True) else max(1, min(n_cpu, len(todo)))
        # 3. process, recording each video as it ends
        if not todo:
            runs: Iterable[dict] = iter(())
            executor = "nothing to do"
        elif ray:
            runs = _run_ray(todo, tasks, options, workers, threads, None if ray is True else str(ray))
            executor = f"Ray Data, {'local' if ray is True else ray}"
        elif workers == 0:
            runs = _run_inline(todo, tasks, options, threads)
            executor = "in this process"
        else:
            runs = _run_pool(todo, tasks, options, min(workers, len(todo)), threads)
            executor = f"{min(workers, len(todo))} worker process{'es' if min(workers, len(todo)) > 1 else ''}"
        from tqdm.auto import tqdm

        failures = []
        manifest = _Manifest(manifest_path)
        bar = tqdm(total=len(videos), initial=skipped, desc="videos", unit="video", disable=not progress)
        try:
            for rec in runs:
                manifest.append(rec)
                records[rec["video"]] = rec
                if rec["status"] != "done":
                    failures.append(rec)
                    bar.set_postfix(failed=len(failures))
                bar.update(1)
        finally:
            bar.close()
            manifest.close()
            _write_manifest(manifest_path, read_manifest(manifest_path).values())
    ordered = [records[str(v)] for v in videos if str(v) in records]
    return BatchResult(ordered, manifest_path, done=len(ordered) - skipped - len(failures), skipped=skipped,
                       failed=len(failures), wall_s=time.perf_counter() - t0, executor=executor,
                       failures=failures)
