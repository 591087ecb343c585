"""Check a LightGBM text model before LightGBM parses it.

LightGBM trusts its model file: a child index out of range reads past an array (a segfault), a
cycle of children makes prediction loop forever in native code (deaf to SIGTERM), a split on a
feature the head does not have reads past the row. A head's lgbm*.txt is user input like any
file, so each tree is checked here first: sizes agree, every child index is in range, the nodes
form one tree reached from the root (each node once: no cycle), split features are below the
head's feature count, values are finite, and nothing phrasefuse never writes (categorical or
linear trees) is there. The text must also be whole: LightGBM reads a text cut after any complete
tree as a valid model with fewer trees, so the trees must end with its `end of trees` marker and
the text with its parameters section, and the number of trees must agree with the header
(`tree_sizes`, `num_tree_per_iteration`) and with the boosting rounds the head recorded.
`tree_sizes` (byte offsets LightGBM would trust to find the trees) is dropped, so LightGBM parses
the trees one after the other as checked here.
"""

from __future__ import annotations

import math
import re

TREE_SIZES_RE = re.compile(r"^tree_sizes=.*\n", re.M)
# LightGBM's SaveModelToString: the trees, this line, feature importances, then the parameters
# between these two lines; the Python package appends one pandas_categorical line (null: numpy input).
END_OF_TREES_RE = re.compile(r"^end of trees[ \t]*$", re.M)
PARAMETERS_RE = re.compile(r"^parameters:[ \t]*$", re.M)
END_OF_PARAMETERS_RE = re.compile(r"^end of parameters[ \t]*$", re.M)
TAILS = ("", "pandas_categorical:null")


class BadModel(ValueError):
    """The model text is not a sound LightGBM model of the expected shape (message says where)."""


def checked_model_text(text: str, n_features: int, n_classes: int | None = None,
                       iterations: int | None = None) -> str:
    """`text` without `tree_sizes`, after checking every tree; raises BadModel naming the tree and field.

    `n_features`: the width of the rows the head feeds it; `n_classes`: the classes of a multi-class
    model (None: one binary model); `iterations`: the boosting rounds the head recorded (None: not
    known, e.g. one-vs-rest boosters that each stopped at their own round)."""
    header, _, rest = text.partition("\nTree=")
    fields = _fields(header)
    max_feature = _int(fields, "max_feature_idx", "header")
    if max_feature + 1 != n_features:
        raise BadModel(f"header: max_feature_idx={max_feature}, but the head feeds {n_features} features")
    per_iteration = _int(fields, "num_tree_per_iteration", "header") if "num_tree_per_iteration" in fields else 1
    expected = n_classes if n_classes is not None else 1
    if per_iteration != expected or _int(fields, "num_class", "header") != expected:
        raise BadModel(f"header: num_class/num_tree_per_iteration say {fields.get('num_class')}/{per_iteration}, "
                       f"but the head has {expected} class model(s) per iteration")
    if not rest:
        raise BadModel("no trees")
    trees_text = _check_whole("Tree=" + rest)
    blocks = [b for b in re.split(r"(?m)^(?=Tree=\d+\s*$)", trees_text) if b.strip()]
    _check_count(blocks, fields, per_iteration, iterations)
    for number, block in enumerate(blocks):
        _check_tree(_fields(block), f"Tree={number}", n_features)
    return TREE_SIZES_RE.sub("", text, count=1)


def _check_whole(trees_and_tail: str) -> str:
    """The trees' text, after checking that `end of trees`, the parameters section and nothing
    else follow them (a text cut anywhere lacks one of them)."""
    end = END_OF_TREES_RE.search(trees_and_tail)
    if end is None:
        raise BadModel("no 'end of trees' line: the model text is cut short")
    tail = trees_and_tail[end.end():]
    start = PARAMETERS_RE.search(tail)
    stop = END_OF_PARAMETERS_RE.search(tail, start.end()) if start else None
    if start is None or stop is None:
        raise BadModel("the parameters section after 'end of trees' is missing or unfinished: the model text "
                       "is cut short")
    if tail[stop.end():].strip() not in TAILS:
        raise BadModel("unexpected text after 'end of parameters'")
    return trees_and_tail[:end.start()]


