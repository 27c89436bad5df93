"""The demo page (app/demo.py): served from the package, off with a setting, its sample
fits the default model, and in a real headless Chromium it renders the sample user's
reranking, asks nothing outside the service's origin, and a click changes the ranking."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.demo import PAGE, STATIC, sample_path
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from contract import DEMO_FILE, default_version, read_item_ids, read_manifest
from tests.browser import INSTALL_HINT, chromium, find_browser, requested_urls, running

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
VERSION = default_version(MODELS)
SAMPLE = MODELS / str(VERSION) / DEMO_FILE
needs_sample = pytest.mark.skipif(
    VERSION is None or not SAMPLE.is_file(), reason="no default model with a demo.json"
)


# --- the route, without a browser ---------------------------------------------------------


def test_page_and_assets_come_from_the_package_and_name_only_this_origin(
    client: TestClient,
) -> None:
    page = client.get("/demo")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http" not in policy and "*" not in policy
    for asset, kind in (("demo.js", "javascript"), ("demo.css", "text/css")):
        answer = client.get(f"/demo/assets/{asset}")
        assert answer.status_code == 200 and kind in answer.headers["content-type"]
    # Every URL the page and its script name is relative to the service: no scheme, no
    # host, no protocol-relative //host.
    sources = [PAGE.read_text()] + [p.read_text() for p in (STATIC / "demo").iterdir()]
    for text in sources:
        assert not re.search(r"https?:|[\"'(]//", text)
    assert re.findall(r'(?:src|href)="([^"]+)"', PAGE.read_text()) == [
        "data:,",
        "demo/assets/demo.css",
        "demo/assets/demo.js",
    ]


def test_off_by_setting_is_404(loaded: str, settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory(demo=False))) as client:
        for path in ("/demo", "/demo/sample.json", "/demo/assets/demo.js"):
            assert client.get(path).status_code == 404, path
        assert client.get("/healthz").status_code == 200


def test_demo_is_on_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings(_env_file=None).demo is True  # type: ignore[call-arg]
    monkeypatch.setenv("RERANK_DEMO", "false")
    assert Settings(_env_file=None).demo is False  # type: ignore[call-arg]


def test_compose_turns_the_demo_on_and_kubernetes_off() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["api"]["environment"]["RERANK_DEMO"] == "true"
    configmap = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    assert configmap["data"]["RERANK_DEMO"] == "false"


def test_the_page_files_are_package_data() -> None:
    """A wheel (the image installs one) carries every file under app/static/."""
    import tomllib
    from fnmatch import fnmatch

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["app"]
    app_dir = ROOT / "app"
    for path in (app_dir / "static").rglob("*"):
        if path.is_file():
            name = path.relative_to(app_dir).as_posix()
            assert any(fnmatch(name, p) for p in patterns), f"{name} is not package data"


def test_sample_without_a_demo_file_is_a_404_that_says_how_to_make_one(client: TestClient) -> None:
    answer = client.get("/demo/sample.json")  # the test models have no demo.json
    assert answer.status_code == 404
    assert "python -m training.demo" in answer.json()["detail"]


def test_sample_of_the_served_version_first_then_the_default(tmp_path: Path) -> None:
    for version in ("old", "new"):
        (tmp_path / version).mkdir()
    (tmp_path / "DEFAULT").write_text("old\n")
    assert sample_path(tmp_path, "new") is None
    (tmp_path / "old" / DEMO_FILE).write_text("{}")
    assert sample_path(tmp_path, "new") == tmp_path / "old" / DEMO_FILE
    assert sample_path(tmp_path, None) == tmp_path / "old" / DEMO_FILE
    (tmp_path / "new" / DEMO_FILE).write_text("{}")
    assert sample_path(tmp_path, "new") == tmp_path / "new" / DEMO_FILE


@needs_sample
def test_sample_is_served_for_the_default_model(
    redis_server: EmbeddedRedis, prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    load_into_redis(redis_server.url, MODELS / str(VERSION), prefix)
    with TestClient(create_app(settings_factory(model_dir=MODELS))) as client:
        answer = client.get("/demo/sample.json")
    assert answer.status_code == 200
    assert answer.json() == json.loads(SAMPLE.read_text())


@needs_sample
def test_committed_sample_fits_the_default_model() -> None:
    """Small, and every id it names is an item of the model with a title."""
    assert SAMPLE.stat().st_size < 100_000
    sample = json.loads(SAMPLE.read_text())
    manifest = read_manifest(MODELS / str(VERSION))
    known = set(read_item_ids(MODELS / str(VERSION)))
    assert sample["model_version"] == VERSION
    assert sample["history_len"] == manifest.history_len and 1 <= sample["k"] <= 100
    assert 3 <= len(sample["users"]) <= 10
    assert sample["users"][0]["user_id"] == "196"  # the README's example user
    for user in sample["users"]:
        history, candidates = user["history"], user["candidates"]
        assert 0 < len(history) == min(manifest.history_len, user["history_total"])
        assert len(candidates) >= sample["k"] and len(set(candidates)) == len(candidates)
        assert not set(history) & set(candidates), "recall proposes only unseen films"
        for item in [*history, *candidates, user["watched_next"]]:
            assert item in known and sample["items"][item]["title"]
    named = {i for u in sample["users"] for i in [*u["history"], *u["candidates"]]}
    named |= {u["watched_next"] for u in sample["users"]}
    assert set(sample["items"]) == named  # titles of what the page shows, nothing more


@pytest.mark.slow
@needs_sample
def test_generator_writes_the_committed_sample() -> None:
    """`python -m training.demo` on MovieLens rebuilds the committed file byte for byte."""
    if not (ROOT / "data" / "ml100k").is_dir():
        pytest.skip(
            "MovieLens is not fetched (data/ml100k): run "
            "`rerank data movielens --out data/ml100k-files`"
        )
    from training.data import load_movielens
    from training.demo import build_sample, dumps

    sample = json.loads(SAMPLE.read_text())
    users = [u["user_id"] for u in sample["users"]]
    rebuilt = build_sample(load_movielens(ROOT / "data"), MODELS / str(VERSION), users)
    assert dumps(rebuilt) == SAMPLE.read_text()


# --- in a real browser --------------------------------------------------------------------


def _browser_or_skip():  # type: ignore[no-untyped-def]
    """The system's Chromium; a skip without one, a failure where CI asks for it (.ci/run)."""
    give_up = pytest.fail if os.environ.get("DEMO_BROWSER_REQUIRED") else pytest.skip
    browser = find_browser()
    if browser is None:
        give_up(f"no Chromium or chromedriver on PATH: {INSTALL_HINT}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        give_up("selenium is not installed: make install-dev")
    return browser


def _wait_for_answer(driver, number: int) -> None:  # type: ignore[no-untyped-def]
    """Until the page has rendered its ``number``-th /rerank answer."""
    from selenium.webdriver.support.ui import WebDriverWait

    def rendered(d) -> bool:  # type: ignore[no-untyped-def]
        ready = d.find_element("tag name", "body").get_attribute("data-ready")
        alert = d.find_element("id", "status").get_attribute("role") == "alert"
        if alert:
            raise AssertionError(d.find_element("id", "status").text)
        return ready is not None and int(ready) >= number

    WebDriverWait(driver, 30, poll_frequency=0.1).until(rendered)


def _ranked(driver) -> list[str]:  # type: ignore[no-untyped-def]
    buttons = driver.find_elements("css selector", "#ranked button.film")
    return [b.get_attribute("data-item") for b in buttons]


def _texts(driver, selector: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.text for e in driver.find_elements("css selector", selector)]


@needs_sample
def test_page_in_headless_chromium(
    redis_server: EmbeddedRedis, prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    browser = _browser_or_skip()
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    sample = json.loads(SAMPLE.read_text())
    titles = {i: v["title"] for i, v in sample["items"].items()}
    first = sample["users"][0]
    load_into_redis(redis_server.url, MODELS / str(VERSION), prefix)
    settings = settings_factory(model_dir=MODELS, max_candidates=1000)
    with running(settings) as url, chromium(browser) as driver:
        driver.get(f"{url}/demo")
        _wait_for_answer(driver, 1)

        # Without interaction: the sample user's history, recall list and top k, by title.
        assert driver.find_element("id", "model-version").text == VERSION
        ranked = _ranked(driver)
        assert len(ranked) == sample["k"] and set(ranked) <= set(first["candidates"])
        shown = _texts(driver, "#ranked button.film")
        assert shown == [titles[i] for i in ranked] and len(set(shown)) >= 8
        history = _texts(driver, "#history .title")
        assert history == [titles[i] for i in reversed(first["history"])]
        candidates = _texts(driver, "#candidates button.film")
        assert candidates == [titles[i] for i in first["candidates"]]
        becauses = _texts(driver, "#ranked .because")
        assert len(becauses) == sample["k"]
        assert all(b.startswith("Because you watched ") for b in becauses)
        cited = _texts(driver, "#ranked .because cite")
        assert cited and set(cited) <= {titles[i] for i in first["history"]}
        moves = _texts(driver, "#ranked .move")
        move = re.compile(r"[▲▼=] .*(up from|down from|same as) recall #\d+")
        assert moves and all(move.fullmatch(m) for m in moves)
        scores = _texts(driver, "#ranked .score .value")
        assert all(re.fullmatch(r"score -?\d+\.\d\d", s) for s in scores)

        # A click on the number one: it joins the history, leaves the recall list, and the
        # ranking changes.
        top = driver.find_element("css selector", "#ranked button.film")
        top.click()
        _wait_for_answer(driver, 2)
        assert ranked[0] not in _ranked(driver) and _ranked(driver) != ranked
        assert _texts(driver, "#history .title")[0] == titles[ranked[0]]
        assert "(your pick)" in driver.find_element("css selector", "#history li").text
        assert titles[ranked[0]] not in _texts(driver, "#candidates button.film")

        # From the keyboard: Enter on a recall candidate outside the top k rescores the list.
        before = _texts(driver, "#ranked .score .value")
        outside = [
            b
            for b in driver.find_elements("css selector", "#candidates button.film")
            if b.get_attribute("data-item") not in _ranked(driver)
        ][-1]
        outside.send_keys(Keys.ENTER)
        _wait_for_answer(driver, 3)
        assert _texts(driver, "#ranked .score .value") != before
        focused = driver.switch_to.active_element
        assert focused.tag_name == "button" and "film" in focused.get_attribute("class")

        # The picker: another sample user, with their own history.
        second = sample["users"][1]
        Select(driver.find_element("id", "user")).select_by_value(second["user_id"])
        _wait_for_answer(driver, 4)
        assert _texts(driver, "#history .title") == [titles[i] for i in reversed(second["history"])]
        assert set(_ranked(driver)) <= set(second["candidates"])

        # Nothing outside the service's origin was asked for, and the console is clean.
        urls = requested_urls(driver)
        assert urls and all(u.startswith(f"{url}/") or u.startswith("data:") for u in urls), urls
        assert f"{url}/rerank" in urls and f"{url}/demo/sample.json" in urls
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
