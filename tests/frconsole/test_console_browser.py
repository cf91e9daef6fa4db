"""The web console in a real browser (headless Chromium from Debian, driven by Selenium)
against a real cluster: two ``frctl node run`` processes on loopback, each serving the
console over HTTPS with its own certificate; then against a stand-alone ``frctl server
run`` process with ``[console]``.

It logs in (after a wrong password is refused), reads every page, changes a setting and
sees both node agents apply it, sees a bad value refused with the message ``frctl cluster
settings`` gives, and (with a plain HTTP client holding the browser's session) sees a POST
without the CSRF token refused. Screenshots of each page go to ``tests/artifacts/console/``.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import frproto as fp
from frtesting.cluster import (
    CAP_ADDRESS,
    ClusterSite,
    NodeProcess,
    node_address,
    node_name,
    primary_replicator,
)
from frtesting.server import child_env

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "console"
PASSWORD = "console test password"
MISSING = (
    "install the Debian packages chromium and chromium-driver (scripts/bootstrap does it as root)"
)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[ClusterSite]:
    cluster = ClusterSite(tmp_path, nodes=2, console=True)
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def browser() -> Iterator[object]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
        # The nodes' certificates chain to the test's own CA, which this throwaway
        # browser profile does not know; the plain client below checks them against it.
        "--ignore-certificate-errors",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def _fresh_artifacts(prefix: str) -> None:
    """The screenshots directory, without the old screenshots of one test (the cluster's
    have no prefix; the stand-alone server's are ``standalone-*``)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        if old.name.startswith(prefix) and (prefix or not old.name.startswith("standalone-")):
            old.unlink()


def _shooter(driver: Any) -> Callable[[str], None]:
    def shot(name: str) -> None:
        # The whole page, not only the window's first screen.
        height = driver.execute_script(
            "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
        )
        # The window's size counts its frame too: add room for it.
        driver.set_window_size(1280, max(860, min(int(height) + 160, 2400)))
        driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
        driver.set_window_size(1280, 860)

    return shot


def _set_password(site: ClusterSite) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "frctl.main", "cluster", "admin-password"),
            *("--store", site.store_url, "--prefix", site.prefix),
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "password set" in done.stdout


def _place_vms(site: ClusterSite, count: int) -> list[str]:
    async def run() -> list[str]:
        vmids = []
        for i in range(count):
            vmid = uuid.uuid4()
            answer = await site.query(vmid, name=f"web-{i + 1}")
            assert answer.existing is fp.ExistingVM.NEW
            vmids.append(str(vmid))
        return vmids

    return trio.run(run)


def _replicate(site: ClusterSite, cycles: int) -> tuple[str, str]:
    """A VM really replicated (its initial replication, then ``cycles`` - 1 batches with
    writes between): its VMID and its owner node's name."""
    vmid = uuid.uuid4()
    image = site.root / "disk0.img"
    image.write_bytes(os.urandom(1 << 20))
    replicator = primary_replicator(site, vmid, [image])

    async def run() -> None:
        with trio.fail_after(30):
            for i in range(cycles):
                if i:
                    with image.open("r+b") as f:
                        f.seek(i * 65536)
                        f.write(os.urandom(4096))
                await replicator.cycle()

    trio.run(run)
    return str(vmid), str(replicator.state.node_name)


