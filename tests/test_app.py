"""The web demo (demos/app.py) launched in-process and driven through gradio_client: every
tab's API, two visitors with different videos at once, and each bad request answered with a
clear message while the session stays usable."""

import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from demos.app import Limits, build_app
from streammem.io import VideoWriter
from streammem.memory import PyramidMemory
from streammem.world import World

FPS = 8
A_FRAMES, B_FRAMES, LONG_FRAMES = 32, 20, 48  # 3.9 s, 2.4 s and 5.9 s at 8 fps
LIMITS = Limits(max_upload_mb=0.4, max_video_s=4.5, concurrency=2)


def render(path: Path, seed: int, frames: int, size: int = 96) -> Path:
    """A StreamWorld stream as an mp4 (8 fps): what a visitor would upload."""
    w = VideoWriter(path, fps=FPS)
    for f in World(seed=seed, preset="clean", size=size, frames=frames):
        w.write(f.image)
    return w.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    out = {"a": render(root / "a.mp4", 1, A_FRAMES), "b": render(root / "b.mp4", 2, B_FRAMES),
           "long": render(root / "long.mp4", 3, LONG_FRAMES, size=64)}
    (root / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    out["text"] = root / "notes.mp4"
    big = root / "big.mp4"
    big.write_bytes(np.random.default_rng(0).bytes(int(LIMITS.max_upload_bytes * 1.5)))
    out["big"] = big
    (root / "junk.safetensors").write_bytes(b"\x80\x04pickle-ish bytes, not a snapshot" * 10)
    out["junk"] = root / "junk.safetensors"
    return out


@pytest.fixture(scope="module")
def server():
    demo = build_app(limits=LIMITS)
    demo.queue(default_concurrency_limit=LIMITS.concurrency)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            show_error=True, max_file_size=LIMITS.max_upload_bytes)
    yield demo, url
    demo.close()


def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def test_two_visitors_get_answers_about_their_own_video(server, files):
    demo, url = server
    ca, cb = client(url), client(url)
    assert {"/ask_process", "/ask_question", "/ask_webcam", "/ask_pyramid", "/detect_video", "/detect_webcam",
            "/generate", "/generate_continue", "/generate_stop", "/generate_prompt", "/memory_stats", "/snapshot_save",
            "/snapshot_load"} <= set(ca.view_api(print_info=False,
                                                                                 return_format="dict")["named_endpoints"])
    # both videos stream in at the same time, each into its visitor's memory
    ja = ca.submit(handle_file(str(files["a"])), api_name="/ask_process")
    jb = cb.submit(handle_file(str(files["b"])), api_name="/ask_process")
    (status_a, pyr_a, levels_a), (status_b, pyr_b, levels_b) = ja.result(timeout=120), jb.result(timeout=120)
    assert "a.mp4" in status_a and f"{A_FRAMES} frames" in status_a
    assert "b.mp4" in status_b and f"{B_FRAMES} frames" in status_b
    held_a = [f["frame_index"] for lvl in levels_a["levels"] for f in lvl["frames"]]
    held_b = [f["frame_index"] for lvl in levels_b["levels"] for f in lvl["frames"]]
    assert max(held_a) == A_FRAMES - 1 and max(held_b) == B_FRAMES - 1 and len(pyr_a) == len(held_a)
    assert len(pyr_b) == len(held_b)

    # questions at the same time: each is answered at its own stream's time, from its own frames
    qa = ca.submit("Is there a cat in view now?", "", api_name="/ask_question")
    qb = cb.submit("Is there a cat in view now?", "", api_name="/ask_question")
    (md_a, ev_a, ans_a), (md_b, ev_b, ans_b) = qa.result(timeout=60), qb.result(timeout=60)
    assert ans_a["query_time"] == pytest.approx((A_FRAMES - 1) / FPS) and ans_a["source"] == "video a.mp4"
    assert ans_b["query_time"] == pytest.approx((B_FRAMES - 1) / FPS) and ans_b["source"] == "video b.mp4"
    for ans, ev, n in ((ans_a, ev_a, A_FRAMES), (ans_b, ev_b, B_FRAMES)):
        assert ans["text"] in ("yes", "no") and 0.5 <= ans["confidence"] <= 1.0
        assert ans["evidence"] and len(ev) == len(ans["evidence"])  # one thumbnail per evidence frame
        assert all(e["frame_index"] < n and e["timestamp"] <= (n - 1) / FPS for e in ans["evidence"])
    assert "confidence" in md_a and "a.mp4" in md_a and "b.mp4" in md_b
    # the memory tab shows each visitor only its own memories
    stats_a, stats_b = ca.predict(api_name="/memory_stats")[2], cb.predict(api_name="/memory_stats")[2]
    assert stats_a["ask"]["frames"] == A_FRAMES and stats_b["ask"]["frames"] == B_FRAMES
    assert stats_a["ask_source"] == "video a.mp4" and stats_b["ask_source"] == "video b.mp4"
    sessions = demo.streammem.sessions
    assert len({sessions.get(type("R", (), {"session_hash": c.session_hash})()).id for c in (ca, cb)}) == 2

    # a question the shipped answerer does not know is refused with its reason, not answered
    md, ev, ans = ca.predict("What is the man doing?", "", api_name="/ask_question")
    assert ans["refused"] and ans["kind"] == "vocabulary" and "man" in ans["unknown_words"]
    assert md.startswith("**Refused**") and "does not know" in md and ev == []
    # options are taken; the pyramid view is there on request
    md, ev, ans = ca.predict("Where in the frame is the red star now?", "top left, top right, bottom left, "
                             "bottom right", api_name="/ask_question")
    assert ans.get("refused") or ans["text"] in ("top left", "top right", "bottom left", "bottom right")
    assert ca.predict(api_name="/ask_pyramid")[2]["frames"] == A_FRAMES

    # closing the page frees the session: its folder is removed and a later request starts afresh
    sa = sessions.get(type("R", (), {"session_hash": ca.session_hash})())
    demo.streammem.unload(type("R", (), {"session_hash": ca.session_hash})())
    assert sa.closed and not sa.dir.exists() and ca.session_hash not in sessions
    assert cb.predict(api_name="/memory_stats")[2]["ask"]["frames"] == B_FRAMES  # the other visitor untouched


