"""The demo page (app/demo.py): served from the package, off with a setting, its sample
(training/demo.py) fits its model, and in a real headless Chromium it renders the sample
user's reranking, asks nothing outside the service's origin, and a click changes the ranking.

The sample is built from a generated data set and a random model over its item ids
(tests/conftest.py: demo_dataset, demo_models): MovieLens is never committed, so nothing
here needs it except the determinism check on it, which skips without data/ml100k."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.demo import PAGE, STATIC, sample_path
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from contract import DEMO_FILE, default_version, read_item_ids, read_manifest
from tests.browser import INSTALL_HINT, chromium, find_browser, requested_urls
from tests.conftest import DEMO_VERSION, ITEMS_A, Towered
from tests.serving import running
from training.data import GENRES, Dataset
from training.demo import build_sample, dumps, write_sample

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
VERSION = default_version(MODELS)


def _sample(models: Path) -> dict[str, Any]:
    sample: dict[str, Any] = json.loads((models / DEMO_VERSION / DEMO_FILE).read_text())
    return sample


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
    assert "make demo-sample" in answer.json()["detail"]


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


def test_sample_is_served_for_the_served_model(
    demo_models: Path,
    redis_server: EmbeddedRedis,
    prefix: str,
    settings_factory: Callable[..., Settings],
) -> None:
    load_into_redis(redis_server.url, demo_models / DEMO_VERSION, prefix)
    with TestClient(create_app(settings_factory(model_dir=demo_models))) as client:
        answer = client.get("/demo/sample.json")
    assert answer.status_code == 200
    assert answer.json() == _sample(demo_models)


def check_sample(sample: dict[str, Any], model_dir: Path) -> None:
    """Small, and every id it names is an item of the model with a title."""
    manifest = read_manifest(model_dir)
    known = set(read_item_ids(model_dir))
    assert sample["model_version"] == manifest.version
    assert sample["history_len"] == manifest.history_len and 1 <= sample["k"] <= 100
    assert 3 <= len(sample["users"]) <= 10
    for user in sample["users"]:
        history, candidates = user["history"], user["candidates"]
        assert 0 < len(history) == min(manifest.history_len, user["history_total"])
        assert len(candidates) >= sample["k"] and len(set(candidates)) == len(candidates)
        assert not set(history) & set(candidates), "recall proposes only unseen items"
        for item in [*history, *candidates, user["watched_next"]]:
            assert item in known and sample["items"][item]["title"]
    named = {i for u in sample["users"] for i in [*u["history"], *u["candidates"]]}
    named |= {u["watched_next"] for u in sample["users"]}
    assert set(sample["items"]) == named  # titles of what the page shows, nothing more


def test_generated_sample_fits_its_model(demo_models: Path, demo_dataset: Dataset) -> None:
    path = demo_models / DEMO_VERSION / DEMO_FILE
    assert path.stat().st_size < 100_000
    sample = _sample(demo_models)
    check_sample(sample, demo_models / DEMO_VERSION)
    assert sample["dataset"] == demo_dataset.name
    assert sample["recall"] == {"method": "item-knn", "n": 100, "fit_on": "training split"}
    titles = {v["title"] for v in sample["items"].values()}
    assert len(titles) == len(sample["items"]) and all(
        t.startswith("synthetic item ") for t in titles
    )
    assert all(set(v["genres"]) <= set(GENRES) for v in sample["items"].values())


@pytest.fixture(scope="module")
def towered_sample(towered: Towered) -> Path:
    """The models/ root of ``towered``, its version ITEMS_A with a demo sample."""
    users = towered.dataset.users[:3]
    write_sample(
        build_sample(towered.dataset, towered.models / ITEMS_A, users, 20), towered.models / ITEMS_A
    )
    return towered.models


def test_the_new_item_form_asks_what_the_item_tower_reads(
    towered_sample: Path, demo_models: Path
) -> None:
    sample = json.loads((towered_sample / ITEMS_A / DEMO_FILE).read_text())
    check_sample(sample, towered_sample / ITEMS_A)
    tower = read_manifest(towered_sample / ITEMS_A).tower
    assert tower is not None
    assert sample["new_items"] == {
        "categorical": [{"name": c.name, "values": list(c.values)} for c in tower.categorical],
        "numeric": [{"name": n.name, "median": n.median} for n in tower.numeric],
    }
    assert [a["name"] for a in sample["new_items"]["categorical"]] == ["genres"]
    assert [a["name"] for a in sample["new_items"]["numeric"]] == ["year"]
    assert _sample(demo_models)["new_items"] is None  # a model without an item tower


def test_generator_is_deterministic_and_takes_the_users_asked_for(
    demo_models: Path, demo_dataset: Dataset, tmp_path: Path
) -> None:
    model = demo_models / DEMO_VERSION
    users = [u["user_id"] for u in _sample(demo_models)["users"]]
    again = build_sample(demo_dataset, model, users)
    assert dumps(again) == (model / DEMO_FILE).read_text()
    chosen = build_sample(demo_dataset, model, ["7", "3"])
    assert [u["user_id"] for u in chosen["users"]] == ["7", "3"]
    with pytest.raises(ValueError, match="not users of"):
        build_sample(demo_dataset, model, ["no-such-user"])


def test_generator_refuses_data_the_model_has_no_vectors_for(
    model_dir: Path, demo_dataset: Dataset
) -> None:
    """The test models' items are "1".."200", the data set's "1000"..: the page would show
    items the service cannot score."""
    with pytest.raises(ValueError, match="have no vector"):
        build_sample(demo_dataset, model_dir / "test-a", ["1"])


def test_the_sample_is_never_committed_nor_baked_into_the_image() -> None:
    """A sample holds its data's titles and histories; MovieLens may not be redistributed."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "models"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked and not [p for p in tracked if Path(p).name == DEMO_FILE]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"models/any-version/{DEMO_FILE}"], cwd=ROOT, timeout=30
    )
    assert ignored.returncode == 0, f"models/*/{DEMO_FILE} is not git-ignored"
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert f"models/*/{DEMO_FILE}" in dockerignore