def _wait_for_log(node: NodeProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.text():
        assert time.monotonic() < deadline, f"{node.name} never logged {text!r}:\n{node.text()}"
        time.sleep(0.05)


def test_the_console_in_a_browser(site: ClusterSite, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    driver = browser
    _fresh_artifacts("")

    shot = _shooter(driver)

    def text() -> str:
        return str(driver.find_element(By.TAG_NAME, "body").text)

    def click(by: str, value: str) -> None:
        """Click what submits a form or follows a link, and wait for the next page (a
        find right after a click may otherwise meet the page that is going away)."""
        old = driver.find_element(By.TAG_NAME, "html")
        driver.find_element(by, value).click()
        WebDriverWait(driver, 10).until(staleness_of(old))

    site.start_all()
    site.authorize_primary()
    _set_password(site)
    vmids = _place_vms(site, 2)
    replicated, owner = _replicate(site, 3)
    n1, n2 = site.running[1], site.running[2]
    assert n1.console_port
    assert n2.console_port
    # The browser uses the console of the node that holds the replicated VM: that node
    # can tell its recovery points.
    here = n1 if owner == n1.name else n2
    assert here.name == owner
    base = f"https://{node_address(here.index)}:{here.console_port}"

    # Each node serves the console with its own certificate, which chains to the CA.
    ca = ssl.create_default_context(cafile=str(site.certs / "ca.pem"))
    for node in (n1, n2):
        url = f"https://{node_address(node.index)}:{node.console_port}/login"
        page = httpx.get(url, verify=ca, timeout=10)
        assert page.status_code == 200
        assert f"served by node {node.name}" in page.text

    # ... and so does the broker's node at the CAP's address.
    cap_port = site.cap_console_port(site.broker_node())
    page = httpx.get(f"https://{CAP_ADDRESS}:{cap_port}/login", verify=ca, timeout=10)
    assert f"served by node {site.broker_node().name}" in page.text

    # A wrong password is refused; the right one opens the cluster page.
    driver.get(base + "/")
    assert driver.current_url == base + "/login"
    shot("login")

    def log_in(password: str) -> None:
        driver.find_element(By.ID, "user").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(password)
        click(By.ID, "login")

    log_in("not the password")
    assert "Wrong user name or password." in text()
    shot("login-refused")
    log_in(PASSWORD)
    assert driver.current_url == base + "/"

    # The cluster page: both nodes up, which one runs the broker, the store.
    body = text()
    holder = site.broker_node().name
    for i in (1, 2):
        assert node_name(i) in body
    rows = driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
    assert len(rows) == 2
    for row in rows:
        assert " up " in f" {row.text} "
        assert ("broker" in row.text) == (holder in row.text)
    assert f"{holder} serves the broker at the CAP" in body
    assert "cluster.db: reachable" in body

    # The VMs, and one VM.
    click(By.LINK_TEXT, "VMs")
    body = text()
    for vmid in [*vmids, replicated]:
        assert vmid in body
    assert "web-1" in body
    shot("vms")
    name = f"vm-{uuid.UUID(replicated).hex[:6]}"
    click(By.LINK_TEXT, name)
    assert f"VM {name}" in text()
    assert replicated in driver.find_element(By.ID, "record").text
    # Its owner tells what arrived: a point for the initial replication and each batch.
    replica = driver.find_element(By.ID, "replica").text
    assert "Initial replication: complete" in replica
    rows = driver.find_elements(By.CSS_SELECTOR, "#points tbody tr")
    assert len(rows) == 3
    assert "last batch applied: " + rows[0].text.split()[0] in replica
    shot("vm")
    # A VM the other node holds: this node says where its points are.
    other = next(v for v in vmids if v != replicated)
    driver.get(f"{base}/vms/{other}")
    replica = driver.find_element(By.ID, "replica").text
    record = driver.find_element(By.ID, "record").text
    if here.name in record:
        assert "holds no data of this replica yet" in replica
    else:
        assert "its recovery points are on that node's storage" in replica

    # Settings: a bad value is refused with frctl's words, nothing is written.
    click(By.LINK_TEXT, "Settings")
    points = driver.find_element(By.ID, "recovery_points")
    assert points.get_attribute("value") == "24"
    points.clear()
    points.send_keys("0")
    click(By.ID, "save")
    assert driver.find_element(By.ID, "message").text == "recovery_points must be at least 1"
    shot("settings-refused")

    # A good value: saved once, applied by every node through the store.
    points = driver.find_element(By.ID, "recovery_points")
    points.clear()
    points.send_keys("7")
    click(By.ID, "save")
    assert "recovery_points: 24 -> 7" in driver.find_element(By.ID, "message").text
    shot("settings")
    for node in (n1, n2):
        _wait_for_log(node, "setting recovery_points changed: 24 -> 7")
    # ... and the cluster page shows each node running the new revision.
    deadline = time.monotonic() + 10
    while True:
        driver.get(base + "/")
        applied = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#nodes td.applied")]
        if len(applied) == 2 and all(a.startswith("applied") for a in applied):
            break
        assert time.monotonic() < deadline, applied
        time.sleep(0.2)
    shot("cluster")

    # The audit log says who changed what.
    click(By.LINK_TEXT, "Audit log")
    audit = driver.find_element(By.ID, "audit").text
    assert f"admin (console at {here.name})" in audit
    assert "recovery_points" in audit
    assert "password" in audit  # frctl cluster admin-password's entry
    shot("audit")

    # A POST without the CSRF token, with the browser's own session cookie: 403.
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    with httpx.Client(base_url=base, verify=ca, cookies=cookies, timeout=10) as client:
        assert client.get("/settings").status_code == 200  # the session is good
        refused = client.post("/settings", data={"recovery_points": "3"})
        assert refused.status_code == 403
    driver.get(base + "/settings")
    assert driver.find_element(By.ID, "recovery_points").get_attribute("value") == "7"


def test_the_standalone_console_in_a_browser(tmp_path: Path, browser: object) -> None:
    """A stand-alone recovery server's console: log in, the VMs (one really replicated),
    the VM, the settings; screenshots ``standalone-*.png``."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.node.site import Site

    from .test_standalone_server import console_url, set_password

    assert isinstance(browser, WebDriver)
    driver = browser
    _fresh_artifacts("standalone-")
    shot = _shooter(driver)

    def click(by: str, value: str) -> None:
        old = driver.find_element(By.TAG_NAME, "html")
        for attempt in range(5):
            # On a loaded machine Chromium may still be swapping the document in when
            # the element is found ("Node with given id does not belong to the
            # document"): find it again in the document that is there now.
            try:
                driver.find_element(by, value).click()
                break
            except WebDriverException as exc:
                if attempt == 4 or "does not belong to the document" not in str(exc):
                    raise
                time.sleep(0.2)
        WebDriverWait(driver, 10).until(staleness_of(old))

    site = Site(tmp_path)
    site.server_config.write_text(site.server_config.read_text() + "\n[console]\nport = 0\n")
    assert set_password(site, PASSWORD).returncode == 0
    server = site.start_server()
    try:
        base = console_url(server)
        vmid = uuid.uuid4()
        image = site.root / "disk0.img"
        image.write_bytes(os.urandom(1 << 20))
        replicator = site.replicator(vmid, "mail-1", [image], server.port)

        async def replicate() -> None:
            with trio.fail_after(30):
                for i in range(3):
                    if i:
                        with image.open("r+b") as f:
                            f.seek(i * 65536)
                            f.write(os.urandom(4096))
                    await replicator.cycle()

        trio.run(replicate)

        driver.get(base + "/")
        assert driver.current_url == base + "/login"
        driver.find_element(By.ID, "user").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        shot("standalone-login")
        click(By.ID, "login")
        assert driver.current_url == base + "/vms"
        nav = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "header nav a")]
        assert nav == ["VMs", "Settings", "Audit log"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#vms tbody tr")
        assert len(rows) == 1
        assert "mail-1" in rows[0].text
        assert str(vmid) in rows[0].text
        assert "complete" in rows[0].text
        shot("standalone-vms")
        click(By.LINK_TEXT, "mail-1")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#points tbody tr")) == 3
        assert "frctl failover test" in driver.find_element(By.ID, "commands").text
        shot("standalone-vm")
        driver.find_element(By.ID, "confirm").click()
        click(By.ID, "start-test")
        assert "built in" in driver.find_element(By.ID, "message").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#copies tbody tr form")) == 1
        shot("standalone-test-failover")
        click(By.LINK_TEXT, "Settings")
        assert "*.primary.example.com" in driver.find_element(By.ID, "authorization").text
        shot("standalone-settings")
        click(By.LINK_TEXT, "Audit log")
        audit = driver.find_element(By.ID, "audit").text
        assert "password" in audit
        assert "test failover" in audit
        shot("standalone-audit")
    finally:
        server.stop()
