"""A headless Chromium driven by selenium; tests/serving.py runs the service it looks at.

The browser is the system's (Debian: ``apt-get install chromium chromium-driver``), never a
downloaded one: selenium is pointed at both binaries, so its driver manager never runs.
tests/test_demo.py and tests/screenshot.py (``make screenshot``) share these helpers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "apt-get install chromium chromium-driver"
# Debian and Ubuntu name them so; CHROMIUM and CHROMEDRIVER override the search.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)


@dataclass(frozen=True)
class Browser:
    binary: str
    driver: str


def find_browser() -> Browser | None:
    """The system's Chromium and its driver, or None when either is missing."""
    binary = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("CHROMEDRIVER") or next(filter(None, map(shutil.which, DRIVERS)), None)
    if binary is None or driver is None:
        return None
    return Browser(binary, driver)


@contextmanager
def chromium(browser: Browser, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium session that records its network events (the performance log)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser.binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # containers run as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # no update or safe-browsing calls of its own
        "--disable-component-update",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=browser.driver))
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for since the last call (CDP Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