def test_detect_streams_frames_and_writes_the_video(server, files):
    _, url = server
    c = client(url)
    job = c.submit(handle_file(str(files["b"])), "small", "feature_bank", api_name="/detect_video")
    image, stats, video = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 2 and all(o[0] is not None for o in outputs)  # annotated frames came back as processed
    assert stats["frames"] == B_FRAMES and stats["pipeline"]["memory"] == "feature_bank"
    assert stats["pipeline"]["instance_memory"]["num_tokens"] > 0  # the bank filled
    assert video["path"].endswith("b_annotated.mp4")
    # HOG without memory
    image, stats, video = c.predict(handle_file(str(files["a"])), "hog", "none", api_name="/detect_video")
    assert stats["frames"] == A_FRAMES and stats["pipeline"]["detector"] == "hog"


def test_webcam_frames_go_into_the_visitors_own_memory(server):
    """The webcam events are Gradio streams (the browser test drives them for real); here their
    handlers get frames in-process under a client's session, and the client then sees them."""
    demo, url = server
    c = client(url)
    me = type("Request", (), {"session_hash": c.session_hash})()
    app = demo.streammem
    frames = list(World(seed=5, preset="clean", size=96, frames=4))
    for f in frames[:3]:
        status, gallery, levels, _ = app.ask_webcam(f.image, None, me)
    assert "webcam" in status and levels["frames"] == 3 and len(gallery) == 3
    ans = c.predict("Is there a cat in view now?", "", api_name="/ask_question")[2]
    assert ans["source"] == "webcam" and ans["evidence"]
    for f in frames[:2]:
        annotated, stats, _ = app.detect_webcam(f.image, "small", "dual", None, me)
    assert annotated.shape == frames[0].image.shape and stats["pipeline"]["memory"] == "dual"
    assert stats["pipeline"]["frames"] == 2
    assert c.predict(api_name="/memory_stats")[2]["detect"]["frames"] == 2


