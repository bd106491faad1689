"""Shared set-up: one compute thread per test process, and small test videos encoded with
ffmpeg in several codecs and containers.

The suite's tensors are small; at torch's default thread count (one per core) a 2-core machine
that is also running another job spends most of its time switching threads, so every pool is
pinned to one thread: the OpenMP / MKL / BLAS pools through the environment, set before torch is
imported (here, or by a subprocess a test starts), and torch's own intra- and inter-op pools. A
test that changes the thread count (a trainer's ``threads`` option) has it put back afterwards.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from streammem.io import ffmpeg_exe  # noqa: E402

TORCH_THREADS = 1
torch.set_num_threads(TORCH_THREADS)
try:
    torch.set_num_interop_threads(TORCH_THREADS)
except RuntimeError:  # already fixed: some inter-op work ran before this module was imported
    pass


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts, and leaves, with torch at one intra-op thread."""
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(TORCH_THREADS)

FPS = 25
SECONDS = 2
N_FRAMES = FPS * SECONDS

# name -> (container file name, encoder arguments)
CODECS = {
    "h264_mp4": ("h264.mp4", ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart"]),
    "mpeg4_avi": ("mpeg4.avi", ["-c:v", "mpeg4", "-q:v", "3"]),
    "vp9_webm": ("vp9.webm", ["-c:v", "libvpx-vp9", "-b:v", "300k", "-deadline", "realtime"]),
    "mjpeg_avi": ("mjpeg.avi", ["-c:v", "mjpeg", "-q:v", "3"]),
    "h264_mkv": ("h264.mkv", ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
}

# Variable frame rate: 20 frames 0.04 s apart, then frames 0.12 s apart (whole ticks of 1/25 s).
VFR_N = 30
VFR_EXPR = "if(lt(N,20),N*0.04,0.8+(N-20)*0.12)/TB"


def vfr_times() -> list[float]:
    return [round(i * 0.04 if i < 20 else 0.8 + (i - 20) * 0.12, 6) for i in range(VFR_N)]


def _ffmpeg(*args: str) -> None:
    exe = ffmpeg_exe()
    assert exe is not None, "tests need ffmpeg (imageio-ffmpeg provides one)"
    subprocess.run([exe, "-loglevel", "error", "-y", *args], check=True)


def _src(size: str = "320x240", rate: int = FPS, seconds: float = SECONDS) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Paths of test videos: one per entry of CODECS, plus 'vfr' and broken files."""
    root = tmp_path_factory.mktemp("videos")
    out: dict[str, Path] = {}
    for name, (fname, enc) in CODECS.items():
        path = root / fname
        _ffmpeg(*_src(), *enc, str(path))
        out[name] = path
    vfr = root / "vfr.mp4"
    _ffmpeg(*_src(size="160x120", seconds=VFR_N / FPS), "-vf", f"setpts='{VFR_EXPR}'", "-fps_mode", "vfr",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(vfr))
    out["vfr"] = vfr
    # Broken inputs.
    (root / "empty.mp4").write_bytes(b"")
    out["empty"] = root / "empty.mp4"
    (root / "text.mp4").write_text("this is a text file, not a video\n" * 40)
    out["text"] = root / "text.mp4"
    for name in ("h264_mp4", "mpeg4_avi", "vp9_webm", "mjpeg_avi"):
        data = out[name].read_bytes()
        path = root / f"truncated_{out[name].name}"
        path.write_bytes(data[: int(len(data) * 0.6)])
        out[f"truncated_{name}"] = path
    mj = out["mjpeg_avi"].read_bytes()
    assert mj.count(b"MJPG") >= 1
    (root / "unknown_codec.avi").write_bytes(mj.replace(b"MJPG", b"QQQQ"))
    out["unknown_codec"] = root / "unknown_codec.avi"
    return out


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """12 PNG images named 1..12 (natural order differs from lexical order)."""
    import cv2
    import numpy as np

    root = tmp_path_factory.mktemp("images")
    for i in range(1, 13):
        img = np.full((48, 64, 3), i * 20, np.uint8)
        img[:, :, 0] = 255 - i * 20  # red differs from blue: catches BGR/RGB mix-ups
        cv2.imwrite(str(root / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (root / "notes.txt").write_text("not an image")
    return root
