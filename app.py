"""Hugging Face Space entry point: the demo page (pipelines/demo.py) over the run folder named by $RUN.

On a Space (which sets SPACE_ID) it binds 0.0.0.0:7860 as Spaces expect; anywhere else it binds 127.0.0.1 like
`make demo`. See docs/demo.md.
"""
import os
from pathlib import Path

from configio.cli import run_cli
from pipelines.demo import DemoRun, build_app, launch


def main() -> None:
    host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    launch(build_app(DemoRun.open(Path(os.environ.get("RUN", "runs/default")))), host, port)


if __name__ == "__main__":
    run_cli(main)
