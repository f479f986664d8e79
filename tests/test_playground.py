"""The playground page (`GET /` on `ortlora serve`) in a real headless Chromium, driven by Selenium, against a real
server (serve_helpers' fixtures: a tiny random llama, four adapters, tenants). Each panel's streamed text is checked
against what the `openai` client gets for the same request. One test follows the README's "Next" section on the
quickstart's own folder: its `ortlora serve` command, its curl request, then this page.

Chromium and chromedriver come from the distribution's packages (scripts/setup-browser.sh); without them the
browser tests skip and say so.

The README's screenshot comes from this file too, against the quickstart's model (see `main` at the end):
    python tests/test_playground.py /tmp/qs/onnx/fp32 docs/playground.png
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import ACME, ADMIN, BETA, PROMPTS, ServerProcess

TOKENS = 12
README = Path(__file__).resolve().parents[1] / "README.md"
WAIT_S = 120  # a bound on any one wait for the page (the tiny model answers in well under a second)


def chromium() -> tuple[str, str] | None:
    """(browser, driver) executables from the system, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is in the `test` extra: pip install -e '.[test]'")
    found = chromium()
    if found is None:
        pytest.skip("no chromium + chromedriver on PATH: run scripts/setup-browser.sh "
                    "(Debian: apt-get install chromium chromium-driver)")
    driver = start_browser(*found)
    yield driver
    driver.quit()  # stops chromedriver (its own process) and the browser it started


def start_browser(binary: str, driver_path: str, width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))  # never Selenium Manager's download
    driver.set_script_timeout(30)
    return driver


# -- driving the page ----------------------------------------------------------------------------------------------
def wait_for(driver, script: str, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(script), message=f"the page never got to: {what}")


def open_page(driver, url: str, key: str) -> list[str]:
    """Load the page in a fresh tab state, type `key` (Enter loads the models); the model checkboxes' names."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    driver.execute_script("sessionStorage.clear(); localStorage.clear();")
    driver.get(url)
    box = driver.find_element(By.ID, "key")
    box.clear()
    box.send_keys(key, Keys.ENTER)
    wait_for(driver, "return document.getElementById('models').dataset.state === 'listed' && "
                     f"document.getElementById('key').value === {json.dumps(key)}", "models listed")
    return models_shown(driver)


def models_shown(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('input[name=model]')].map(i => i.value)")


def choose(driver, models: list[str], prompt: str, mode: str = "completion", max_tokens: int = TOKENS) -> None:
    from selenium.webdriver.common.by import By

    for box in driver.find_elements(By.CSS_SELECTOR, "input[name=model]"):
        if box.is_selected() != (box.get_attribute("value") in models):
            box.click()
    driver.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    for field, value in (("prompt", prompt), ("max_tokens", str(max_tokens)), ("temperature", "0")):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def panels_after_run(driver) -> list[dict]:
    """Wait (bounded) until every panel has finished; each panel's model, state, text and stats."""
    wait_for(driver, "return document.getElementById('run').getAttribute('aria-disabled') === 'false' && "
                     "document.querySelectorAll('.panel').length > 0 && "
                     "[...document.querySelectorAll('.panel')].every(p => p.dataset.state !== 'running')",
             "every panel finished")
    return driver.execute_script("""return [...document.querySelectorAll('.panel')].map(p => ({
        model: p.dataset.model, state: p.dataset.state, text: p.querySelector('pre').textContent,
        stats: p.querySelector('.stats').textContent, message: p.querySelector('[role=alert]')?.textContent}))""")


def logprobs_offered(url: str) -> bool:
    r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60,
                   json={"model": "base", "prompt": "The", "max_tokens": 1, "logprobs": 1})
    assert r.status_code in (200, 400), r.text
    return r.status_code == 200


