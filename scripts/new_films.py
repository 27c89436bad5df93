"""New films through a running service: do users who love a genre get its new films first?

Starts ``rerank serve`` on its defaults (an embedded Redis, the default model) on a free port,
adds 24 films that exist nowhere (made-up titles, three in each of eight genres, all of 1998)
with ``POST /items``, and asks ``POST /rerank`` to order those 24 for every MovieLens user who
loves one of the eight genres: that genre is at least 40% of the user's last 50 films and at
least twice any other of the eight. The history goes in the request, so nothing but the new
films is written. Per genre: the share of its lovers whose first film is one of the genre's
three, and the genre's share of their top 3 (by chance: 1/8 for both).

    rerank data movielens --out data/ml100k-files   # once
    python -m scripts.new_films [--files data/ml100k-files] [--out docs/results/new-films-DATE.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HISTORY = 50  # the last films of a user read for the genre, and sent as the history
LOVE_SHARE = 0.4  # a lover's genre: at least this share of the history
LOVE_MARGIN = 2.0  # and at least this many times any other of the eight
TOP = 3
TITLES = {
    "Sci-Fi": ["Orbit of the Lost Colony", "The Quantum Frontier", "Starship Meridian"],
    "Romance": ["A Summer in Verona", "Letters to Claire", "Love at the Harbour"],
    "Horror": ["The Cellar Beneath", "Night of the Hollow Men", "Whispers in the Attic"],
    "Children's": ["The Little Dragon's Big Day", "Penny and the Magic Kite", "Toy Town Rescue"],
    "Documentary": ["Voices of the Delta", "The River Keepers", "Inside the Hive"],
    "Western": ["Dust over Laramie", "The Last Marshal", "Six Guns at Sundown"],
    "War": ["Beyond the Ardennes", "Convoy to Murmansk", "The Long Retreat"],
    "Musical": ["Broadway Lights", "Sing Me Home", "The Dancing Years"],
}


def lovers(files: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """Genre -> its lovers, each (user id, last HISTORY item ids, oldest first)."""
    with (files / "items.csv").open() as f:
        genres = {r["item_id"]: r["genres"].split("|") for r in csv.DictReader(f)}
    seen: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with (files / "interactions.csv").open() as f:
        for r in csv.DictReader(f):
            seen[r["user_id"]].append((int(r["timestamp"]), r["item_id"]))
    out: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for user, events in seen.items():
        ids = [item for _, item in sorted(events)][-HISTORY:]
        counts = Counter(g for item in ids for g in genres[item])
        share = {g: counts[g] / len(ids) for g in TITLES}
        best, runner_up = sorted(share, key=share.__getitem__)[-1], sorted(share.values())[-2]
        if share[best] >= LOVE_SHARE and share[best] >= LOVE_MARGIN * runner_up:
            out[best].append((user, ids))
    return dict(out)


def new_items() -> list[dict[str, object]]:
    return [
        {"item_id": f"new-{genre}-{j}", "text": f"{title} (1998)",
         "attributes": {"genres": [genre], "year": 1998}}
        for genre, titles in TITLES.items() for j, title in enumerate(titles)
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(client: httpx.Client, by_genre: dict[str, list[tuple[str, list[str]]]]) -> dict:
    items = new_items()
    added = client.post("/items", json={"items": items})
    added.raise_for_status()
    candidates = [str(i["item_id"]) for i in items]
    result: dict[str, dict[str, float]] = {}
    for genre, users in sorted(by_genre.items()):
        first = in_top = 0
        for user, history in users:
            body = {"user_id": user, "history": history, "candidates": candidates, "k": TOP}
            answer = client.post("/rerank", json=body)
            answer.raise_for_status()
            got = [i["item_id"] for i in answer.json()["items"]]
            first += got[0].startswith(f"new-{genre}-")
            in_top += sum(i.startswith(f"new-{genre}-") for i in got)
        result[genre] = {
            "users": len(users),
            "first_is_own_genre": round(first / len(users), 3),
            "top3_own_genre_share": round(in_top / (TOP * len(users)), 3),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=Path, default=Path("data/ml100k-files"))
    p.add_argument("--out", type=Path, help="default: docs/results/new-films-<date>.json")
    args = p.parse_args(argv)
    if not (args.files / "interactions.csv").exists():
        print(f"{args.files}: no interactions.csv; run `rerank data movielens --out "
              f"{args.files}` first", file=sys.stderr)  # fmt: skip
        return 2
    by_genre = lovers(args.files)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env["RERANK_DEMO"] = "false"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "rerank"), "serve", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    print("rerank serve did not get ready within 120 s", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            model = client.get("/readyz").json().get("model_version")
            result = measure(client, by_genre)
    finally:
        server.terminate()
        server.wait(30)
    users = sum(r["users"] for r in result.values())
    first = sum(r["first_is_own_genre"] * r["users"] for r in result.values()) / users
    report = {
        "command": "python -m scripts.new_films",
        "model": model,
        "new_films": len(new_items()),
        "genres": list(TITLES),
        "chance": round(1 / len(TITLES), 3),
        "lovers": users,
        "first_is_own_genre": round(first, 3),
        "by_genre": result,
    }
    out = args.out or ROOT / "docs" / "results" / f"new-films-{datetime.now(UTC):%Y-%m-%d}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
