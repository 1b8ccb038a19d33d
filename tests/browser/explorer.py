#!/usr/bin/env python3
"""Browser test of the explorer and chat page (issue 16), driven by the
Rust test tests/explorer.rs against a running devnet.

Headless Chromium (Debian's chromium + chromium-driver) through selenium.
Checks: the overview shows the height the API reports and follows new
blocks without a reload; clicking through to a block and a transaction
shows their hashes; searching an address shows its balance after the
test's transfer; the chat page streams an answer and shows its tokens and
cost; no JavaScript errors in the console. Writes screenshots (overview,
block, PoL DAG, chat at desktop and phone widths) and prints measurements
as `MEASURE {json}` lines. Exits non-zero with the reason on any failure.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

DESKTOP = (1280, 900)
PHONE = (390, 844)
WAIT_S = 60  # a liveness bound per step, never a speed claim


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def fail(msg):
    print(f"FAIL {msg}", flush=True)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def measure(**kv):
    print("MEASURE " + json.dumps(kv), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--tx", required=True, help="0x id of the test's transfer")
    ap.add_argument("--height", type=int, required=True, help="its block")
    ap.add_argument("--address", required=True, help="its recipient")
    ap.add_argument("--balance", required=True, help="the recipient's balance in BLY as the page shows it")
    ap.add_argument("--screenshots", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    a = ap.parse_args()
    os.makedirs(a.screenshots, exist_ok=True)
    base = a.url.rstrip("/")

    opts = webdriver.ChromeOptions()
    opts.binary_location = a.chromium
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(a.chromedriver), options=opts)
    console = []

    def drain_console(where):
        for e in driver.get_log("browser"):
            if e.get("level") in ("SEVERE", "ERROR"):
                console.append(f"{where}: {e.get('message')}")

    def wait(cond, what):
        try:
            # Live updates re-render the page: an element read while it is
            # replaced is stale; try again at the next poll.
            return WebDriverWait(driver, WAIT_S, poll_frequency=0.05,
                                 ignored_exceptions=(StaleElementReferenceException,
                                                     NoSuchElementException)).until(lambda d: cond(d))
        except Exception as e:  # noqa: BLE001 - report which step stalled
            drain_console(what)
            fail(f"gave up waiting for {what} ({WAIT_S} s): {type(e).__name__}; console: {console}")

    def text(css):
        # Re-find on a stale element (the page re-rendered in between).
        for _ in range(20):
            try:
                els = driver.find_elements(By.CSS_SELECTOR, css)
                return els[0].text.strip() if els else None
            except StaleElementReferenceException:
                time.sleep(0.05)
        return None

    def shot(name):
        for label, (w, h) in (("desktop", DESKTOP), ("phone", PHONE)):
            driver.set_window_size(w, h)
            time.sleep(0.3)  # let the layout settle at the new width
            path = os.path.join(a.screenshots, f"{name}-{label}.png")
            check(driver.save_screenshot(path), f"screenshot {path}")
        driver.set_window_size(*DESKTOP)

    try:
        # 1. Overview: the height the API reports.
        before = get_json(f"{base}/status")["height"]
        t0 = time.monotonic()
        driver.get(base + "/")
        # Read the page's height before the API's second one: the live
        # stream may show a newer block at any moment after that.
        shown = int(wait(lambda d: text("#ov-height"), "the overview's height"))
        ready_s = time.monotonic() - t0
        after = get_json(f"{base}/status")["height"]
        check(before <= shown <= after, f"overview height {shown} is not between the API's {before} and {after}")
        check(text("#chain-id") == get_json(f"{base}/status")["chain_id"], "chain id in the header")
        nav = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return {load_ms: n.loadEventEnd - n.startTime, dom_ms: n.domContentLoadedEventEnd - n.startTime,"
            " render_ms: Number(document.getElementById('main').dataset.renderMs || -1)};")
        measure(page="overview", wall_ready_s=round(ready_s, 3), **nav)
        # Each page loaded afresh (not a hash change): its load and render time.
        for name, route, title in (("blocks", "#/blocks", "Blocks"), ("validators", "#/validators", "Validators"),
                                   ("rewards", "#/rewards", "Rewards"), ("nodes", "#/nodes", "Nodes"),
                                   ("pol", "#/pol", "Proof of Learning"), ("chat", "#/chat", "Chat")):
            driver.get("about:blank")
            t = time.monotonic()
            driver.get(f"{base}/{route}")
            wait(lambda d: text("main h1") == title
                 and d.find_element(By.ID, "main").get_attribute("data-render-ms"), f"the {name} page")
            wall = time.monotonic() - t
            nav = driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                "return {load_ms: n.loadEventEnd - n.startTime,"
                " render_ms: Number(document.getElementById('main').dataset.renderMs)};")
            measure(page=name, wall_ready_s=round(wall, 3), **nav)
            check(driver.find_elements(By.CSS_SELECTOR, '.nav a[href="#/chat"]'), f"{name} links to Chat")
        drain_console("pages")

        # 2. Live updates: the overview follows new blocks without a reload.
        driver.get(base + "/")
        wait(lambda d: text("#ov-height"), "the overview")
        driver.execute_script("window.__notReloaded = true;")
        first = int(text("#ov-height"))
        wait(lambda d: text("#ov-height") and int(text("#ov-height")) > first, "a pushed block")
        check(driver.execute_script("return window.__notReloaded === true;"), "the page reloaded")
        check("off" not in driver.find_element(By.ID, "live").get_attribute("class"), "live badge on")
        shot("overview")

        # 3. Click through to the block and the transaction.
        block = get_json(f"{base}/block/{a.height}")
        driver.get(f"{base}/#/blocks/{a.height + 1}")
        link = wait(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#block-list a.block-link")
                                if e.text.strip() == str(a.height)], "the block's link")[0]
        link.click()
        wait(lambda d: text("#block-hash") == block["hash"], f"block {a.height}'s hash {block['hash']}")
        shot("block")
        txl = wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'#block-txs a.tx-link[href="#/tx/{a.tx}"]'),
                   "the transaction's link")[0]
        txl.click()
        wait(lambda d: text("#tx-id") == a.tx, f"the transaction's id {a.tx}")
        drain_console("block and transaction")

        # 4. Search the recipient's address.
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys(a.address)
        driver.find_element(By.CSS_SELECTOR, "#search button").click()
        wait(lambda d: text("#account-address") == a.address.lower(), "the account page")
        bal = wait(lambda d: text("#account-balance"), "the balance")
        check(bal == a.balance, f"balance shows {bal!r}, expected {a.balance!r}")
        check(driver.find_elements(By.CSS_SELECTOR, f'#account-txs a.tx-link[href="#/tx/{a.tx}"]'),
              "the transfer is among the account's recent transactions")
        drain_console("search")

        # 5. The PoL DAG.
        driver.get(f"{base}/#/pol")
        wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#pol-dag g.pol-node.meta"), "the DAG's meta block")
        nodes = len(driver.find_elements(By.CSS_SELECTOR, "#pol-dag g.pol-node"))
        heads = len(driver.find_elements(By.CSS_SELECTOR, "#pol-dag g.pol-node.head"))
        check(nodes >= 2 and heads >= 1, f"DAG of {nodes} blocks with {heads} heads")
        measure(page="pol", dag_blocks=nodes, dag_heads=heads)
        shot("pol-dag")

        # 6. Chat: streamed, with tokens and cost.
        driver.get(f"{base}/#/chat")
        wait(lambda d: d.find_elements(By.ID, "chat-prompt"), "the chat form")
        driver.execute_script(
            "window.__pieces = 0; new MutationObserver(() => window.__pieces++)"
            ".observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});")
        driver.find_element(By.ID, "chat-max").clear()
        driver.find_element(By.ID, "chat-max").send_keys("24")
        driver.find_element(By.ID, "chat-prompt").send_keys("Hello, Blyan")
        t = time.monotonic()
        driver.find_element(By.ID, "chat-send").click()
        meta = wait(lambda d: (m := text(".msg.assistant:not(.streaming) .chat-meta")) and m, "the answer's usage")
        answer = text(".msg.assistant .chat-answer") or ""
        pieces = driver.execute_script("return window.__pieces;")
        tokens = text(".chat-tokens")
        cost = text(".chat-cost")
        measure(page="chat", answer_s=round(time.monotonic() - t, 3), dom_updates=pieces,
                answer_chars=len(answer), tokens=tokens, cost=cost, meta=meta)
        check(answer, f"an answer was streamed (meta: {meta})")
        check(pieces >= 3, f"the answer arrived in pieces (DOM updates: {pieces})")
        check(tokens and tokens.endswith("tokens"), f"tokens shown (meta: {meta})")
        check(cost and cost.endswith("BLY"), f"cost shown (meta: {meta})")
        # Without a key the devnet serves for free: reported, not charged.
        check("not charged (free use)" in (meta or ""), f"free use shown as not charged (meta: {meta})")
        shot("chat")
        drain_console("chat")
        check(not console, f"JavaScript console errors: {console}")
        print("OK", flush=True)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