def test_make_demo_makes_a_missing_sample_best_effort_before_serving(tmp_path: Path) -> None:
    """`make demo`: the sample first when it is missing, its failure not stopping the
    service (`|| echo`), through the demo extra's stamp (no PyTorch)."""
    missing = tmp_path / "no-such" / DEMO_FILE

    def dry_run(*args: str) -> list[str]:
        done = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    lines = dry_run("demo", f"SAMPLE={missing}")
    guard = next(i for i, line in enumerate(lines) if f"test -f {missing}" in line)
    assert "demo-sample" in lines[guard] and "|| echo" in "".join(lines[guard : guard + 2])
    made = next(i for i, line in enumerate(lines) if line.endswith("rerank demo-sample"))
    served = next(i for i, line in enumerate(lines) if "rerank serve" in line)
    assert guard < made < served
    assert not any("torch" in line for line in lines)
    # The sample's own run, as on a checkout whose demo stamp is not made yet (a `make demo`
    # that already ran leaves it made): -W takes the serving install for new.
    sample = dry_run("demo-sample", "-W", ".venv/.serve")
    assert any("-e '.[demo]'" in line for line in sample[: len(sample) - 1])
    assert sample[-1].endswith("rerank demo-sample")
    assert not any("torch" in line for line in sample)


@pytest.mark.slow
def test_movielens_sample_is_deterministic_and_fits_the_default_model() -> None:
    """`make demo-sample`'s build on MovieLens: twice the same bytes, user 196 first, every
    item a vector of the default model."""
    if VERSION is None:
        pytest.skip("no default model")
    if not (ROOT / "data" / "ml100k").is_dir():
        pytest.skip(
            "MovieLens is not fetched (data/ml100k): run "
            "`rerank data movielens --out data/ml100k-files`"
        )
    from training.data import load_movielens
    from training.demo import FIRST_USER, N_USERS, SEED, pick_users

    dataset = load_movielens(ROOT / "data")
    users = pick_users(dataset, FIRST_USER, N_USERS, SEED)
    first = build_sample(dataset, MODELS / VERSION, users)
    assert dumps(first) == dumps(build_sample(dataset, MODELS / VERSION, users))
    assert first["users"][0]["user_id"] == "196"  # the README's example user
    check_sample(first, MODELS / VERSION)


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