def test_memory_plots_and_snapshots(server, files):
    _, url = server
    c = client(url)
    c.predict(handle_file(str(files["b"])), api_name="/ask_process")
    tokens, nbytes, stats = c.predict(api_name="/memory_stats")
    rows = tokens["data"]
    assert [r[0] for r in rows] == list(range(1, B_FRAMES + 1))  # one row per frame written
    assert len({r[3] for r in rows}) == 1 and rows[-1][2] <= 832  # bytes flat, tokens bounded
    snap, msg = c.predict("ask", api_name="/snapshot_save")
    path = snap["path"]  # the file the browser downloads (the server runs on this machine)
    assert path.endswith(".safetensors") and Path(path).is_file() and "Saved" in msg
    c.predict(handle_file(str(files["a"])), api_name="/ask_process")  # another stream replaces the memory ...
    msg = c.predict(handle_file(path), "ask", "small", "feature_bank", api_name="/snapshot_load")
    assert "Loaded" in msg
    assert c.predict(api_name="/memory_stats")[2]["ask"]["frames"] == B_FRAMES  # ... and the snapshot restores it
    ans = c.predict("Is there a cat in view now?", "", api_name="/ask_question")[2]
    assert ans["query_time"] == pytest.approx((B_FRAMES - 1) / FPS)
    # a bare memory file (Memory.save) is not a head snapshot; an Ask snapshot is refused by the
    # Detect head; both with the file named, and the session goes on
    bare = Path(path).with_name("bare_pyramid.safetensors")
    PyramidMemory.from_preset("ovbench", dim=16).save(bare)
    with pytest.raises(AppError, match=r"bare_pyramid.safetensors is not a streammem head snapshot"):
        c.predict(handle_file(str(bare)), "ask", "small", "none", api_name="/snapshot_load")
    with pytest.raises(AppError, match=r"streammem_ask_snapshot.safetensors.*'qa' head"):
        c.predict(handle_file(path), "detect", "small", "none", api_name="/snapshot_load")


def test_bad_requests_get_clear_messages_and_the_session_stays_usable(server, files):
    demo, url = server
    c = client(url)
    with pytest.raises(AppError, match="no video in memory yet"):
        c.predict("Is there a cat in view now?", "", api_name="/ask_question")
    with pytest.raises(AppError, match="notes.mp4 is not a video"):
        c.predict(handle_file(str(files["text"])), api_name="/ask_process")
    with pytest.raises(AppError, match=r"long.mp4 is 6 s long; this demo takes videos up to 4.5 s"):
        c.predict(handle_file(str(files["long"])), "small", "none", api_name="/detect_video")
    # an oversized upload: gradio_client refuses to send it, the server refuses to take it (launch's
    # max_file_size), and the handler itself refuses a file over the limit that got through anyway
    with pytest.raises(ValueError, match=r"big.mp4 exceeds the maximum file size of 400000 bytes"):
        c.predict(handle_file(str(files["big"])), api_name="/ask_process")
    r = httpx.post(url + "gradio_api/upload", files={"files": ("big.mp4", files["big"].read_bytes(), "video/mp4")})
    assert r.status_code == 413 and "maximum allowed size of 400000 bytes" in r.text
    me = type("Request", (), {"session_hash": c.session_hash})()
    with pytest.raises(gr.Error, match=r"big.mp4 is 0.6 MB; this demo takes uploads up to 0.4 MB"):
        list(demo.streammem.ask_process(str(files["big"]), None, me, lambda *a, **k: None))
    with pytest.raises(AppError, match="junk.safetensors was not loaded: junk.safetensors is not a safetensors"):
        c.predict(handle_file(str(files["junk"])), "ask", "small", "none", api_name="/snapshot_load")
    with pytest.raises(AppError, match="nothing to save yet"):
        c.predict("detect", api_name="/snapshot_save")
    # after all that, the same session works
    status = c.predict(handle_file(str(files["b"])), api_name="/ask_process")[0]
    assert f"{B_FRAMES} frames" in status
    assert c.predict("Is there a cat in view now?", "", api_name="/ask_question")[2]["text"] in ("yes", "no")


