"""The demo page (pipelines/demo.py) served in-process on a free port over a tiny run: every tab through
gradio_client (hostile uploads, bad controls, 8 concurrent generations), and the page itself in headless Chromium."""
import io
import shutil
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import job, one_line_error
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the demo extra is not installed (make demo / make test install it)")
from gradio_client import Client, handle_file  # noqa: E402

from pipelines import demo as demo_job  # noqa: E402

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_run):
    run = demo_job.DemoRun.open(tiny_run)
    app = demo_job.build_app(run)
    port = free_port()
    demo_job.launch(app, "127.0.0.1", port, block=False)
    try:
        yield run, f"http://127.0.0.1:{port}/", Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def picture(result):
    return np.asarray(Image.open(result if isinstance(result, str) else result["path"]))


def test_generate_matches_make_sample(served, tiny_run, tmp_path):
    run, _, client = served
    grid, info = client.predict("1: Trouser", 6, 0.9, 5, 0.95, 2.0, 7, api_name="/generate")
    assert "6 images" in info and "label=1" in info
    job("pipelines.sample", "--tokenizer", tiny_run / "tokenizer", "--prior", tiny_run / "prior", "--output",
        tmp_path / "s", "num_samples=6", "label=1", "seed=7", "temperature=0.9", "top_k=5", "top_p=0.95",
        "guidance_scale=2.0", "fid=false")
    files = sorted((tmp_path / "s" / "images").glob("*.png"))
    expected = torch.stack([torch.from_numpy(np.asarray(Image.open(f)).copy()) for f in files])
    images = torch.from_numpy(demo_job.to_picture(expected[:, None].float() / 255))
    assert np.array_equal(picture(grid), images.numpy())


