"""Headless Chromium for the tests that must see a page as a reader would: a screenshot decoded
to pixels (layout checks: columns stacked on a phone, side by side on a desktop; charts drawn)
and the DOM after its scripts ran. Each call is one short-lived browser with its own profile,
so calls may run in parallel; nothing reaches the network but the page's own URL."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import png

Pixel = tuple[int, int, int]
_URL_PREFIXES = ("http://", "https://", "file:", "data:")


def chromium() -> str | None:
    """The Chromium binary (Debian's `chromium`, installed by scripts/bootstrap --test)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, flags: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed: run scripts/bootstrap --test")
    with tempfile.TemporaryDirectory(prefix="relayd-chromium-") as profile:
        args = [
            binary,
            "--headless",
            "--no-sandbox",  # the tests run as root in CI, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",  # one screenshot pixel per CSS pixel
            f"--user-data-dir={profile}",
            *flags,
            url,
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def _as_url(html_or_url: str, beside: Path) -> str:
    """A URL as it is; an HTML text written to a file beside the screenshot, as a file URL."""
    if html_or_url.startswith(_URL_PREFIXES):
        return html_or_url
    page = beside.with_suffix(".html")
    page.write_text(html_or_url, encoding="utf-8")
    return page.resolve().as_uri()


def screenshot(
    html_or_url: str,
    width: int,
    height: int,
    path: str | Path,
    budget_ms: int = 2000,
    timeout: float = 60.0,
) -> list[list[Pixel]]:
    """The page (an HTML text or a URL) drawn in a width x height window, saved as a PNG at
    ``path`` and returned as rows of RGB pixels (top to bottom, left to right). ``budget_ms``
    of virtual time lets the page's scripts (charts) finish before the shot is taken."""
    path = Path(path)
    url = _as_url(html_or_url, path)
    flags = [
        f"--screenshot={path}",
        f"--window-size={width},{height}",
        f"--virtual-time-budget={budget_ms}",
    ]
    _run(url, flags, timeout)
    return read_png(path)


def read_png(path: str | Path) -> list[list[Pixel]]:
    """A PNG file as rows of RGB pixels (alpha, if any, dropped)."""
    _, _, rows, _ = png.Reader(filename=str(path)).asRGB8()
    return [list(zip(row[0::3], row[1::3], row[2::3], strict=True)) for row in rows]


def dump_dom(url: str, width: int, budget_ms: int = 5000, timeout: float = 60.0) -> str:
    """The page's DOM as HTML after its scripts ran for ``budget_ms`` of virtual time, in a
    window ``width`` pixels wide (so that responsive scripts see that width)."""
    flags = ["--dump-dom", f"--window-size={width},900", f"--virtual-time-budget={budget_ms}"]
    return _run(url, flags, timeout).stdout
