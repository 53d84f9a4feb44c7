"""The admin in a real browser: what an operator clicks, and what the HTML part of a message cannot do.

Debian's chromium, headless, driven by Selenium through Debian's
chromedriver (named by path, so Selenium downloads nothing), against
pytest-django's live server. The request counter on 127.0.0.1 is how the
test knows that the preview fetched nothing and ran no script: a browser
that loaded the image or ran the script would ask it.

Without chromium, chromedriver or selenium the test is skipped, except
under CI (``CI`` set), where it fails: CI must really run it.
Screenshots go to ``MAILER_TEST_SCREENSHOTS`` (the test's tmp dir by
default); with ``MAILER_UPDATE_SCREENSHOTS=1`` the documentation's copies in
docs/_static/screenshots/ are replaced too.
"""

import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.mail import EmailMultiAlternatives

from mailer.models import Message, MessageLog

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "_static" / "screenshots"


def _missing() -> str | None:
    for program in (CHROMIUM, CHROMEDRIVER):
        if not program.exists():
            return f"{program} is not installed"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


class RequestCounter(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that answers every GET and POST with an empty 204 and counts the paths."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                counter.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def live_server() -> Iterator[Any]:
    """pytest-django's live server, serving the admin's own CSS and scripts (the test settings have no static files).

    The server's static handler reads ``STATIC_URL`` when it starts, so the
    settings are changed before it, for this module.
    """
    import django.contrib.admin
    from django.test import override_settings
    from pytest_django.live_server_helper import LiveServer

    admin_static = Path(django.contrib.admin.__file__).parent / "static"
    with override_settings(STATIC_URL="/static/", STATIC_ROOT=str(admin_static)):
        server = LiveServer("localhost")
        yield server
        server.stop()


@pytest.fixture
def request_counter() -> Iterator[RequestCounter]:
    server = RequestCounter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def browser() -> Iterator[Any]:
    problem = _missing()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {problem}")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,800")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(browser, tmp_path) -> Any:
    """Save what the browser shows under ``name``.png, and into the docs when asked to."""
    directory = Path(os.environ.get("MAILER_TEST_SCREENSHOTS") or tmp_path / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)

    def take(name: str) -> None:
        path = directory / f"{name}.png"
        assert browser.save_screenshot(str(path)), path
        if os.environ.get("MAILER_UPDATE_SCREENSHOTS") == "1":
            DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_SCREENSHOTS / path.name)

    return take


def queue_newsletter(tracker: str) -> Message:
    """A message whose HTML part would change its own page, call the tracker, and load a remote image, if it could."""
    email = EmailMultiAlternatives(
        "Spring newsletter",
        "The text version of the newsletter.",
        "News <news@example.com>",
        ["reader@example.com"],
        attachments=[("programme.txt", "Talks at ten.", "text/plain")],
    )
    email.attach_alternative(
        '<h1 id="headline" style="color: #264b5d">Spring newsletter</h1>'
        "<p>Rendered, but inert: no script, no remote image.</p>"
        f'<img id="tracker" alt="tracker" src="{tracker}/pixel.png">'
        '<script>document.getElementById("headline").textContent = "script ran";'
        f'fetch("{tracker}/script-ran", {{method: "POST"}});</script>',
        "text/html",
    )
    message = Message.for_email(email)
    message.save()
    return message


def queue_plain(subject: str, to: str) -> Message:
    message = Message.for_email(EmailMultiAlternatives(subject, "Body", "Shop <shop@example.com>", [to]))
    message.save()
    return message


