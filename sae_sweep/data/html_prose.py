"""English prose out of HTML documentation: one document per paragraph.

Installed documentation is the real prose a machine without network has (``dataset=postgres_manual``
reads the PostgreSQL manual that Debian's ``postgresql-doc`` installs). A page is mostly navigation,
code listings and tables, so only paragraphs count: the text of each ``<p>`` (and DocBook's
``<div class="para">``) outside ``<pre>``, ``<script>`` and ``<style>``, whitespace collapsed, kept
when it reads as prose -- at least ``MIN_WORDS`` words, at least ``MIN_LETTERS`` of its characters
letters or spaces, and fewer than ``MAX_CODE_WORDS`` of its words code-like (``_ ( ) { } = < > [ ] /
\\`` or ``a.b``). The rules are versioned (``RULES``): a dataset's fingerprint includes them.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Iterator, List, Optional

RULES = "html-paragraphs-v1: <p>|div.para, no pre/script/style, >=20 words, >=85% letters+spaces, <15% code words"
MIN_WORDS = 20
MIN_LETTERS = 0.85
MAX_CODE_WORDS = 0.15
_CODE_WORD = re.compile(r"[_(){}=<>\[\]/\\]|\w\.\w")


class _Paragraphs(HTMLParser):
    SKIP = {"pre", "script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: List[str] = []
        self._buf: Optional[List[str]] = None
        self._tag: Optional[str] = None
        self._depth = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self._skip += 1
        if self._buf is None:
            classes = (dict(attrs).get("class") or "").split()
            if tag == "p" or (tag == "div" and "para" in classes):
                self._buf, self._tag, self._depth = [], tag, 1
        elif tag == self._tag:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        if self._buf is not None and tag == self._tag:
            self._depth -= 1
            if self._depth == 0:
                self.paragraphs.append(" ".join("".join(self._buf).split()))
                self._buf = None

    def handle_data(self, data: str) -> None:
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def is_prose(text: str) -> bool:
    words = text.split()
    if len(words) < MIN_WORDS:
        return False
    if sum(c.isalpha() or c.isspace() for c in text) / len(text) < MIN_LETTERS:
        return False
    return sum(bool(_CODE_WORD.search(w)) for w in words) / len(words) < MAX_CODE_WORDS


def paragraphs(html: str) -> Iterator[str]:
    """The prose paragraphs of one HTML page, in page order."""
    parser = _Paragraphs()
    parser.feed(html)
    parser.close()
    return (p for p in parser.paragraphs if is_prose(p))


def read_paragraphs(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:  # a non-UTF-8 page fails here, naming the file (text.py)
        return paragraphs(fh.read())