def test_server_survives_concurrent_failures(server, files):
    """Failing and good requests at once from several visitors: all answered, none lost."""
    _, url = server
    clients = [client(url) for _ in range(3)]
    results: dict[int, object] = {}

    def go(i: int, c: Client) -> None:
        try:
            src = files["text"] if i == 0 else files["b"]
            results[i] = c.predict(handle_file(str(src)), api_name="/ask_process")[0]
        except AppError as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(results[0], AppError) and "not a video" in str(results[0])
    assert all(f"{B_FRAMES} frames" in results[i] for i in (1, 2))


def test_an_idle_session_is_freed_after_its_time_to_live(server, files):
    """Gradio's state sweep calls the State's delete_callback once the session has been idle for
    its time to live: the session's memories and files are freed and it leaves the registry."""
    demo, url = server
    state = next(b for b in demo.blocks.values() if isinstance(b, gr.State))
    ttl = state.time_to_live
    state.time_to_live = 0.5  # for this test only (the default is Limits.session_ttl_s, an hour)
    try:
        c = client(url)
        c.predict(handle_file(str(files["b"])), api_name="/ask_process")
        me = type("Request", (), {"session_hash": c.session_hash})()
        session = demo.streammem.sessions.get(me)
        assert session.qa is not None and session.dir.exists()
        time.sleep(0.6)
        demo.state_holder.delete_all_expired_state()
        assert session.closed and session.qa is None and not session.dir.exists()
        assert c.session_hash not in demo.streammem.sessions
    finally:
        state.time_to_live = ttl


def _session(demo, c: Client):
    return demo.streammem.sessions.get(type("Request", (), {"session_hash": c.session_hash})())


