"""Pages opened the way a person opens them: headless chromium (Debian's package, ``make browser``)
renders a file; the DOM it dumps is parsed into a small tree to assert on, and it takes screenshots."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterator, List, Optional

CHROMIUM = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1600,1200")
VOID = {"meta", "br", "img", "input", "link", "hr", "line", "rect"}


@dataclass
class Node:
    tag: str
    attrs: Dict[str, str]
    children: List[Node] = field(default_factory=list)
    text: str = ""

    @property
    def classes(self) -> set:
        return set(self.attrs.get("class", "").split())

    def text_content(self) -> str:
        return self.text + "".join(c.text_content() for c in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            yield from c.walk()

    def find_all(self, tag: Optional[str] = None, cls: Optional[str] = None, **attrs: str) -> List[Node]:
        return [
            n
            for n in self.walk()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.classes)
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        self.stack[-1].children.append(Node("#text", {}, text=data))


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        raise RuntimeError("headless chromium is not installed: run `make browser` (Debian's chromium)")
    return exe


def rendered_dom(page: Path) -> Node:
    """The DOM chromium builds from ``page`` (``--dump-dom``), as a tree."""
    out = subprocess.run(
        [chromium(), *CHROMIUM, "--dump-dom", Path(page).resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    builder = _TreeBuilder()
    builder.feed(out)
    return builder.root


def screenshot(page: Path, png: Path, width: int = 1600, height: int = 1200) -> Path:
    subprocess.run(
        [
            chromium(),
            *CHROMIUM[:-1],
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            Path(page).resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return png
