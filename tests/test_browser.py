"""The web demo in a real headless browser (Selenium 4 driving Debian's chromium): open the page,
upload a video and ask a question on Ask, stream chromium's fake webcam through Detect, generate
a few frames on Generate, and look at the Memory tab. The fake camera plays a StreamWorld clip (a Y4M file), so the detector sees
what it knows. A PNG screenshot of each tab is saved to the test's folder and, when
``STREAMMEM_SCREENSHOTS`` names a folder (``docs/images`` for the README), there as
``app_<tab>.png``. Needs no display: chromium runs ``--headless=new``."""

import os
import shutil
import socket
from pathlib import Path

import cv2
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from demos.app import Limits, build_app
from streammem.io import VideoWriter
from streammem.world import World

CHROMIUM = os.environ.get("STREAMMEM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("STREAMMEM_CHROMEDRIVER", "/usr/bin/chromedriver")
FRAMES = 24
WAIT_S = 60


@pytest.fixture(scope="module")
def url():
    demo = build_app(limits=Limits(max_upload_mb=5, stream_every_s=0.5, max_gen_frames=6))
    demo.queue(default_concurrency_limit=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, address, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                                show_error=True)
    yield address
    demo.close()


def write_y4m(path: Path, seed: int, frames: int, size: int = 160) -> Path:
    """A StreamWorld stream as a YUV4MPEG2 file: what chromium's fake camera plays, in a loop."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{size} H{size} F8:1 Ip A1:1 C420jpeg\n".encode())
        for fr in World(seed=seed, preset="clean", size=size, frames=frames):
            f.write(b"FRAME\n" + cv2.cvtColor(fr.image, cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    camera = write_y4m(tmp_path_factory.mktemp("camera") / "camera.y4m", seed=2, frames=16)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={camera}", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1400,1700"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def text_of(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def open_tab(driver, name: str) -> None:
    tabs = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name]
    assert tabs, f"no {name} tab on the page"
    tabs[0].click()


def shoot(driver, tmp_path: Path, tab: str) -> Path:
    png = tmp_path / f"app_{tab}.png"
    driver.save_screenshot(str(png))
    assert png.stat().st_size > 10_000  # a rendered page, not an empty image
    target = os.environ.get("STREAMMEM_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(target) / png.name)
    return png


def test_ask_detect_and_memory_in_a_browser(url, browser, tmp_path):
    d, wait = browser, WebDriverWait(browser, WAIT_S)
    video = VideoWriter(tmp_path / "street.mp4", fps=8)
    for f in World(seed=1, preset="clean", size=128, frames=FRAMES):
        video.write(f.image)
    path = video.close()

    d.get(url)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "button[role=tab]")) == 4)

    # Ask: upload, process, ask, see the answer with its confidence and the pyramid
    # the tab bar can render before the tab's inputs: wait for each element before using it
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask-video input[type=file]"))[0].send_keys(str(path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask-video video"))
    wait.until(lambda d: d.find_element(By.ID, "ask-process")).click()
    wait.until(lambda d: f"{FRAMES} frames written" in text_of(d, "ask-status"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea, #question input"))[0].send_keys(
        "Is there a cat in view now?")
    wait.until(lambda d: d.find_element(By.ID, "ask-button")).click()
    wait.until(lambda d: "confidence" in text_of(d, "answer"))
    answer = text_of(d, "answer")
    assert answer.split(",")[0].strip() in ("yes", "no") and "street.mp4" in answer
    shoot(d, tmp_path, "ask")

    # Detect: chromium's fake camera streams through the detection head
    open_tab(d, "Detect")
    cam = wait.until(lambda d: d.find_element(By.ID, "det-webcam"))
    cam.find_element(By.CSS_SELECTOR, "div[title='grant webcam access'] button").click()
    record = wait.until(lambda d: [b for b in cam.find_elements(By.CSS_SELECTOR, "button") if b.text == "Record"])
    record[0].click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#det-image img"))
    wait.until(lambda d: "instance_writes" in text_of(d, "det-stats"))
    shoot(d, tmp_path, "detect")
    [b for b in cam.find_elements(By.CSS_SELECTOR, "button") if b.text == "Stop"][0].click()
    wait.until(lambda d: [b for b in cam.find_elements(By.CSS_SELECTOR, "button") if b.text == "Record"])

    # Generate: frames from the default StreamWorld scene stream back, then the stream's mp4
    open_tab(d, "Generate")
    wait.until(lambda d: d.find_element(By.ID, "gen-go")).click()
    wait.until(lambda d: "generated_" in text_of(d, "gen-file"))  # the mp4 comes once the run is done
    assert d.find_elements(By.CSS_SELECTOR, "#gen-image img") and "StreamWorld scene 0" in text_of(d, "gen-stats")
    shoot(d, tmp_path, "generate")

    # Memory: opening the tab draws this visitor's memories over time (Ask's pyramid and Detect's banks)
    open_tab(d, "Memory")
    wait.until(lambda d: "instance_memory" in text_of(d, "mem-json"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens-plot canvas, #tokens-plot svg")) >= 1)
    shoot(d, tmp_path, "memory")
