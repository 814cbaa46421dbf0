"""Headless Chromium through Debian's chromedriver, as the browser scripts in this folder
drive it (run by path, so this folder is on their import path)."""

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def start_chromium():
    """A headless Chromium of 1100 by 720 that talks to nothing but the pages it is sent to."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1100,720",
    ]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
