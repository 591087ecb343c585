"""The torch heads' memory is bounded by batch x classes (b09): no forward pass of the network,
in training, early stopping or prediction, gives logits for more rows than a training batch or a
scoring chunk (`torch_heads.score_rows`). Observed with a real forward hook on every module."""

from __future__ import annotations

import numpy as np
import pytest

from phrasefuse.fuse.data import Blocks, Task
from phrasefuse.fuse.heads import batch_size_for, fit, head_params


def _data(rng, n: int, classes: int) -> tuple[Blocks, np.ndarray]:
    y = np.arange(n) % classes
    image = (np.eye(classes, 16)[y] + 0.3 * rng.standard_normal((n, 16))).astype(np.float32)
    text = rng.standard_normal((n, 4)).astype(np.float32)
    return Blocks([image, text], np.ones((n, 2), bool)), y


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_torch_heads_never_hold_logits_for_more_than_a_batch(kind, monkeypatch):
    import torch

    from phrasefuse.fuse.heads import torch_heads
    from phrasefuse.fuse.heads.nets import LinearNet, MlpNet

    classes, chunk = 10, 40
    # The scoring budget (rows x classes) made small enough for this test's splits to need chunks.
    monkeypatch.setattr(torch_heads, "LOGIT_VALUES", classes * chunk)
    rng = np.random.default_rng(0)
    (train, y), (val, y_val), (test, y_test) = (_data(rng, n, classes) for n in (300, 200, 200))
    task = Task([f"c{i}" for i in range(classes)], False)
    params = head_params(kind, {"proj_dim": 8, "hidden": 16, "max_steps": 200})

    def fitted():
        shapes: list[tuple[int, ...]] = []

        def record(module, _inputs, output):  # the head's network: its logits (mlp: (logits, image))
            if isinstance(module, (LinearNet, MlpNet)):
                shapes.append(tuple((output[0] if isinstance(output, tuple) else output).shape))

        handle = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            head = fit(kind, train, y, task, ["image", "text"], [1.0, 0.5], params, seed=3, stop=(val, y_val))
            probs = head.predict(test)
        finally:
            handle.remove()
        return shapes, probs

    shapes, probs = fitted()
    batch = batch_size_for(300, None)
    assert shapes and all(c == classes for _, c in shapes)
    assert max(rows for rows, _ in shapes) <= max(batch, chunk)  # never the 200-row splits at once
    assert (chunk, classes) in shapes  # validation and prediction went through in chunks
    assert probs.shape == (200, classes) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.mean(np.argmax(probs, axis=1) == y_test) > 0.6  # chance: 0.1
    again_shapes, again = fitted()  # the seed still decides everything
    assert again_shapes == shapes and np.array_equal(again, probs)
    monkeypatch.setattr(torch_heads, "LOGIT_VALUES", 1 << 24)  # the default: each split in one pass
    whole_shapes, whole = fitted()
    assert (200, classes) in whole_shapes  # the same head: chunking changes no choice (steps, early stop)
    np.testing.assert_allclose(whole, probs, atol=1e-6)


def test_top_k_accuracy_in_row_chunks_is_the_whole_split_figure(monkeypatch):
    from phrasefuse.fuse import metrics

    rng = np.random.default_rng(0)
    scores, y = rng.random((301, 40)).astype(np.float32), rng.integers(-1, 40, 301)  # -1: an unseen label
    whole = {k: float(np.mean(np.any(np.argsort(-scores, axis=1)[:, :k] == y[:, None], axis=1))) for k in (1, 5)}
    monkeypatch.setattr(metrics, "TOPK_VALUES", 40 * 7)  # 7-row chunks
    assert {k: metrics.topk_accuracy(scores, y, k) for k in (1, 5)} == whole
    assert metrics.topk_accuracy(scores, y, 40) == float(np.mean(y >= 0))


def test_splits_whose_probabilities_would_not_fit_are_refused_before_training():
    """Many labels: choosing and scoring holds (rows, labels) probabilities of a split; a manifest
    whose largest split would not fit is one line, exit 2, before any head is fitted."""
    import numpy as np
    import pytest

    from phrasefuse.errors import BadInput
    from phrasefuse.fuse.data import SCORING_COPIES, check_scoring_memory

    rows = {"train": np.arange(50_000), "val": np.arange(50_000), "test": np.arange(50_000)}
    need = SCORING_COPIES * 50_000 * 50_000 * 4
    with pytest.raises(BadInput) as refused:
        check_scoring_memory(rows, 50_000, "m.parquet", available=need - 1)
    message = str(refused.value)
    assert "\n" not in message and "m.parquet" in message and "50,000 labels" in message
    check_scoring_memory(rows, 50_000, "m.parquet", available=need)  # fits: nothing said
    check_scoring_memory(rows, 10, "m.parquet")  # this machine, a small manifest
