"""The split of users between live model versions (``rr:split``), and a user's arm.

``rr:split`` holds JSON, the arms in the order given::

    {"shares": [["ml100k-a", 50], ["ml100k-b", 50]]}

Shares are whole percents, each 1 to 100, summing to 100; at most ``MAX_LIVE`` versions are
live at once (the active one and the split's, counted once each). A user's arm is a stable
hash of the user id: the first 8 bytes of its sha256 give a point in [0, 100), and the arms
take the points in their order (the first arm [0, share1), the next [share1, share1 +
share2), ...). The same user lands in the same arm in every process and across restarts;
raising an arm's share moves only the users between the old and the new bound. docs/
operations.md ("Versions, rollback, A/B") states the contract.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import VersionRefused

MAX_LIVE = 3
TOTAL = 100


def user_point(user_id: str) -> int:
    """The user's point in [0, 100): the same for a user id everywhere, spread evenly."""
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).digest()
    return (int.from_bytes(digest[:8], "big") * TOTAL) >> 64


@dataclass(frozen=True)
class Split:
    """Versions and their whole-percent shares, in the order their points are handed out."""

    shares: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [v for v, _ in self.shares]
        if not names:
            raise VersionRefused("split: no version given")
        doubled = sorted({v for v in names if names.count(v) > 1})
        if doubled:
            raise VersionRefused(f"split: version {doubled[0]} is named twice")
        for version, share in self.shares:
            if not version or version.startswith(".") or "/" in version:
                raise VersionRefused(f"split: {version!r} is not a version name")
            if isinstance(share, bool) or not isinstance(share, int) or not 1 <= share <= TOTAL:
                raise VersionRefused(
                    f"split: share of {version} must be a whole percent from 1 to 100, "
                    f"got {share!r}"
                )
        total = sum(s for _, s in self.shares)
        if total != TOTAL:
            raise VersionRefused(f"split: shares sum to {total}, not {TOTAL}")
        if len(names) > MAX_LIVE:
            raise VersionRefused(
                f"split: {len(names)} versions ({', '.join(names)}), at most {MAX_LIVE} live"
            )

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.shares)

    def share(self, version: str) -> int:
        return dict(self.shares).get(version, 0)

    def bounds(self) -> tuple[tuple[int, str], ...]:
        """(upper bound, version) per arm: a point below an arm's bound and at or past the
        previous one's goes to that arm."""
        out = []
        upper = 0
        for version, share in self.shares:
            upper += share
            out.append((upper, version))
        return tuple(out)

    def arm(self, user_id: str) -> str:
        point = user_point(user_id)
        for upper, version in self.bounds():
            if point < upper:
                return version
        raise AssertionError("the shares sum to 100")  # unreachable: checked at construction

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Split:
        """``["v1=50", "v2=50"]`` as typed after ``rerank split``."""
        shares = []
        for arg in args:
            version, sep, text = arg.rpartition("=")
            if not sep or not version:
                raise VersionRefused(f"split: {arg!r} is not VERSION=PERCENT")
            try:
                share = int(text)
            except ValueError:
                raise VersionRefused(
                    f"split: share of {version} must be a whole percent from 1 to 100, got {text!r}"
                ) from None
            shares.append((version, share))
        return cls(tuple(shares))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Split:
        try:
            data = json.loads(raw)
            shares = tuple((str(v), s) for v, s in data["shares"])
        except (ValueError, TypeError, KeyError) as exc:
            raise VersionRefused(f"rr:split is not a split: {exc!r}") from exc
        return cls(shares)

    def to_json(self) -> str:
        return json.dumps({"shares": [[v, s] for v, s in self.shares]})
