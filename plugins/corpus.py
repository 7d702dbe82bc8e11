"""A real English text corpus that installs offline: WordNet 3.0 glosses (Debian's ``wordnet-base``).

Each synset line of WordNet's ``data.{noun,verb,adj,adv}`` files ends with ``| gloss``; the gloss is a
definition optionally followed by ``; "example sentences"``. We keep the definition (the part before the
first quoted example), normalise whitespace, drop very short ones and deduplicate case-insensitively,
in file order, so the corpus is deterministic. WordNet's licence allows redistribution with its notice.
"""

from __future__ import annotations

import re
from pathlib import Path

from dualenc.errors import UserError

WORDNET_DIRS = ("/usr/share/wordnet",)
_PARTS = ("noun", "verb", "adj", "adv")


def find_wordnet(path: str | Path | None = None) -> Path:
    """The directory holding WordNet's ``data.noun`` etc.; ``path`` wins, then the Debian location."""
    for d in ([Path(path)] if path else [Path(p) for p in WORDNET_DIRS]):
        if (d / "data.noun").is_file():
            return d
    raise UserError(f"no WordNet data files (data.noun, ...) in {path or ', '.join(WORDNET_DIRS)}; install them "
                    "with `apt-get install wordnet-base` (or `apt-get download wordnet-base && dpkg-deb -x "
                    "wordnet-base_*.deb DIR`, then pass DIR/usr/share/wordnet)")


def parse_glosses(lines: list[str] | tuple[str, ...]) -> list[str]:
    """Definitions from WordNet data-file lines (licence header lines start with two spaces and are skipped)."""
    out = []
    for line in lines:
        if line.startswith("  ") or "|" not in line:
            continue
        gloss = line.split("|", 1)[1]
        gloss = gloss.split('"', 1)[0]  # drop the quoted examples
        gloss = re.sub(r"\s+", " ", gloss).strip().rstrip(";").strip()
        if gloss:
            out.append(gloss)
    return out


def wordnet_glosses(path: str | Path | None = None, min_words: int = 3) -> list[str]:
    """All deduplicated WordNet definitions with at least ``min_words`` words (about 100k sentences)."""
    d = find_wordnet(path)
    seen: set[str] = set()
    out: list[str] = []
    for part in _PARTS:
        f = d / f"data.{part}"
        if not f.is_file():
            continue
        for g in parse_glosses(f.read_text(encoding="latin-1").splitlines()):
            key = g.lower()
            if len(g.split()) >= min_words and key not in seen:
                seen.add(key)
                out.append(g)
    return out
