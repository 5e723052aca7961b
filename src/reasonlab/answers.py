"""Finding final answers in text: the last `\\boxed{…}` (nested braces) and GSM8K's `#### n`."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)


def last_boxed(text: str | None) -> str | None:
    """The content of the last `\\boxed{…}` in `text`, braces balanced; None if there is none."""
    if not text:
        return None
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


def gsm8k_final(text: str | None) -> str | None:
    """The final answer after GSM8K's last `#### ` marker, thousands separators removed; None if absent."""
    if not text:
        return None
    found = _GSM8K.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").strip()