def _check_count(blocks: list[str], fields: dict, per_iteration: int, iterations: int | None) -> None:
    """Trees numbered 0, 1, ... as many as the header's `tree_sizes` lists, whole iterations of
    `per_iteration` trees, and `iterations` of them when the head recorded that."""
    if not blocks:
        raise BadModel("no trees")
    for number, block in enumerate(blocks):
        first_line = block.split("\n", 1)[0].strip()
        if first_line != f"Tree={number}":  # a tree removed or repeated in the middle
            raise BadModel(f"Tree={number}: expected here, found '{first_line[:40]}'")
    if "tree_sizes" in fields and len(fields["tree_sizes"].split()) != len(blocks):
        raise BadModel(f"header: tree_sizes lists {len(fields['tree_sizes'].split())} trees, "
                       f"but the text holds {len(blocks)}")
    if len(blocks) % per_iteration:
        raise BadModel(f"{len(blocks)} trees are not whole iterations of {per_iteration} trees")
    if iterations is not None and len(blocks) != iterations * per_iteration:
        raise BadModel(f"{len(blocks)} trees, but the head recorded {iterations} boosting rounds of "
                       f"{per_iteration} trees")


def _fields(block: str) -> dict[str, str]:
    out = {}
    for line in block.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _int(fields: dict, key: str, where: str) -> int:
    try:
        return int(fields[key])
    except (KeyError, ValueError):
        raise BadModel(f"{where}: {key} is missing or not a whole number") from None


def _numbers(fields: dict, key: str, where: str, n: int, kind: type, what: str) -> list:
    """The n space-separated values of `key`, each of `kind` (int or float)."""
    try:
        values = [kind(v) for v in fields.get(key, "").split()]
    except ValueError:
        raise BadModel(f"{where}: {key} holds something other than {what}") from None
    if len(values) != n:
        raise BadModel(f"{where}: {key} has {len(values)} values, expected {n}")
    return values


def _ints(fields: dict, key: str, where: str, n: int) -> list[int]:
    return _numbers(fields, key, where, n, int, "whole numbers")


def _floats(fields: dict, key: str, where: str, n: int) -> list[float]:
    values = _numbers(fields, key, where, n, float, "numbers")
    if not all(math.isfinite(v) for v in values):
        raise BadModel(f"{where}: {key} holds NaN or infinite values")
    return values


def _check_tree(fields: dict, where: str, n_features: int) -> None:
    leaves = _int(fields, "num_leaves", where)
    if leaves < 1:
        raise BadModel(f"{where}: num_leaves={leaves}")
    if int(fields.get("num_cat", "0") or 0) != 0 or int(fields.get("is_linear", "0") or 0) != 0:
        raise BadModel(f"{where}: categorical or linear tree (phrasefuse never writes one)")
    _floats(fields, "leaf_value", where, leaves)
    internal = leaves - 1
    if internal == 0:
        return
    features = _ints(fields, "split_feature", where, internal)
    if any(not 0 <= f < n_features for f in features):
        raise BadModel(f"{where}: split_feature {max(features, key=lambda f: abs(f))} is outside 0..{n_features - 1}")
    _floats(fields, "threshold", where, internal)
    if any(d & 1 for d in _ints(fields, "decision_type", where, internal)):
        raise BadModel(f"{where}: categorical decision_type (phrasefuse never writes one)")
    left, right = _ints(fields, "left_child", where, internal), _ints(fields, "right_child", where, internal)
    _check_shape(left, right, leaves, where)


def _check_shape(left: list[int], right: list[int], leaves: int, where: str) -> None:
    """Children in range (node i >= 0, leaf ~c for c < 0), and one tree: from the root every
    internal node and every leaf is reached exactly once (so no cycle, nothing shared or orphaned)."""
    internal = len(left)
    seen_nodes, seen_leaves = [False] * internal, [False] * leaves
    stack = [0]
    seen_nodes[0] = True
    while stack:
        node = stack.pop()
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= internal or seen_nodes[child]:
                    raise BadModel(f"{where}: node {node} has child {child}, "
                                   f"{'out of range' if child >= internal else 'reached twice (a cycle)'}")
                seen_nodes[child] = True
                stack.append(child)
            else:
                leaf = ~child
                if leaf >= leaves or seen_leaves[leaf]:
                    raise BadModel(f"{where}: node {node} has leaf child {child}, "
                                   f"{'out of range' if leaf >= leaves else 'reached twice'}")
                seen_leaves[leaf] = True
    if not all(seen_nodes) or not all(seen_leaves):
        raise BadModel(f"{where}: nodes or leaves not reachable from the root")
