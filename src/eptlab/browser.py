"""Headless Chromium through Selenium: screenshots of the explorer and the report (and the
browser tests' driver). Debian's ``chromium`` and ``chromium-driver`` packages provide the
browser and ``/usr/bin/chromedriver``; ``selenium`` is a dev extra, imported only here."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

WIDTH = 1480


def missing() -> str | None:
    """Why no headless browser can run here, or None when one can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    if shutil.which("chromedriver") is None:
        return "chromedriver is not on PATH (apt-get install chromium chromium-driver)"
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        return "chromium is not on PATH (apt-get install chromium)"
    return None


def start(width: int = WIDTH, height: int = 1000) -> WebDriver:
    """A headless Chromium driven by chromedriver (``--headless=new --no-sandbox``)."""
    why = missing()
    if why is not None:
        raise ConfigError("browser", why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    service = Service(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def fit_height(driver: WebDriver, width: int = WIDTH, height: int | None = None) -> None:
    """Make the viewport exactly ``width`` wide and ``height`` tall (default: as tall as the
    page, for a full-page screenshot), through the DevTools protocol's device-metrics
    override."""
    metrics = {"width": width, "height": height or 1000, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    if height is None:  # the page's height depends on its width: measure after setting it
        page_height = driver.execute_script("return document.documentElement.scrollHeight")
        metrics["height"] = int(page_height)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def screenshot(page: Path, png: Path, width: int = WIDTH, height: int | None = None) -> Path:
    """Render ``page`` headless and save it as ``png``: the whole page, or its top ``height``
    pixels."""
    driver = start(width, height or 1000)
    try:
        driver.get(page.resolve().as_uri())
        fit_height(driver, width, height)
        png.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(png)):
            raise ConfigError("screenshot", f"the browser could not write {png}")
    finally:
        driver.quit()
    return png
