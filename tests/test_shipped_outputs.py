"""The shipped checkpoints' outputs, compared bitwise with a recording.

Three models ship in ``streammem/checkpoints/``: the grid encoder, the QA answerer and the
detector. This test runs each on a short StreamWorld stream and compares what comes out with
``tests/data/shipped_outputs.{safetensors,json}``:

- encoder: the token features of the first frames (``GridEncoder(frame).features``);
- answerer: the encoder + answerer pipeline (``load_default_qa``) with the questions StreamWorld
  schedules every 4 s, over the ``ovbench`` pyramid (832 tokens, encoded from scratch per
  question) and the ``offline`` pyramid (9,984 tokens, read through the answerer's
  ``MemoryCache``): each answer's probabilities, choice and evidence;
- detector: ``StreamingDetectionPipeline`` with its default config, causal, over a few frames:
  boxes, scores and classes.

Torch runs on one thread both when recording and when testing (the thread count changes the
order of float sums). A refactor must leave every number equal: ``torch.equal`` on tensors,
``==`` on the JSON (floats round-trip exactly). On a CPU whose vector capability differs from
the recording's (``torch.backends.cpu.get_cpu_capability()``), kernels sum in another order, so
tensors are compared to 1e-4 relative there and the discrete outputs (choices, classes, counts)
must still match. A retrained checkpoint (another file hash) must be recorded again::

    PYTHONPATH=. python -m tests.test_shipped_outputs --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "streammem" / "checkpoints"
DATA = Path(__file__).resolve().parent / "data"
TENSORS = DATA / "shipped_outputs.safetensors"
META = DATA / "shipped_outputs.json"

WORLD = {"seed": 3, "preset": "medium", "size": 128, "fps": 8, "seconds": 24}
QUESTION_EVERY_S = 4
ENCODER_FRAMES = 2
DETECTOR_WORLD = {"seed": 5, "preset": "medium", "size": 256, "fps": 8, "frames": 10}


def _hashes() -> dict[str, str]:
    return {name: hashlib.sha256((CKPT / name / "model.safetensors").read_bytes()).hexdigest()
            for name in ("grid_encoder", "answerer", "detector")}


def _qa(memory: str, frames, questions) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from streammem.pipelines.qa import Question, load_default_qa

    pipe = load_default_qa(memory=memory)
    qs = [Question(q["question"], q["candidates"], float(q["middle_frame_timestamp"]), i)
          for i, q in enumerate(questions)]
    got = sorted(pipe.run(frames, qs), key=lambda qa: qa[0].id)
    probs = torch.full((len(got), 5), -1.0, dtype=torch.float64)  # -1 past a question's candidates
    rows = []
    for i, (q, a) in enumerate(got):
        probs[i, : len(a.probs)] = torch.tensor(a.probs, dtype=torch.float64)
        rows.append({"id": q.id, "index": a.index, "confidence": a.confidence, "query_time": a.query_time,
                     "evidence": a.evidence})
    return {f"qa_{memory}.probs": probs}, rows


def compute() -> tuple[dict[str, torch.Tensor], dict]:
    """Run the three shipped models; returns (tensors, JSON-able record). Torch threads: 1."""
    from streammem.models.detector import SmallDetector
    from streammem.models.grid_encoder import GridEncoder
    from streammem.pipelines.detection import StreamingDetectionPipeline
    from streammem.world import World

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tensors: dict[str, torch.Tensor] = {}
        record: dict = {"checkpoints": _hashes(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "world": WORLD, "detector_world": DETECTOR_WORLD}
        world = World(**WORLD)
        frames = list(world)
        questions = world.questions(every_s=QUESTION_EVERY_S)

        enc = GridEncoder.from_pretrained(str(CKPT / "grid_encoder")).eval()
        with torch.no_grad():
            tensors["encoder.features"] = torch.stack([enc(f).features for f in frames[:ENCODER_FRAMES]])

        for memory in ("ovbench", "offline"):
            t, rows = _qa(memory, frames, questions)
            tensors.update(t)
            record[f"qa_{memory}"] = rows

        det = SmallDetector.from_pretrained(str(CKPT / "detector"))
        pipe = StreamingDetectionPipeline(det)
        dets = [pipe.step(f) for f in World(**DETECTOR_WORLD)]
        tensors["detector.xyxy"] = torch.from_numpy(np.concatenate([d.xyxy for d in dets]))
        tensors["detector.confidence"] = torch.from_numpy(np.concatenate([d.confidence for d in dets]))
        record["detector"] = {"per_frame": [len(d) for d in dets],
                              "class_id": [int(c) for d in dets for c in d.class_id]}
        return {k: v.contiguous() for k, v in tensors.items()}, record
    finally:
        torch.set_num_threads(threads)


def record() -> None:
    from safetensors.torch import save_file

    tensors, meta = compute()
    DATA.mkdir(exist_ok=True)
    save_file(tensors, str(TENSORS))
    META.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"recorded {sorted(tensors)} to {TENSORS} and {META}")


def _discrete(meta: dict) -> dict:
    """The record without float values: choices, evidence frames, classes, counts."""
    out = {k: meta[k] for k in ("world", "detector_world", "detector")}
    for k in ("qa_ovbench", "qa_offline"):
        out[k] = [(r["id"], r["index"], [e["frame_index"] for e in r["evidence"]]) for r in meta[k]]
    return out


def test_shipped_models_give_the_recorded_outputs():
    from safetensors.torch import load_file

    want_meta = json.loads(META.read_text())
    assert want_meta["checkpoints"] == _hashes(), (
        "a shipped checkpoint changed since tests/data/shipped_outputs was recorded; if that is intended, "
        "record again: PYTHONPATH=. python -m tests.test_shipped_outputs --record")
    want = load_file(str(TENSORS))
    got, meta = compute()
    assert sorted(got) == sorted(want)
    if meta["cpu_capability"] == want_meta["cpu_capability"]:
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{k} differs from the recording"
        assert meta == want_meta
    else:  # another vector ISA sums in another order: near, and the same decisions
        for k in want:
            assert got[k].shape == want[k].shape and torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
        assert _discrete(meta) == _discrete(want_meta)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_shipped_outputs --record")
    record()