def test_reconstruct_and_complete_a_test_image(served):
    run, _, client = served
    original, recon, codes, table, info = client.predict(None, 3, api_name="/reconstruct")
    side = run.tokenizer.config.latent_size
    assert picture(original).shape == picture(recon).shape and "PSNR" in info and "SSIM" in info
    assert len(table["data"]) == side and all(0 <= c < 32 for row in table["data"] for c in row)
    grid, info = client.predict(None, 2, side // 2, 3, demo_job.ALL_CLASSES, 1.0, 0, 1.0, 1.0, 0, api_name="/complete")
    assert "3 completions" in info and picture(grid).shape[1] > picture(grid).shape[0]
    assert "bits per code" in client.predict(api_name="/model")


def test_an_uploaded_image_is_reconstructed(served, tmp_path):
    _, _, client = served
    path = tmp_path / "shirt.png"
    Image.new("RGBA", (300, 200), (200, 30, 30, 128)).save(path)
    *_, info = client.predict(handle_file(str(path)), 0, api_name="/reconstruct")
    assert info.startswith("uploaded image")


def _hostile_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, the start of the message the page must show)."""
    folder.mkdir()
    cases = []

    def add(name, data, fragment):
        (folder / name).write_bytes(data)
        cases.append((folder / name, fragment))

    good = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good, format="PNG")
    png = good.getvalue()
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, format="JPEG")
    add("text.png", b"this is not an image at all", "is not an image")
    add("empty.png", b"", "is not an image")
    add("truncated.png", png[: len(png) // 2], "could not be read")
    add("truncated.jpg", jpeg.getvalue()[:200], "could not be read")
    add("random.bin", bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "is not an image")
    add("script.svg", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "is not an image")
    add("html.png", b"<html><body>hello</body></html>", "is not an image")
    add("archive.png", b"PK\x03\x04" + bytes(200), "is not an image")
    add("document.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "is not an image")
    bmp = io.BytesIO()
    Image.new("RGB", (64, 64)).save(bmp, format="BMP")
    add("truncated.bmp", bmp.getvalue()[:300], "could not be read")
    # Decompression bombs: a tiny file whose header claims a huge canvas.
    for name, (w, h) in {"bomb.png": (60000, 60000), "bomb2.png": (20000, 20000), "bomb3.png": (5000, 5000)}.items():
        header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        chunk = b"IHDR" + header
        data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        idat = zlib.compress(b"\x00" * 1000)
        data += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
        add(name, data + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")), "refused")
    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, format="PNG")
    add("huge_dimensions.png", big.getvalue(), "refused")
    for mode, name in (("CMYK", "cmyk.jpg"), ("I;16", "sixteen.png"), ("1", "bilevel.png"), ("LA", "la.png"),
                       ("P", "palette.png"), ("F", "float.tiff")):
        buffer = io.BytesIO()
        Image.new(mode, (40, 30)).save(buffer, format="JPEG" if name.endswith("jpg") else
                                       "TIFF" if name.endswith("tiff") else "PNG")
        add(name, buffer.getvalue(), "")  # odd modes and channel counts are converted, not refused
    add("zero.gif", b"GIF89a\x00\x00\x00\x00\x00\x00\x00;", "is not an image")
    return cases


def test_hostile_uploads_get_a_message_and_the_server_keeps_answering(served, tmp_path):
    _, _, client = served
    cases = _hostile_files(tmp_path / "hostile")
    assert len(cases) >= 20
    for path, fragment in cases:
        try:
            result = client.predict(handle_file(str(path)), 0, api_name="/reconstruct")
        except Exception as err:  # gradio_client raises the page's message (gr.Error) as AppError
            assert fragment and fragment in str(err), (path.name, str(err))
            assert "Traceback" not in str(err)
        else:
            assert not fragment or fragment == "", (path.name, "was accepted")
            assert result[-1].startswith("uploaded image")
    grid, info = client.predict(demo_job.ALL_CLASSES, 2, 1.0, 0, 1.0, 1.0, 0, api_name="/generate")
    assert "2 images" in info


@pytest.mark.parametrize("controls, fragment", [
    # The page's own limits (Gradio's checks) answer first where a control has them; ours answer the rest.
    ((demo_job.ALL_CLASSES, 0, 1.0, 0, 1.0, 1.0, 0), "less than minimum value 1"),
    ((demo_job.ALL_CLASSES, 1000, 1.0, 0, 1.0, 1.0, 0), "greater than maximum value 64"),
    ((demo_job.ALL_CLASSES, 2, 0.0, 0, 1.0, 1.0, 0), "temperature must be > 0"),
    ((demo_job.ALL_CLASSES, 2, 1e-400, 0, 1.0, 1.0, 0), "temperature must be > 0"),
    ((demo_job.ALL_CLASSES, 2, 1.0, -3, 1.0, 1.0, 0), "less than minimum value 0"),
    ((demo_job.ALL_CLASSES, 2, 1.0, 0, 1.5, 1.0, 0), "greater than maximum value 1"),
    ((demo_job.ALL_CLASSES, 2, 1.0, 0, 0.0, 1.0, 0), "top_p must lie in"),
    ((demo_job.ALL_CLASSES, 2, 1.0, 0, 1.0, -1.0, 0), "less than minimum value 0"),
    ((demo_job.ALL_CLASSES, 2, 1.0, 0, 1.0, 1.0, 2**40), "seed must lie in"),
    (("99: nothing", 2, 1.0, 0, 1.0, 1.0, 0), "class"),
])
def test_out_of_range_controls_are_messages(served, controls, fragment):
    _, _, client = served
    with pytest.raises(Exception, match=fragment):
        client.predict(*controls, api_name="/generate")


def test_eight_concurrent_generations_are_all_answered(served):
    run, url, _ = served
    clients = [Client(url, verbose=False) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ic: ic[1].predict(demo_job.ALL_CLASSES, 4, 1.0, 0, 1.0, 1.0, ic[0],
                                                        api_name="/generate"), enumerate(clients)))
    assert len(results) == 8 and all("4 images" in info for _, info in results)
    grids = [picture(grid) for grid, _ in results]
    assert not np.array_equal(grids[0], grids[1])  # different seeds, different images


def ask_at_once(url, count):
    """`count` users at once, each with its own client, Generate / Reconstruct / Complete in turn. Returns each
    one's outcome ("answered", "queue full" or the error) and the seconds from the start to the last answer."""
    clients = [Client(url, verbose=False) for _ in range(count)]
    tabs = [
        lambda client, i: client.predict(demo_job.ALL_CLASSES, 4, 1.0, 0, 1.0, 1.0, i, api_name="/generate"),
        lambda client, i: client.predict(None, i, api_name="/reconstruct"),
        lambda client, i: client.predict(None, i, 2, 2, demo_job.ALL_CLASSES, 1.0, 0, 1.0, 1.0, i, api_name="/complete"),
    ]

    def ask(i):
        try:
            tabs[i % len(tabs)](clients[i], i)
            return "answered"
        except Exception as err:  # noqa: BLE001 - gradio_client raises its own types for a refused request
            return "queue full" if "queue is full" in str(err).lower() else f"{type(err).__name__}: {err}"

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(ask, range(count)))
    return outcomes, time.perf_counter() - started


