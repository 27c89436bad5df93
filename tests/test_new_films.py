"""scripts/new_films.py: who counts as a genre's lover, and the films it adds."""

from __future__ import annotations

from pathlib import Path

from scripts.new_films import TITLES, lovers, new_items


def test_a_lover_has_the_genre_in_most_of_the_history_and_far_ahead(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text(
        "item_id,text,genres,year\n"
        "1,a,Horror,1990\n2,b,Horror|Drama,1990\n3,c,Romance,1990\n4,d,Drama,1990\n"
    )
    rows = ["user_id,item_id,timestamp"]
    # u1: 3 of 4 Horror, Romance 1 of 4 (a third of Horror's): a Horror lover, oldest first
    rows += ["u1,3,1", "u1,1,2", "u1,2,3", "u1,1,4"]
    # u2: Horror 2 of 4, Romance 2 of 4: no genre twice any other
    rows += ["u2,1,1", "u2,3,2", "u2,2,3", "u2,3,4"]
    # u3: Drama only, which is not one of the eight
    rows += ["u3,4,1", "u3,4,2"]
    (tmp_path / "interactions.csv").write_text("\n".join(rows) + "\n")
    assert lovers(tmp_path) == {"Horror": [("u1", ["3", "1", "2", "1"])]}


def test_three_new_films_per_genre_with_unique_ids() -> None:
    items = new_items()
    assert len(items) == 3 * len(TITLES) == len({i["item_id"] for i in items})
    for genre in TITLES:
        mine = [i for i in items if i["attributes"] == {"genres": [genre], "year": 1998}]
        assert len(mine) == 3