@contextmanager
def _demo_page(
    models: Path, version: str, redis_url: str, settings: Settings
) -> Iterator[tuple[str, Any]]:
    """``version`` loaded, the service running, and /demo open in Chromium with its first
    ranking rendered: yields the service's URL and the driver."""
    browser = _browser_or_skip()
    load_into_redis(redis_url, models / version, settings.key_prefix)
    with running(settings) as url, chromium(browser) as driver:
        driver.get(f"{url}/demo")
        _wait_for_answer(driver, 1)
        yield url, driver


def _console_is_clean(driver) -> None:  # type: ignore[no-untyped-def]
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_page_in_headless_chromium(
    demo_models: Path,
    redis_server: EmbeddedRedis,
    settings_factory: Callable[..., Settings],
) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    sample = _sample(demo_models)
    titles = {i: v["title"] for i, v in sample["items"].items()}
    first = sample["users"][0]
    settings = settings_factory(model_dir=demo_models, max_candidates=128)
    with _demo_page(demo_models, DEMO_VERSION, redis_server.url, settings) as (url, driver):
        # Without interaction: the sample user's history, recall list and top k, by title.
        assert driver.find_element("id", "model-version").text == DEMO_VERSION
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
        _console_is_clean(driver)


def test_a_new_film_from_the_form_is_added_and_scored_in_headless_chromium(
    towered_sample: Path,
    redis_server: EmbeddedRedis,
    settings_factory: Callable[..., Settings],
) -> None:
    """The form sends POST /items with the title and the ticked attributes; the film joins
    the end of the recall list with a vector the service wrote, and the model scores it."""
    import redis
    from selenium.webdriver.support.ui import Select

    sample = json.loads((towered_sample / ITEMS_A / DEMO_FILE).read_text())
    settings = settings_factory(model_dir=towered_sample)
    with _demo_page(towered_sample, ITEMS_A, redis_server.url, settings) as (_, driver):
        assert driver.find_element("id", "new-form").is_displayed()
        genre = sample["new_items"]["categorical"][0]["values"][0]
        driver.find_element("id", "new-title").send_keys("A Film Nobody Has Seen (2026)")
        driver.find_element("css selector", f'input[name="cat:genres"][value="{genre}"]').click()
        driver.find_element("id", "new-num-year").send_keys("1998")
        driver.find_element("id", "new-add").click()
        _wait_for_answer(driver, 2)

        status = driver.find_element("id", "status").text
        assert status.startswith("Added A Film Nobody Has Seen (2026) from recall #"), status
        assert "scored" in status and "no vector" not in status
        last = driver.find_elements("css selector", "#candidates button.film")[-1]
        assert last.text == "A Film Nobody Has Seen (2026)" and last.get_attribute("title") == genre
        new_id = last.get_attribute("data-item")
        assert new_id.startswith("new-")
        store = redis.Redis.from_url(redis_server.url)
        assert store.exists(f"{settings.key_prefix}:v:{ITEMS_A}:{new_id}")
        assert (
            "new: added here"
            in driver.find_element("css selector", "#candidates li:last-child").text
        )

        # Another user's list ends with the new film too.
        second = sample["users"][1]
        Select(driver.find_element("id", "user")).select_by_value(second["user_id"])
        _wait_for_answer(driver, 3)
        assert _texts(driver, "#candidates button.film")[-1] == "A Film Nobody Has Seen (2026)"
        _console_is_clean(driver)


def test_a_model_without_an_item_tower_shows_a_note_instead_of_the_form(
    demo_models: Path,
    redis_server: EmbeddedRedis,
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(model_dir=demo_models, max_candidates=128)
    with _demo_page(demo_models, DEMO_VERSION, redis_server.url, settings) as (_, driver):
        assert not driver.find_element("id", "new-form").is_displayed()
        assert "no item tower" in driver.find_element("id", "new-note").text
