"""Headless Chromium for browser tests, with no Python dependency beyond the standard library.

    path = require_chromium()                          # or pytest.skip with the reason
    html = dump_dom(path, url)                         # the DOM after the page's scripts ran
    screenshot(path, url, out_png, size=(1200, 900))
    dom = parse_html(html); dom.by_id("status").text; dom.by_class("token")

Chromium is found at $ATTNLM_CHROMIUM, /usr/bin/chromium or on PATH. Missing, it is installed
once per session with `apt-get install -y chromium` (Debian, as root; ATTNLM_NO_BROWSER_INSTALL=1
turns that off). `--virtual-time-budget` lets the page's fetches and timers finish before the DOM
is dumped or the screenshot taken: virtual time only advances while nothing is loading.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_TIMEOUT_S = 300
RUN_TIMEOUT_S = 60

# As /work/shared/MACHINE-NOTES.md: without the networking flags Chromium tries to reach Google's
# hosts at every start, which this machine's closed network refuses.
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--mute-audio",
)

_install_outcome: tuple[str | None, str] | None = None  # (path, reason), once per session


def find_chromium() -> str | None:
    """The Chromium executable, or None."""
    env = os.environ.get("ATTNLM_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def install_chromium(timeout_s: float = INSTALL_TIMEOUT_S) -> tuple[str | None, str]:
    """Try `apt-get update && apt-get install -y chromium` once; (path or None, reason)."""
    global _install_outcome
    if _install_outcome is not None:
        return _install_outcome
    if os.environ.get("ATTNLM_NO_BROWSER_INSTALL") == "1":
        _install_outcome = (None, "chromium not found and ATTNLM_NO_BROWSER_INSTALL=1")
    elif not shutil.which("apt-get"):
        _install_outcome = (None, "chromium not found and no apt-get to install it")
    elif hasattr(os, "geteuid") and os.geteuid() != 0:
        _install_outcome = (None, "chromium not found; installing it with apt-get needs root")
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        start = time.monotonic()
        try:
            for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
                left = timeout_s - (time.monotonic() - start)
                proc = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, timeout=max(1.0, left)
                )
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    raise RuntimeError(f"`{' '.join(cmd)}` failed: {' / '.join(tail)}")
            path = find_chromium()
            _install_outcome = (path, "installed" if path else "apt-get ran but no chromium found")
        except subprocess.TimeoutExpired:
            _install_outcome = (None, f"installing chromium took over {timeout_s:.0f} s")
        except (OSError, RuntimeError) as err:
            _install_outcome = (None, f"could not install chromium: {err}")
    return _install_outcome


def require_chromium() -> str:
    """Chromium's path; installs it if missing, else skips the calling test with the reason."""
    path = find_chromium()
    if path:
        return path
    if os.environ.get("ATTNLM_CHROMIUM"):
        pytest.skip(f"ATTNLM_CHROMIUM={os.environ['ATTNLM_CHROMIUM']} is not an executable")
    path, reason = install_chromium()
    if not path:
        pytest.skip(reason)
    return path


def _run(chromium: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"chromium ran over {timeout_s} s: {' '.join(cmd)}") from err
    if proc.returncode != 0:
        raise AssertionError(
            f"chromium exited {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}"
        )
    return proc


def dump_dom(
    chromium: str,
    url: str,
    size: tuple[int, int] = (1200, 900),
    budget_ms: int | None = 5000,
    timeout_s: float = RUN_TIMEOUT_S,
) -> str:
    """The serialized DOM of `url` once its scripts (and fetches) have run; `budget_ms` None:
    in real time (performance.now() then counts network waits too), once the page's load event
    fired (a resource the page loads can hold it)."""
    budget = [] if budget_ms is None else [f"--virtual-time-budget={budget_ms}"]
    proc = _run(
        chromium,
        [f"--window-size={size[0]},{size[1]}", *budget, "--dump-dom", url],
        timeout_s,
    )
    return proc.stdout


def screenshot(
    chromium: str,
    url: str,
    out: str | os.PathLike,
    size: tuple[int, int] = (1200, 900),
    budget_ms: int = 5000,
    timeout_s: float = RUN_TIMEOUT_S,
) -> Path:
    """A PNG of the viewport (size) of `url` once its scripts (and fetches) have run."""
    out = Path(out)
    _run(
        chromium,
        [
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ],
        timeout_s,
    )
    if not out.is_file():
        raise AssertionError(f"chromium wrote no screenshot at {out}")
    return out


# -- a small DOM, enough to query a dumped page by id and class ----------------------------------
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def by_id(self, id_: str) -> Element | None:
        return next((e for e in self.iter() if e.attrs.get("id") == id_), None)

    def by_class(self, cls: str) -> list[Element]:
        return [e for e in self.iter() if cls in e.classes]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        el = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse_html(html: str) -> Element:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root
