"""Screenshots of every tab of the demo page, for docs/demo.md: serves the page over a run folder and drives Debian's
Chromium through Playwright.

    .venv/bin/python scripts/demo_screenshots.py runs/default docs/
"""
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playwright.sync_api import sync_playwright  # noqa: E402

from pipelines.demo import DemoRun, build_app, launch  # noqa: E402


def main(run: str, folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(DemoRun.open(Path(run)))
    launch(app, "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle")
            page.get_by_role("button", name="Generate").click()
            page.locator("#generate-output img").first.wait_for(state="visible", timeout=120_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "demo_generate.png"), full_page=True)
            for tab, button in (("Reconstruct", "Reconstruct"), ("Complete", "Complete"), ("Model", None)):
                page.get_by_role("tab", name=tab).click()
                if button:
                    page.get_by_role("button", name=button, exact=True).click()
                    page.wait_for_timeout(3000)
                page.wait_for_load_state("networkidle")
                page.wait_for_timeout(500)
                page.screenshot(path=str(out / f"demo_{tab.lower()}.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {', '.join(str(p) for p in sorted(out.glob('demo_*.png')))}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