# -- tests -----------------------------------------------------------------------------------------------------------
def test_static_files_need_no_key_and_only_the_page_is_served(server):
    for path in ("/", "/playground"):
        r = httpx.get(server.url + path)  # tenants are on: the API would answer 401 without a key
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert "playground/playground.js" in r.text and "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(server.url + "/playground/playground.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/playground/playground.css").headers["content-type"].startswith("text/css")
    for path in ("/playground/index.html", "/playground/..%2Fapp.py", "/playground/nope.js"):
        assert httpx.get(server.url + path).status_code == 404, path
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert "/playground" not in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_page_streams_base_and_two_adapters_as_the_api_answers(server, browser):
    import openai
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    shown = open_page(browser, server.url + "/", ADMIN)
    assert shown == [m.id for m in client.models.list()] and {"base", "a1", "a2"} <= set(shown)
    chosen = ["base", "a1", "a2"]
    choose(browser, chosen, PROMPTS[0])
    browser.find_element(By.ID, "run").click()
    panels = panels_after_run(browser)
    assert [p["model"] for p in panels] == chosen
    for p in panels:
        api = client.completions.create(model=p["model"], prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0,
                                        top_p=1)
        assert p["state"] == "done", p
        assert p["text"] == api.choices[0].text, p["model"]
        stats = re.fullmatch(r"first token (\d+) ms · (\d+) tokens? in ([\d.]+) s · ([\d.]+) tok/s · finish: (\w+)",
                             p["stats"])
        assert stats and int(stats[2]) == api.usage.completion_tokens and float(stats[4]) > 0, p
    # the page sent its requests at once: they decoded together (3 here every time; 2 allows a busy machine)
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert float(re.search(r"^ortlora_decode_batch_adapters_max (\S+)$", metrics, re.M)[1]) >= 2, metrics
    texts = [p["text"] for p in panels]
    assert len(set(texts)) == len(texts) and all(texts)  # each adapter changes the output: equality means something

    # compare: the first two panels by default, then base against a2
    compare = browser.find_element(By.ID, "compare")
    for a, b in ((0, 1), (0, 2)):
        Select(browser.find_element(By.ID, "cmp-a")).select_by_index(a)
        Select(browser.find_element(By.ID, "cmp-b")).select_by_index(b)
        at = next(i for i, (x, y) in enumerate(zip(texts[a] + "\0", texts[b] + "\1")) if x != y)
        assert compare.get_attribute("data-diverge-at") == str(at)
        marks = [m.get_attribute("textContent") for m in compare.find_elements(By.TAG_NAME, "mark")]
        assert marks == [texts[a][at:], texts[b][at:]]
    if logprobs_offered(server.url):
        # (token texts are not compared with the text: a token may be part of a character)
        strips = [[float(p.text) for p in s.find_elements(By.CSS_SELECTOR, ".tok small")]
                  for s in compare.find_elements(By.CSS_SELECTOR, ".tokens")]
        assert len(strips) == 2 and all(s and all(0 <= p <= 1 for p in s) for s in strips), strips
    else:
        assert "logprobs" in compare.find_element(By.CSS_SELECTOR, ".note").text

    # chat mode, run from the keyboard; the key stays in this tab's sessionStorage, never in localStorage
    choose(browser, chosen, PROMPTS[1], mode="chat")
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    panels = panels_after_run(browser)
    assert [p["model"] for p in panels] == chosen
    for p in panels:
        api = client.chat.completions.create(model=p["model"], messages=[{"role": "user", "content": PROMPTS[1]}],
                                             max_tokens=TOKENS, temperature=0, top_p=1).choices[0].message.content
        assert p["state"] == "done" and p["text"] == api, p
    storage = browser.execute_script(
        "return [sessionStorage.getItem('ortlora.playground.apiKey'), localStorage.length]")
    assert storage == [ADMIN, 0]

    # Escape stops a long run: every panel ends "stopped", and the page can run again
    choose(browser, ["a3"], PROMPTS[0], max_tokens=900)
    browser.find_element(By.ID, "run").click()
    wait_for(browser, "return document.querySelector('.panel pre').textContent.length > 0", "a3 streaming")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert [p["state"] for p in panels_after_run(browser)] == ["stopped"]


def test_a_key_sees_only_its_models_and_runs_with_them(server, browser):
    from selenium.webdriver.common.by import By

    assert open_page(browser, server.url + "/playground", ACME) == ["a1", "a2"]  # tenant acme: no base model
    choose(browser, ["a2"], PROMPTS[1])
    browser.find_element(By.ID, "run").click()
    (panel,) = panels_after_run(browser)
    assert panel["state"] == "done" and panel["model"] == "a2" and panel["text"]
    assert open_page(browser, server.url + "/", BETA) == ["base", "a3", "a4"]

    browser.find_element(By.ID, "key").clear()
    browser.find_element(By.ID, "key").send_keys("wrong-key")
    browser.find_element(By.ID, "load").click()
    wait_for(browser, "return document.getElementById('models').dataset.state === 'failed'", "401 shown")
    assert "API key" in browser.find_element(By.ID, "status").text
    assert models_shown(browser) == []
    # a model the key may not use (another tenant's adapter), asked for by hand: the panel shows the API's 404
    open_page(browser, server.url + "/", ACME)
    browser.execute_script("document.querySelector('input[name=model]').value = 'a3'")
    choose(browser, ["a3"], PROMPTS[0])
    browser.find_element(By.ID, "run").click()
    (panel,) = panels_after_run(browser)
    assert panel["state"] == "error" and "does not exist" in panel["message"]


