"""Nodes and edges of a circuit graph, as frozen values (strings only at the edges of the program).

A `Node` is the input embedding, an attention head, a key/value head (the receiver of k and v
under grouped-query attention), an MLP or the logits. An `Edge` is "the output of `src` as read
by `dest` through `channel`" (q, k or v for attention, "" for an MLP or the logits), after
auto-circuit's `Edge(src, dest)`. `name` gives the string form JSON, dot and tables use
("a0.h1->a2.h3<q>", "a1.kv0", "m4->logits"); `Edge.parse` is the one place a name is read back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

NODE_KINDS = ("input", "head", "kv", "mlp", "logits")
SOURCE_KINDS = ("input", "head", "mlp")  # nodes that write to the residual stream
# the channels each kind of downstream node reads through
CHANNELS = {"head": ("q",), "kv": ("k", "v"), "mlp": ("",), "logits": ("",)}

EDGE_NAMES = (
    "edges are named 'src->dst' with src in input / a{l}.h{h} / m{l} and dst "
    "in a{l}.h{h}<q> / a{l}.kv{g}<k> / a{l}.kv{g}<v> / m{l} / logits"
)
_INT = r"(0|[1-9][0-9]*)"
_NODE_RE = re.compile(rf"^(?:(input)|(logits)|a{_INT}\.h{_INT}|a{_INT}\.kv{_INT}|m{_INT})$")
_EDGE_RE = re.compile(r"^([^<>]+)->([^<>]+?)(?:<([qkv])>)?$")


@dataclass(frozen=True)
class Node:
    """A node of the graph. kind: one of `NODE_KINDS`; layer: its layer (None for input and logits);
    index: the query head ("head") or key/value head ("kv") within the layer (None otherwise)."""

    kind: str
    layer: Optional[int] = None
    index: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise ValueError(f"node kind must be one of {NODE_KINDS}, got {self.kind!r}")
        has_layer, has_index = self.kind in ("head", "kv", "mlp"), self.kind in ("head", "kv")
        if (self.layer is not None) != has_layer or (self.index is not None) != has_index:
            raise ValueError(f"a {self.kind!r} node has {'a' if has_layer else 'no'} layer and "
                             f"{'an' if has_index else 'no'} index, got layer={self.layer}, index={self.index}")

    @classmethod
    def input(cls) -> Node:
        return cls("input")

    @classmethod
    def logits(cls) -> Node:
        return cls("logits")

    @classmethod
    def head(cls, layer: int, head: int) -> Node:
        return cls("head", layer, head)

    @classmethod
    def kv(cls, layer: int, group: int) -> Node:
        return cls("kv", layer, group)

    @classmethod
    def mlp(cls, layer: int) -> Node:
        return cls("mlp", layer)

    @property
    def name(self) -> str:
        """"input", "a{l}.h{h}", "a{l}.kv{g}", "m{l}" or "logits"."""
        if self.kind == "head":
            return f"a{self.layer}.h{self.index}"
        if self.kind == "kv":
            return f"a{self.layer}.kv{self.index}"
        if self.kind == "mlp":
            return f"m{self.layer}"
        return self.kind

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> Node:
        """The node a name such as "a3.h1", "a3.kv0", "m2", "input" or "logits" stands for."""
        m = _NODE_RE.match(name)
        if m is None:
            raise ValueError(f"unknown node {name!r}: nodes are input / a{{l}}.h{{h}} / a{{l}}.kv{{g}} / m{{l}} / logits")
        inp, logits, hl, hh, kl, kg, ml = m.groups()
        if inp or logits:
            return cls(inp or logits)
        if hl is not None:
            return cls.head(int(hl), int(hh))
        if kl is not None:
            return cls.kv(int(kl), int(kg))
        return cls.mlp(int(ml))


@dataclass(frozen=True)
class Edge:
    """The output of `src` as read by `dest` through `channel`.

    src: an input, head or MLP node. dest: a query head (channel "q"), a key/value head
    (channel "k" or "v"), an MLP or the logits (channel "").
    """

    src: Node
    dest: Node
    channel: str = ""

    def __post_init__(self) -> None:
        if self.src.kind not in SOURCE_KINDS:
            raise ValueError(f"an edge's source is an input, head or MLP node, got {self.src.name!r}")
        if self.dest.kind not in CHANNELS or self.channel not in CHANNELS[self.dest.kind]:
            raise ValueError(f"a {self.dest.kind!r} node cannot read through channel {self.channel!r}")

    @property
    def receiver(self) -> str:
        """Where `dest` reads: "a2.h3<q>", "a1.kv0<k>", "m4" or "logits"."""
        return f"{self.dest.name}<{self.channel}>" if self.channel else self.dest.name

    @property
    def name(self) -> str:
        """"src->receiver", e.g. "a0.h1->a2.h3<q>" (the form saved circuits use)."""
        return f"{self.src.name}->{self.receiver}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> Edge:
        """The edge a name such as "a0.h1->a2.h3<q>" stands for (raises ValueError on a malformed name)."""
        m = _EDGE_RE.match(name) if isinstance(name, str) else None
        try:
            if m is None:
                raise ValueError(name)
            src, dest, channel = m.groups()
            return cls(Node.parse(src), Node.parse(dest), channel or "")
        except ValueError:
            raise ValueError(f"unknown edge {name!r}: {EDGE_NAMES}") from None