def test_thirty_two_users_at_once_are_all_answered_in_turn(served, record_property):
    """The README's figure: 32 users at once on a tiny run, a mix of the three tabs, all answered one at a time."""
    _, url, _ = served
    outcomes, seconds = ask_at_once(url, 32)
    assert outcomes == ["answered"] * 32
    record_property("seconds_to_the_last_of_32_answers", round(seconds, 1))
    assert seconds < 300


def test_users_past_the_queues_places_are_told_it_is_full(tiny_run):
    run = demo_job.DemoRun.open(tiny_run)
    app = demo_job.build_app(run)
    app.queue(default_concurrency_limit=1, max_size=4)  # the real QUEUE_SIZE is far above what a test can send
    port = free_port()
    demo_job.launch(app, "127.0.0.1", port, block=False)
    try:
        outcomes, _ = ask_at_once(f"http://127.0.0.1:{port}/", 16)
    finally:
        app.close()
    assert set(outcomes) == {"answered", "queue full"}, outcomes
    assert outcomes.count("answered") >= 5  # the one being served and the four waiting


def test_a_missing_run_stops_with_one_line(tmp_path):
    one_line_error(job("pipelines.demo", "--run", tmp_path / "nothing", check=False), "make sample")


def test_the_page_works_in_a_real_browser_and_loads_nothing_from_outside(served, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it where apt-get may run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    _, url, _ = served
    outside = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
            (url.rstrip("/"), "http://localhost", "data:", "blob:")) else None)
        page.goto(url, wait_until="networkidle")
        page.get_by_role("button", name="Generate").click()
        page.locator("#generate-output img").first.wait_for(state="visible", timeout=60_000)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
        for tab in ("Reconstruct", "Complete", "Model"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_load_state("networkidle")
        browser.close()
    assert (tmp_path / "generate.png").stat().st_size > 10_000
    assert not outside, f"the page requested addresses outside this machine: {outside[:5]}"


def test_a_bad_port_is_one_line(tiny_run):
    one_line_error(job("pipelines.demo", "--run", tiny_run, "--port", "99999", check=False), "--port must lie in")


def test_a_picture_handed_to_the_page_is_never_rewritten():
    """Gradio rewrites an array's cache file in place when a later request returns the same picture, so a user still
    downloading it can receive an empty file; the page's pictures are files written whole, once."""
    pictures = demo_job.PictureFiles()
    picture_array = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    first = Path(pictures.path_of(picture_array))
    written = first.stat()
    again = Path(pictures.path_of(picture_array.copy()))
    assert again == first and again.stat().st_mtime_ns == written.st_mtime_ns and again.stat().st_ino == written.st_ino
    assert np.array_equal(np.asarray(Image.open(first)), picture_array)
    assert [p.name for p in pictures.folder.iterdir()] == [first.name]  # no partial file left beside it
    grid, codes, text = pictures.files_for((picture_array[..., 0], [[1, 2]], "text"))
    assert Path(grid).is_file() and codes == [[1, 2]] and text == "text"


def test_a_full_disk_while_writing_a_picture_is_a_message(monkeypatch):
    import errno

    pictures = demo_job.PictureFiles()

    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(demo_job.os, "replace", full_disk)
    call = demo_job._shown(lambda: (np.zeros((4, 4, 3), np.uint8), "text"), pictures)
    with pytest.raises(gradio.Error, match="No space left on device"):
        call()
    assert list(pictures.folder.iterdir()) == []  # no partial file left
