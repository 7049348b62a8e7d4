"""Headless Chromium for the report tests: Debian's chromium and chromium-driver, driven through Selenium.

The browser is started by the test with a fresh profile and every background service off (without
them it waits on connections this sandbox refuses); Selenium is pointed at Debian's chromedriver and
chromium, so it never downloads a browser or driver of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("TOKENRIG_REQUIRE_CHROMIUM"),
    reason="chromium not installed (apt-get install chromium chromium-driver; .ci/run does)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


@contextmanager
def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    profile = tempfile.mkdtemp(prefix="tokenrig-chromium-")
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# every plotly chart on the page: its title, each trace's name and point count (from the data plotly
# drew), and how many traces it rendered into the SVG
CHARTS_JS = """
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(chart => ({
  id: chart.id,
  title: (chart.layout.title || {}).text || '',
  traces: chart.data.map(t => ({name: t.name || '', type: t.type || 'scatter',
                                points: (t.x || t.y || []).length,
                                sum: Array.from(t.y || []).reduce((a, b) => a + (typeof b === 'number' ? b : 0), 0)})),
  drawn: chart.querySelectorAll('.scatterlayer .trace, .barlayer .trace').length,
}));
"""


def wait_for_charts(driver, timeout_s: float = 60) -> None:
    """Plotly draws each chart asynchronously after the page has loaded: wait until every one is drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script(
        "const all = document.querySelectorAll('.plotly-graph-div');"
        "return all.length === document.querySelectorAll('.plotly-graph-div.js-plotly-plot').length"
        " && Array.from(all).every(c => c.querySelector('.main-svg'));"))
