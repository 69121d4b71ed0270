"""Read the SVG that mlodsl draws: nodes and edges by their ``class``, with title, text, colour.

Both system Graphviz and graphviz-pure write each node and edge as a
``<g class="node ...">`` / ``<g class="edge ...">`` holding a ``<title>`` (the
DOT id, ``src->dst`` for edges), shapes and ``<text>``; invisible edges are left
out (only a comment remains).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

NS = {"svg": "http://www.w3.org/2000/svg"}


@dataclass(frozen=True)
class Item:
    """One ``<g>`` of the SVG: a node, an edge or a cluster."""

    classes: frozenset[str]
    title: str
    texts: tuple[str, ...]
    strokes: tuple[str, ...]
    dashed: bool
    y: float  # of the first text line; SVG y grows downwards

    @property
    def text(self) -> str:
        return " ".join(self.texts)


def parse(svg: bytes | str) -> list[Item]:
    """Every node, edge and cluster group in the SVG, in document order."""
    root = ET.fromstring(svg)
    groups = root.iter(f"{{{NS['svg']}}}g")
    return [_item(g) for g in groups if _classes(g) & {"node", "edge", "cluster"}]


def _classes(g: ET.Element) -> frozenset[str]:
    return frozenset(g.get("class", "").split())


def _item(g: ET.Element) -> Item:
    title = g.find("svg:title", NS)
    texts = tuple((t.text or "").strip() for t in g.iter(f"{{{NS['svg']}}}text"))
    shapes = [e for e in g.iter() if e.tag.split("}")[1] in ("path", "polygon", "ellipse")]
    strokes = tuple(dict.fromkeys(e.get("stroke", "") for e in shapes if e.get("stroke")))
    dashed = any(e.get("stroke-dasharray") for e in shapes)
    first = next(g.iter(f"{{{NS['svg']}}}text"), None)
    y = float(first.get("y")) if first is not None else 0.0
    return Item(_classes(g), title.text if title is not None else "", texts, strokes, dashed, y)


def select(items: list[Item], *classes: str, exclude: str = "legend") -> list[Item]:
    """Items having all ``classes`` and not ``exclude`` (legend samples by default)."""
    want = set(classes)
    return [i for i in items if want <= i.classes and exclude not in i.classes]
