"""scripts/planted_bugs.toml stays plantable: each bug's `old` text is found exactly once in its file
(code that moved on would otherwise leave a bug the script refuses, unnoticed until it runs)."""
import tomllib

from helpers import REPO


def test_every_planted_bug_still_finds_its_text():
    bugs = tomllib.loads((REPO / "scripts" / "planted_bugs.toml").read_text())["bug"]
    assert len(bugs) >= 70
    stale = [(b["name"], (REPO / b["file"]).read_text().count(b["old"])) for b in bugs
             if (REPO / b["file"]).read_text().count(b["old"]) != 1]
    assert stale == []
    for b in bugs:
        assert all((REPO / t).exists() for t in b["tests"]), b["name"]
