"""Headless Chromium for the page tests: Debian's `chromium` + `chromium-driver`, driven by selenium.
`make test` installs the two packages where it can (root with apt-get); elsewhere these tests skip."""

from __future__ import annotations

import os
import shutil

import pytest

INSTALL = "apt-get install chromium chromium-driver (`make test` does it when run as root)"


@pytest.fixture(scope="module")
def browser():
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip(f"headless Chromium is not installed (need chromium and chromedriver on PATH): {INSTALL}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--window-size=1366,900", "--lang=en-US"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
