"""Drives the page at / in headless Chromium (through chromedriver, with selenium):
register, log in, send a message, see the answer stream in and the balance drop by the
cost, the conversation listed; then, with the balance spent, see the contract's
out-of-tokens error in words. Usage: page_test.py BASE_URL SCREENSHOT_PATH COST; the
server must start users with exactly COST tokens.
Exits non-zero, saying why, when anything is not as it should be."""

import sys

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as until
from selenium.webdriver.support.ui import WebDriverWait

from chromium import start_chromium

base, screenshot, cost = sys.argv[1], sys.argv[2], int(sys.argv[3])

driver = start_chromium()
wait = WebDriverWait(driver, 20)
try:
    driver.get(base + "/")
    assert driver.title == "tokenchat", driver.title
    driver.find_element(By.ID, "username").send_keys("browser-user")
    driver.find_element(By.ID, "password").send_keys("pass123")
    driver.find_element(By.ID, "register").click()
    wait.until(until.visibility_of_element_located((By.ID, "app")))
    balance = driver.find_element(By.ID, "balance")
    wait.until(lambda _: balance.text.isdigit())
    before = int(balance.text)

    # Watch the answer grow: record every length it has while it streams in.
    driver.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
            const answer = document.getElementById("answer");
            if (answer) window.lengths.push(answer.textContent.length);
        }).observe(document.getElementById("history"),
                   { subtree: true, childList: true, characterData: true });
    """)
    driver.find_element(By.ID, "message").send_keys("code hello world in python")
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "true")
    answer = driver.find_element(By.ID, "answer").text
    error = driver.find_element(By.ID, "error").text
    assert error == "", f"the page shows an error: {error}"
    assert "Hello World" in answer and "print" in answer, answer
    lengths = driver.execute_script("return window.lengths")
    distinct = sorted(set(lengths))
    assert len(distinct) >= 3, f"the answer did not stream in pieces: {lengths}"
    wait.until(lambda _: balance.text == str(before - cost))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#conversations li")) == 1)
    driver.save_screenshot(screenshot)

    # The balance is spent: the next message is refused, in words, and charges nothing.
    driver.find_element(By.ID, "message").send_keys("code hello world in go")
    driver.find_element(By.ID, "send").click()
    error = driver.find_element(By.ID, "error")
    wait.until(lambda _: error.text != "")
    assert error.text == "You are out of tokens (balance 0). Ask an operator for more.", error.text
    assert balance.text == "0", balance.text
    print(f"page test passed: balance {before} -> {balance.text}, answer in {len(distinct)} sizes")
finally:
    driver.quit()
