"""Drives the page at / in headless Chromium where it used to fail (an attack run's
findings): the older conversations and a conversation's later chats are reachable; Enter
pressed again while a message is on its way sends nothing more; a stream cut short after
text arrived says what it was charged; an answer that starts after the user switched
conversations does not take the shown one's place; logging out leaves nothing of the user
on the page.
Usage: page_faults.py BASE_URL TOKEN, TOKEN of a user with 25 conversations, the newest
of 25 chats ("turn 1" to "turn 25"), the others of one. Exits non-zero, saying why, when
anything is not as it should be."""

import sys

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from chromium import start_chromium

base, token = sys.argv[1], sys.argv[2]

driver = start_chromium()
wait = WebDriverWait(driver, 20)
by_id = lambda name: driver.find_element(By.ID, name)
listed = lambda: driver.find_elements(By.CSS_SELECTOR, "#conversations li")
turns = lambda: driver.find_elements(By.CSS_SELECTOR, "#history .turn")
# The conversation of 25 chats, found by its title ("turn 1") and clicked in the page itself:
# the list is drawn anew whenever it is refreshed, so an element found a moment before may
# be gone, and a new conversation may come first.
open_the_long_one = lambda: driver.execute_script("""
    [...document.querySelectorAll('#conversations li button')]
        .find((button) => button.textContent === "turn 1").click();
""")


def send_and_wait(message, presses=1):
    """Types `message` and presses Enter `presses` times at once, as an impatient user does,
    then waits for the answer to end."""
    driver.execute_script("""
        const [message, presses] = arguments;
        document.getElementById("message").value = message;
        for (let i = 0; i < presses; i++) {
            document.getElementById("message").dispatchEvent(
                new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
        }
    """, message, presses)
    wait.until(lambda d: by_id("answer").get_attribute("data-done") == "true")


try:
    driver.get(base + "/")
    driver.execute_script("sessionStorage.setItem('tokenchat-token', arguments[0])", token)
    driver.get(base + "/")
    wait.until(lambda _: len(listed()) == 20)
    older = by_id("older-conversations")
    assert older.is_displayed(), "no way to the older conversations"
    older.click()
    wait.until(lambda _: len(listed()) == 25)
    assert not older.is_displayed(), "a last page offers more"

    # The newest conversation, whole: its 25 chats, not the first page of 20.
    open_the_long_one()
    wait.until(lambda _: len(turns()) == 50)
    assert turns()[-2].text == "turn 25", turns()[-2].text

    # Enter three times while the first is on its way: one message, one answer.
    send_and_wait("only once", presses=3)
    assert len(turns()) == 52, f"{len(turns())} turns after one message"
    assert by_id("error").text == "", by_id("error").text

    # A stream the model cuts after text arrived is charged, and the page says so.
    send_and_wait("[die-mid-stream] a b c d")
    error = by_id("error").text
    assert "100 tokens were charged for the part that arrived" in error, error

    # A new conversation's answer that starts late, after the user went back to another:
    # the next message goes to the one shown, not to the late one's.
    by_id("new-conversation").click()
    driver.execute_script("""
        document.getElementById("message").value = "[stall] late start";
        document.getElementById("message").dispatchEvent(
            new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
    """)
    open_the_long_one()
    wait.until(lambda _: len(turns()) == 54)
    WebDriverWait(driver, 30).until(lambda _: by_id("send").is_enabled())
    send_and_wait("after switching back")
    assert turns()[-2].text == "after switching back", turns()[-2].text

    # Logging out leaves nothing of the user: not the conversations, not the draft, not
    # the credentials a next user of this tab could log in with, not a message on its way
    # (it is ended, and neither its answer nor its wait reaches the next user).
    driver.execute_script("""
        document.getElementById("message").value = "[stall] on its way at logout";
        document.getElementById("message").dispatchEvent(
            new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
    """)
    by_id("logout").click()
    wait.until(lambda _: by_id("account").is_displayed())
    assert listed() == [] and turns() == [], "the last user's conversations are still in the page"
    for field in ["message", "username", "password"]:
        assert by_id(field).get_attribute("value") == "", f"{field} is kept"
    assert driver.execute_script("return sessionStorage.length") == 0
    by_id("username").send_keys("next-user")
    by_id("password").send_keys("pass123")
    by_id("register").click()
    wait.until(lambda _: by_id("app").is_displayed() and by_id("balance").text == "6000")
    assert by_id("send").is_enabled(), "the last user's message still holds Send"
    assert turns() == [] and by_id("error").text == "", by_id("error").text
    send_and_wait("hello from the next user")
    assert by_id("balance").text == "5900", by_id("balance").text
    print("page faults test passed")
finally:
    driver.quit()