def test_narrow_window_has_one_column_and_no_sideways_scroll(server, browser):
    open_page(browser, server.url + "/", ADMIN)
    try:
        browser.set_window_size(360, 800)
        layout = browser.execute_script("""
            const form = document.getElementById('request').getBoundingClientRect();
            const results = document.querySelector('.results').getBoundingClientRect();
            return [document.documentElement.scrollWidth, window.innerWidth, form.bottom <= results.top];""")
        assert layout[0] <= layout[1] and layout[2], layout
    finally:
        browser.set_window_size(1280, 900)


# -- the README's screenshot -------------------------------------------------------------------------------------------
def readme_next_steps() -> tuple[list[str], dict]:
    """The README's "Next" section as written: its `ortlora serve` command and its curl request's body."""
    section = README.read_text().split("## Next: serve what the quickstart made", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    serve = next(line for line in blocks[0].splitlines() if line.startswith("ortlora serve"))
    body = re.search(r"-d '(.*)'", blocks[1].replace("\\\n", " "))[1]
    return shlex.split(serve), json.loads(body)


def test_the_readmes_next_steps_serve_the_quickstart_and_its_playground_answers(quickstarted, browser, tmp_path):
    """A newcomer's path after the quickstart, as the README writes it: its `ortlora serve` command on the
    quickstart's folder (the precision the quickstart recommends for this CPU), its curl request, then the
    playground with the base model and both adapters, each answering its own task."""
    from ortlora.quickstart import serving_precision
    from ortlora.quickstart import tasks

    work, _ = quickstarted
    argv, body = readme_next_steps()
    assert argv[:2] == ["ortlora", "serve"]
    argv = [a.replace("ortlora-quickstart", str(work)).replace("/onnx/int8", f"/onnx/{serving_precision()}")
            for a in argv]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ortlora.cli", *argv[1:], "--port", str(port), "--log-level",
                                 "warning"], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        rows = {task: tasks.load(f"{task}_test")[0] for task in tasks.ADAPTER_TASKS}
        assert body["prompt"] == rows["upper"]["prompt"] == rows["shift"]["prompt"]
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == rows[body["model"]]["response"], r.text

        from selenium.webdriver.common.by import By

        models = open_page(browser, url + "/", "")  # no --tenants: no key needed
        assert set(models) == {"base", *tasks.ADAPTER_TASKS}
        choose(browser, ["base", *tasks.ADAPTER_TASKS], body["prompt"], max_tokens=16)
        browser.find_element(By.ID, "run").click()
        texts = {p["model"]: p["text"] for p in panels_after_run(browser)}
        for task, row in rows.items():
            assert texts[task] == row["response"], (task, texts)
        assert texts["base"] not in {row["response"] for row in rows.values()}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    """python tests/test_playground.py MODEL_DIR OUT.png: serve MODEL_DIR (its .onnx_adapter files as adapters),
    run the quickstart's prompt on the base model and every adapter, compare two of them, save a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    folder, out = Path(argv[0]), Path(argv[1])
    found = chromium()
    if found is None:
        raise SystemExit("no chromium + chromedriver: run scripts/setup-browser.sh")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".server.log")
    srv = ServerProcess(folder, "--adapters", str(folder), log=log)
    driver = start_browser(*found, width=1280, height=1000)
    try:
        models = open_page(driver, srv.url + "/", "")
        choose(driver, models, "Q: n b i p m j\nA:", max_tokens=12)
        driver.find_element(By.ID, "run").click()
        panels_after_run(driver)
        Select(driver.find_element(By.ID, "cmp-b")).select_by_index(len(models) - 1)
        driver.execute_script("document.activeElement.blur()")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the whole page, not the window
                               {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
        srv.stop()
        log.unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
