"""/docs and /redoc work offline: every URL they name is this service's, and answers."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

# src="...", href="...", spec-url="...", url: '...' in the pages.
URL = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_name_only_same_origin_urls_that_answer(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "http://" not in html and "https://" not in html  # no CDN, no fonts, no validator
    urls = [a or b for a, b in URL.findall(html)]
    assert urls, html
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0, url


def test_swagger_ui_reads_openapi_3_1(client: TestClient) -> None:
    # FastAPI writes OpenAPI 3.1, which Swagger UI reads from version 5 on.
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    assert re.search(r'"5\.\d+\.\d+"', bundle), "the bundled Swagger UI is not version 5"
    assert "validatorUrl" in client.get("/docs").text  # the online validator is off


def test_docs_follow_a_proxy_prefix(client: TestClient) -> None:
    # The page alone, from the app that ``client`` runs: no second lifespan for it.
    behind = TestClient(client.app, root_path="/api")
    html = behind.get("/docs").text
    assert "/api/docs/assets/swagger-ui-bundle.js" in html and "/api/openapi.json" in html
