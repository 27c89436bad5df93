"""``make screenshot``: docs/demo.png, the demo page of the default model in headless Chromium.

    python -m tests.screenshot [--out docs/demo.png] [--width 1280]

The service runs as ``make demo`` runs it (an embedded Redis loaded with the default model),
under uvicorn in a thread, with the default model's demo sample, which ``make screenshot``
makes first when it is missing (``make demo-sample``; never committed, unlike the picture);
the browser is the system's Chromium (tests/browser.py). The PNG is cut to the page's height
and reduced to a 128-colour palette when Pillow is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.config import Settings
from tests.browser import INSTALL_HINT, chromium, find_browser
from tests.serving import running

ROOT = Path(__file__).resolve().parents[1]


def wait_until_ranked(driver: object, timeout_s: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d) -> bool:  # type: ignore[no-untyped-def]
        if d.find_element("id", "status").get_attribute("role") == "alert":
            raise RuntimeError(d.find_element("id", "status").text)
        return d.find_element("tag name", "body").get_attribute("data-ready") is not None

    WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(ready)


def shrink(path: Path) -> None:
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.screenshot", description=__doc__)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png")
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"no Chromium or chromedriver on PATH: {INSTALL_HINT}", file=sys.stderr)
        return 2
    # As `make demo`: no Redis URL (an embedded one with the default model), the demo on.
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, redis_url=None, model_dir=ROOT / "models", demo=True, log_level="WARNING"
    )
    with running(settings) as url, chromium(browser, args.width, 900) as driver:
        driver.get(f"{url}/demo")
        wait_until_ranked(driver)
        # The viewport as tall as the page, so that one capture holds all of it.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        metrics = {"width": args.width, "height": int(height), "deviceScaleFactor": 1}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": False})
        driver.save_screenshot(str(args.out))
    shrink(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
