"""Undo the cheap tricks before any rail looks at a text: both the keyword rules and the learned classifier.

``normalise(text)`` returns the views the keyword rules match (plain, letters joined, leetspeak undone);
``canonical(text)`` is the most normalised of them, the one the classifier reads. Every view is:

* NFKC-normalised (full-width ``ｋｉｌｌ`` and ideographic spaces become ASCII), case folded;
* stripped of invisible characters (zero-width spaces, soft hyphens) and with Cyrillic/Greek look-alike
  letters mapped to Latin ones (``bоmb`` with a Cyrillic ``о``);
* Traditional Chinese converted to Simplified with OpenCC (``tw2sp``: Taiwan phrases too, 駭客 -> 黑客),
  so one set of rules and one model serve both scripts;
* with spaces and symbols between Chinese characters removed (``炸 弹``, ``炸.弹`` -> ``炸弹``).

The other views join letters spread out with spaces, dots or dashes (``k i l l``, ``m-u-r-d-e-r``) and undo
leetspeak inside words (``k1ll``, ``b0mb``).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any

from course_utils.core.lazy import lazy_import

# Cyrillic and Greek letters that look like Latin ones ("bоmb" with a Cyrillic о).
_LOOKALIKES = str.maketrans("аеорсхуіјѕкмтвнαοεικνρτυχ", "aeopcxyijskmtbhaoeiknptux")
_INVISIBLE = re.compile("[\u200b-\u200f\u2060\ufeff\u00ad]")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
                       "!": "i", "|": "l", "+": "t", "€": "e"})
_LEET_CHARS = set("0134578@$!|+€")
_TOKEN_EDGES = ".,!?;:'\"()[]{}<>"
# Three or more single characters separated by spaces or symbols: "k i l l", "b.o.m.b", "m-u-r-d-e-r".
_SPREAD = re.compile(r"(?<![^\W_])(?:[^\W_][ .\-_·•*,/\\|~]+){2,}[^\W_](?![^\W_])")
_SEPARATORS = re.compile(r"[ .\-_·•*,/\\|~]+")
CJK = "\u3400-\u4dbf\u4e00-\u9fff"
_CJK_GAP = re.compile(rf"(?<=[{CJK}])[\s.\-_*·,|/\\~]+(?=[{CJK}])")
_HAS_CJK = re.compile(f"[{CJK}]")


@lru_cache(maxsize=1)
def _to_simplified() -> Any:
    """OpenCC's Taiwan-Traditional -> mainland-Simplified converter, with phrases (loaded once, ~20 ms)."""
    return lazy_import("opencc", "story", "Traditional -> Simplified Chinese").OpenCC("tw2sp")


def to_simplified(text: str) -> str:
    """``text`` with Traditional Chinese converted to Simplified (texts without Chinese are returned as they are)."""
    return _to_simplified().convert(text) if _HAS_CJK.search(text) else text


def chinese_script(text: str) -> str | None:
    """"zh-Hant" when OpenCC changes the text, "zh-Hans" for other Chinese text, None without Chinese."""
    if not _HAS_CJK.search(text):
        return None
    return "zh-Hant" if _to_simplified().convert(text) != text else "zh-Hans"


def _join_spread(match: re.Match[str]) -> str:
    """Join a run of spread-out letters; a leading "a"/"i" stays a word of its own ("a b o m b" -> "a bomb")."""
    letters = _SEPARATORS.split(match.group(0))
    head = letters[0] + " " if letters[0] in {"a", "i"} and len(letters) > 3 else ""
    return head + "".join(letters[1:] if head else letters)


def _undo_leet(token: str) -> str:
    core = token.strip(_TOKEN_EDGES)
    if not core or not any(c.isalpha() for c in core) or not _LEET_CHARS & set(core):
        return token
    return token.replace(core, core.translate(_LEET))


def normalise(text: str) -> list[str]:
    """The views of ``text`` that the keyword rules match: plain, letters joined, leetspeak undone (see module doc)."""
    base = unicodedata.normalize("NFKC", text).casefold().translate(_LOOKALIKES)
    base = to_simplified(" ".join(_INVISIBLE.sub("", base).split()))
    base = _CJK_GAP.sub("", base)
    joined = _SPREAD.sub(_join_spread, base)
    unleet = " ".join(_undo_leet(token) for token in joined.split())
    return list(dict.fromkeys([base, joined, unleet]))


def canonical(text: str) -> str:
    """The most normalised view of ``text`` (letters joined and leetspeak undone): what the classifier reads."""
    return normalise(text)[-1]
