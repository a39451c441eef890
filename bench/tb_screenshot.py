"""A screenshot of a run's TensorBoard scalars dashboard, as an operator's browser shows it.

    python bench/tb_screenshot.py --logdir runs/demo --out docs/img/tensorboard.png

Starts ``tensorboard --logdir`` on a free local port, waits until its scalar tags are served,
opens the dashboard in headless Chromium (Debian: ``apt-get install -y chromium``) with a fresh
profile and saves a PNG; then stops TensorBoard. ``--dashboard`` picks the view
(``timeseries``, TensorBoard's default, or ``scalars``); ``--wait-ms`` is Chromium's virtual-time
budget, the time the page gets to fetch and draw its charts before the screenshot. Charts are
drawn as SVG (``?forceSVG=true``): headless Chromium without a GPU leaves WebGL charts blank.

Why a script: the dashboard's group order is what operators see first, and it follows the tag
names (``higr_dist.engine.logging.tb_tag``). The screenshot in ``docs/OPERATIONS.md`` is this
script's output on a short run; run it on any run folder to check a change of tags.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_tags(url: str, timeout_s: float) -> dict:
    """Poll TensorBoard's scalar tag list until it names at least one tag."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as r:
                tags = json.loads(r.read())
            if any(tags.values()):
                return tags
        except OSError as e:
            last = e
        time.sleep(1.0)
    raise TimeoutError(f"TensorBoard at {url} served no scalar tags in {timeout_s:.0f} s ({last})")


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no Chromium found (Debian: apt-get install -y chromium)")


def screenshot(url: str, out: Path, size: str, wait_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tb-chromium-") as profile:
        cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
               f"--screenshot={out.resolve()}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", required=True, help="a run folder (its stages' tb/ folders)")
    p.add_argument("--out", default="docs/img/tensorboard.png")
    p.add_argument("--dashboard", default="timeseries", choices=("timeseries", "scalars"))
    p.add_argument("--size", default="1600,1100", help="window width,height in pixels")
    p.add_argument("--wait-ms", type=int, default=20000, help="Chromium's virtual-time budget")
    p.add_argument("--timeout-s", type=float, default=120.0, help="for TensorBoard to load")
    args = p.parse_args(argv)
    if not Path(args.logdir).is_dir():
        print(f"tb_screenshot: {args.logdir} is not a folder", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir,
                           "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        tags = wait_for_tags(url, args.timeout_s)
        screenshot(f"{url}/?forceSVG=true#{args.dashboard}", Path(args.out), args.size, args.wait_ms)
    finally:
        tb.terminate()
        try:
            tb.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tb.kill()
    groups = sorted({t.split("/")[0] for run in tags.values() for t in run})
    print(f"wrote {args.out}: runs {', '.join(sorted(tags))}; tag groups {', '.join(groups)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