def and_wait_for_the_next_page(browser, act: Any) -> None:
    """Do ``act`` (a click, a submit), then wait until the browser has loaded the page that replaces this one.

    A click returns before the browser follows it: reading the page at once
    could read the old one. The wait ends on the event, not after a time
    (the limit is only there so that a broken page fails the test).
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old_page = browser.find_element(By.TAG_NAME, "html")
    act()
    wait = WebDriverWait(browser, 60)
    wait.until(expected_conditions.staleness_of(old_page))
    wait.until(lambda driver: driver.execute_script("return document.readyState") == "complete")


def log_in(browser, live_server, admin_user) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{live_server.url}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys(admin_user.username)
    browser.find_element(By.NAME, "password").send_keys("password")
    and_wait_for_the_next_page(browser, browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click)
    assert browser.find_element(By.ID, "user-tools").text.upper().startswith("WELCOME")
    # The navigation sidebar closed, as the admin remembers it: the lists get the width.
    browser.execute_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")


def shown_messages(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [item.text for item in browser.find_elements(By.CSS_SELECTOR, "ul.messagelist li")]


def column(browser, name: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, f"#result_list td.field-{name}")]


def run_action(browser, action: str, subjects: list[str]) -> None:
    """Tick the rows with these subjects, choose the action and press Go, as an operator does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr"):
        if row.find_element(By.CSS_SELECTOR, "td.field-subject").text in subjects:
            row.find_element(By.CSS_SELECTOR, "input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value(action)
    and_wait_for_the_next_page(browser, browser.find_element(By.CSS_SELECTOR, "button[name=index]").click)


def test_an_operator_finds_reads_sends_and_requeues_mail(
    browser, live_server, admin_user, deliver_to_smtp, request_counter, screenshot
):
    from selenium.webdriver.common.by import By

    # The counter answers a browser that asks: a request from the preview would be seen.
    browser.get(f"{request_counter.url}/reachable")
    assert request_counter.paths == ["/reachable"]
    request_counter.paths.clear()

    newsletter = queue_newsletter(request_counter.url)
    queue_plain("Your order", "buyer@example.com")
    refused = queue_plain("Refused invoice", "gone@example.com")
    refused.fail_permanently("550 5.1.1 <gone@example.com>: no such user")
    log_in(browser, live_server, admin_user)

    # Search by recipient: only that message is listed.
    browser.get(f"{live_server.url}/admin/mailer/message/")
    assert sorted(column(browser, "subject")) == ["Refused invoice", "Spring newsletter", "Your order"]
    screenshot("message-list")
    search = browser.find_element(By.ID, "searchbar")
    search.send_keys("reader@example.com")
    and_wait_for_the_next_page(browser, search.submit)
    assert column(browser, "subject") == ["Spring newsletter"]

    # Its page: the HTML part is rendered in the frame, its script did not run, nothing was fetched.
    link = browser.find_element(By.CSS_SELECTOR, "#result_list th.field-id a, #result_list td.field-id a")
    and_wait_for_the_next_page(browser, link.click)
    assert f"/admin/mailer/message/{newsletter.pk}/change/" in browser.current_url
    assert browser.find_element(By.CSS_SELECTOR, ".field-attachments a").text.startswith("programme.txt")
    frame = browser.find_element(By.CSS_SELECTOR, ".field-html_preview iframe")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", frame)
    screenshot("message-detail")
    browser.switch_to.frame(frame)
    assert browser.find_element(By.ID, "headline").text == "Spring newsletter"
    assert browser.execute_script("return document.getElementById('tracker').naturalWidth") == 0
    browser.switch_to.default_content()
    # The page and its frame have loaded (the frame before the page's load event); the browser
    # sends nothing more for it.
    assert browser.execute_script("return document.readyState") == "complete"
    assert request_counter.paths == []

    # "Send now" on two messages through the real SMTP server: the page says what the pass did.
    browser.get(f"{live_server.url}/admin/mailer/message/")
    run_action(browser, "send_messages", ["Spring newsletter", "Your order"])
    assert shown_messages(browser) == [
        "Message(s) sent: 2 sent, 0 deferred, 0 failed permanently, 0 not sent (don't send list)."
    ]
    assert sorted(r.message["Subject"] for r in deliver_to_smtp.received) == ["Spring newsletter", "Your order"]
    assert column(browser, "subject") == ["Refused invoice"]
    assert column(browser, "last_error") == ["550 5.1.1 <gone@example.com>: no such user"]

    # The permanent failure, requeued: back in the queue.
    run_action(browser, "requeue_failed_messages", ["Refused invoice"])
    assert shown_messages(browser) == ["1 message queued again."]
    assert column(browser, "state") == ["queued"]

    browser.get(f"{live_server.url}/admin/mailer/messagelog/")
    assert sorted(column(browser, "result")) == ["failure", "success", "success"]
    screenshot("log-list")
    assert MessageLog.objects.count() == 3
    assert request_counter.paths == []