def test_generate_two_visitors_continue_snapshot_and_bad_input(server, tmp_path):
    """Generate: frames stream back chunk by chunk into each visitor's own stream; Continue goes on
    from where the stream stopped (the same frames as one longer run under the same seed); a
    snapshot of the Generate head restores the stream; bad input gets a clear message."""
    demo, url = server
    ca, cb, cc = client(url), client(url), client(url)
    start = tmp_path / "start.png"
    cv2.imwrite(str(start), np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
    # two visitors at once: a scene, and an uploaded image on another memory (the rolling window
    # keeps snapshots under this test's 0.4 MB upload limit)
    ja = ca.submit(None, 3, "RRUU", "clean", "window", 6, 0, 2, api_name="/generate")
    jb = cb.submit(handle_file(str(start)), 0, "l d", "", "dual", 3, 1, 2, api_name="/generate")
    (_, stats_a, mp4_a), (_, stats_b, mp4_b) = ja.result(timeout=120), jb.result(timeout=120)
    assert len(ja.outputs()) == 4 and all(o[0] is not None for o in ja.outputs())  # 3 chunks streamed, then the mp4
    assert stats_a["source"] == "StreamWorld scene 3" and stats_a["generated"] == 6
    assert stats_a["pipeline"]["frames"] == 7 and stats_a["pipeline"]["chunks"] == 3
    assert stats_b["source"] == "uploaded image" and stats_b["pipeline"]["memory"] == "dual"
    assert stats_b["generated"] == 3 and stats_b["pipeline"]["chunks"] == 2
    assert mp4_b["path"].endswith(".mp4") and Path(mp4_b["path"]).parent != Path(mp4_a["path"]).parent
    cap = cv2.VideoCapture(mp4_a["path"])
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 7  # the start frame and the 6 generated
    cap.release()
    sa, sb = _session(demo, ca), _session(demo, cb)
    assert sa.gen is not sb.gen and sa.gen.model is sb.gen.model  # own pipelines, one shared model
    assert [len(sa.gen_frames), len(sb.gen_frames)] == [7, 4]
    assert ca.predict(api_name="/memory_stats")[2]["generate"]["frames"] == 7
    assert cb.predict(api_name="/memory_stats")[2]["generate"]["frames"] == 4

    # Continue: the stream goes on with its memory; the same as one longer run of the same seed
    snap = ca.predict("generate", api_name="/snapshot_save")[0]["path"]
    stats = ca.predict("FF", "clean", 4, 2, api_name="/generate_continue")[1]
    assert stats["generated"] == 4 and stats["pipeline"]["frames"] == 11 and stats["pipeline"]["chunks"] == 5
    cc.predict(None, 3, "RRUURRFFFF", "clean", "window", 10, 0, 2, api_name="/generate")
    continued, one_run = list(sa.gen_frames), list(_session(demo, cc).gen_frames)
    assert len(continued) == len(one_run) == 11
    assert all(np.array_equal(x, y) for x, y in zip(continued, one_run))
    # the snapshot taken after 6 frames restores the stream there; continuing it gives the same frames again
    assert "Loaded" in ca.predict(handle_file(snap), "generate", "small", "none", api_name="/snapshot_load")
    assert ca.predict(api_name="/memory_stats")[2]["generate"]["frames"] == 7
    ca.predict("FF", "clean", 4, 2, api_name="/generate_continue")
    assert all(np.array_equal(x, y) for x, y in zip(sa.gen_frames, one_run[-5:]))
    with pytest.raises(AppError, match=r"streammem_generate_snapshot.safetensors.*'generation' head"):
        ca.predict(handle_file(snap), "ask", "small", "none", api_name="/snapshot_load")
    # bad input: a clear message each time, and the session goes on
    with pytest.raises(AppError, match=r"unknown action letters 'XZ' in 'RXZ'; use F/B forward/back"):
        ca.predict(None, 3, "rxz", "clean", "posekv", 4, 0, 2, api_name="/generate")
    with pytest.raises(AppError, match=r"does not know the prompt words \['sunny', 'beach'\].*'clean', 'medium'"):
        ca.predict("R", "sunny beach", 2, 2, api_name="/generate_continue")
    with pytest.raises(AppError, match=r"Value 65 is greater than maximum value 64"):  # the slider's own check
        ca.predict(None, 3, "R", "", "posekv", 65, 0, 2, api_name="/generate")
    with pytest.raises(AppError, match="nothing to continue yet: press Generate first"):
        client(url).predict("R", "", 2, 2, api_name="/generate_continue")
    stats = ca.predict("R", "hard", 2, 2, api_name="/generate_continue")[1]
    assert stats["pipeline"]["frames"] == 13 and stats["prompt"] == "hard"
    # a snapshot made before a config field existed loads (the field at its default); a
    # tampered observed frame is refused by name
    from safetensors.torch import load_file, save_file

    from streammem.pipelines.base import json_tensor, tensor_json

    state = load_file(snap)
    meta = tensor_json(state["head.meta"])
    meta["config"].pop("reference_anchor")
    old = {**state, "head.meta": json_tensor(meta)}
    save_file(old, str(tmp_path / "older.safetensors"))
    assert "Loaded" in ca.predict(handle_file(str(tmp_path / "older.safetensors")), "generate", "small", "none",
                                  api_name="/snapshot_load")
    save_file({**old, "extra.observed": torch.zeros(3, 8, 8)}, str(tmp_path / "bad_observed.safetensors"))
    with pytest.raises(AppError, match=r"bad_observed.safetensors was not loaded: its observed frame is \(3, 8, 8\)"):
        ca.predict(handle_file(str(tmp_path / "bad_observed.safetensors")), "generate", "small", "none",
                   api_name="/snapshot_load")



def test_generate_stops_at_once_and_can_continue(server):
    """Stop sets the pipeline's interrupt: the run ends within a chunk, keeps what it made, and
    Continue goes on from there."""
    _, url = server
    c = client(url)
    job = c.submit(None, 1, "R", "", "posekv", 64, 0, 16, api_name="/generate")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Stopped" in c.predict(api_name="/generate_stop")
    _, stats, mp4 = job.result(timeout=60)
    assert stats["interrupted"] and 2 <= stats["generated"] < 64 and mp4["path"].endswith(".mp4")
    made = stats["pipeline"]["frames"]
    stats = c.predict("L", "", 2, 2, api_name="/generate_continue")[1]
    assert stats["pipeline"]["frames"] == made + 2 and not stats["interrupted"]


def _confident_detr(path: Path) -> dict[int, str]:
    """A tiny random DETR as tests/test_hf_detector.py builds it (transformers' test-sized
    configuration), whose class head is biased so that every query says "cat" with high
    probability: the detections the app shows are then certain to carry the model's names."""
    import transformers as tf

    id2label = {0: "cat", 1: "dog", 2: "car"}
    torch.manual_seed(0)
    backbone = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    cfg = tf.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=16,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=6, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()})
    model = tf.DetrForObjectDetection(cfg)
    with torch.no_grad():
        model.class_labels_classifier.weight.zero_()
        model.class_labels_classifier.bias.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))  # cat, dog, car, no object
    model.save_pretrained(path)
    tf.DetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 80}).save_pretrained(path)
    return id2label


