"""Token trees: several candidate continuations verified in one forward pass (SpecInfer, DDTree).

A tree of ``n`` drafted nodes hangs under the sequence's last token (the root, row 0):
``tokens[j]`` is node ``j``'s token and ``parents[j]`` its parent (-1: the root, else an
earlier node, so the nodes are in topological order). The verification step runs the
root and the nodes as ``1 + n`` rows; node ``j`` sits at position ``last + depth(j)``,
sees the context and its own ancestors only (``ancestor_mask``), and its K/V is written
at cache position ``last + 1 + j`` (the rows' scratch slots, contiguous as a linear
draft's). Greedy acceptance follows the model's argmax from the root down the children
that match it (``accept``); the accepted nodes' K/V then moves to the positions
``last + 1, last + 2, ...`` their tokens take in the sequence (``relocations``).

A linear draft is the chain ``parents = [-1, 0, 1, ...]``: its nodes already sit where
they belong, and ``accept`` is ``verify.accept_greedy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """Drafted nodes in topological order; the first chain (node 0, its first child, ...) is
    the best candidate, so a cut keeps it and a linear acceptance needs no K/V moves."""

    tokens: list[int]
    parents: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    def cut(self, num_nodes: int) -> DraftTree:
        """The first ``num_nodes`` nodes: still a tree (parents come before children)."""
        return DraftTree(self.tokens[:num_nodes], self.parents[:num_nodes])


def build(candidates: list[list[int]], max_nodes: int, max_depth: int) -> DraftTree:
    """A prefix tree (trie) of ``candidates``, best first, with at most ``max_nodes`` nodes
    of depth at most ``max_depth``: shared prefixes share nodes, and a candidate that
    does not fit whole contributes its first tokens."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for candidate in candidates:
        parent = -1
        for token in candidate[:max_depth]:
            node = children.get((parent, token))
            if node is None:
                if len(tokens) == max_nodes:
                    return DraftTree(tokens, parents)
                node = children[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            parent = node
    return DraftTree(tokens, parents)


def depths(parents: list[int]) -> list[int]:
    """Each node's depth (a child of the root: 1)."""
    out: list[int] = []
    for parent in parents:
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def paths(tokens: list[int], parents: list[int]) -> list[list[int]]:
    """Per row (the root, then each node): the drafted tokens from the root down to it, its own
    included, the output that row's next token follows."""
    out: list[list[int]] = [[]]
    for token, parent in zip(tokens, parents):
        out.append(out[parent + 1] + [token])
    return out


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """``[1 + n, 1 + n]`` bool: row ``i`` may attend to row ``j`` (``j`` is ``i`` or an ancestor;
    row 0 is the root, every row's ancestor)."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    for j, parent in enumerate(parents, start=1):
        mask[j] = mask[parent + 1]
        mask[j, j] = True
    return mask


def accept(tree: DraftTree, targets: list[int]) -> tuple[list[int], list[int]]:
    """Greedy acceptance down the tree: ``targets[r]`` is the model's token after row ``r``
    (``1 + n`` of them). From the root, move to the child whose token is the target there,
    while one is. Returns the run (the accepted nodes' tokens, then the model's token after
    the last of them: 1 to depth + 1 tokens) and the accepted nodes' rows (1-based)."""
    children: dict[tuple[int, int], int] = {(parent, token): node
                                            for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents))}
    rows: list[int] = []
    node = -1
    while (child := children.get((node, targets[node + 1]))) is not None:
        rows.append(child + 1)
        node = child
    return [tree.tokens[r - 1] for r in rows] + [targets[node + 1]], rows


def relocations(rows: list[int]) -> list[tuple[int, int]]:
    """(from, to) offsets after the root's cache position for the accepted nodes' K/V: the
    node on row ``rows[i]`` belongs at offset ``i + 1``. Rows only grow along a path, so
    a source is never an earlier move's destination; moves that stay put are left out."""
    return [(row, i) for i, row in enumerate(rows, start=1) if row != i]