def test_detect_with_a_transformers_detector_from_a_folder(server, files, tmp_path):
    """``build_app(detectors=["hf:<folder>"])`` (``serve.py --detector hf:...``) puts the model in the
    Detect picker; a session's head shares the loaded weights and keeps its own banks."""
    from demos.app import parse_args

    id2label = _confident_detr(tmp_path / "detr")
    spec = f"hf:{tmp_path / 'detr'}"
    models = replace(server[0].streammem.models, hf_detectors={}, hf_labels={})  # the shipped models, loaded once
    demo = build_app(models, LIMITS, detectors=[spec])
    assert (f"{tmp_path / 'detr'} (transformers)", spec) in models.detector_choices()
    demo.queue(default_concurrency_limit=LIMITS.concurrency)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            show_error=True, max_file_size=LIMITS.max_upload_bytes)
    try:
        c = client(url)
        job = c.submit(handle_file(str(files["b"])), spec, "feature_bank", api_name="/detect_video")
        image, stats, video = job.result(timeout=120)
        assert all(o[0] is not None for o in job.outputs()) and video["path"].endswith("b_annotated.mp4")
        assert stats["frames"] == B_FRAMES and stats["pipeline"]["detector"] == spec
        assert stats["pipeline"]["model_type"] == "detr" and stats["pipeline"]["memory"] == "feature_bank"
        assert stats["pipeline"]["positive_memory"]["num_tokens"] > 0  # confident boxes reached its own bank
        assert set(stats["labels"]) == {id2label[0]} and stats["labels"]["cat"] >= B_FRAMES
        # every session's head is its own, on the one model
        sessions = demo.streammem.sessions
        head = sessions.get(type("R", (), {"session_hash": c.session_hash})()).det
        assert head.detector is models.hf_detectors[spec].detector and head is not models.hf_detectors[spec]
        assert models.hf_detectors[spec].counters["frames"] == 0
        # DualMemory needs the small detector's pixel features: refused with the reason
        with pytest.raises(AppError, match="none or feature_bank"):
            c.predict(handle_file(str(files["b"])), spec, "dual", api_name="/detect_video")
    finally:
        demo.close()
    # serve.py's options: repeatable --detector, --classes for the one before it
    args = parse_args(["--detector", spec, "--detector", "hf:x/owl", "--classes", "person,car"])
    assert args.detectors == [[spec, None], ["hf:x/owl", "person,car"]]
    with pytest.raises(SystemExit):
        parse_args(["--classes", "person"])


def test_serve_exits_2_with_one_line_when_a_detector_cannot_be_fetched(server, monkeypatch, capsys):
    """Without the hub, ``serve.py --detector hf:<id>`` prints one line and exits 2 (nothing served)."""
    import huggingface_hub.constants

    import demos.app as app_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    shipped = server[0].streammem.models
    monkeypatch.setattr(app_module.Models, "load", classmethod(lambda cls, *a: replace(shipped, hf_detectors={},
                                                                                         hf_labels={})))
    monkeypatch.setattr(app_module, "launch", lambda *a, **k: pytest.fail("served despite the failed detector"))
    assert app_module.main(["--detector", "hf:streammem-tests/no-such-detector"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("serve.py: could not fetch 'streammem-tests/no-such-detector'"), err
