import math

import torch

from flm_lightning.objective import freelm_loss


def _batch(labels, mask, is_teacher=None):
    batch = {"labels": torch.tensor(labels), "loss_mask": torch.tensor(mask, dtype=torch.float32)}
    if is_teacher is not None:
        batch["is_teacher"] = torch.tensor(is_teacher)
    return batch


def test_masked_targets_do_not_count():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 10, requires_grad=True)
    batch = _batch([[1, 2, 3, 4]], [[1, 1, 0, 0]])
    parts = freelm_loss(logits, batch)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([1, 2]))
    torch.testing.assert_close(parts.loss, expected)
    assert parts.tokens.item() == 2
    parts.loss.backward()
    assert logits.grad[0, 2:].abs().max() == 0  # masked positions get no gradient
    assert logits.grad[0, :2].abs().max() > 0
    # Changing logits where the mask is 0 leaves the loss unchanged.
    other = logits.detach().clone()
    other[0, 2:] = 100.0
    torch.testing.assert_close(freelm_loss(other, batch).loss, expected)


def test_teacher_sample_scored_on_its_label_token_only():
    vocab, label_true = 10, 8
    logits = torch.zeros(2, 3, vocab)
    logits[1, 2, label_true] = 5.0  # the teacher sample's verdict position predicts "true"
    batch = _batch(
        labels=[[1, 2, 3], [4, 5, label_true]],
        mask=[[1, 1, 1], [0, 0, 1]],
        is_teacher=[False, True],
    )
    parts = freelm_loss(logits, batch)
    uniform = math.log(vocab)
    teacher = -torch.log_softmax(logits[1, 2], -1)[label_true].item()
    assert parts.lm_tokens.item() == 3 and parts.teacher_tokens.item() == 1
    assert parts.lm_loss.item() == pytest_approx(uniform)
    assert parts.teacher_loss.item() == pytest_approx(teacher)
    # The optimised loss is one causal-LM mean over all 4 trained targets.
    assert parts.loss.item() == pytest_approx((3 * uniform + teacher) / 4)
    assert parts.teacher_preds.tolist() == [label_true]
    assert parts.teacher_targets.tolist() == [label_true]


def test_no_teacher_rows_means_no_teacher_metrics():
    parts = freelm_loss(torch.randn(2, 3, 5), _batch([[1, 2, 3]] * 2, [[1, 1, 1]] * 2))
    assert parts.teacher_preds is None and parts.teacher_tokens.item() == 0
    torch.testing.assert_close(parts.lm_loss, parts.loss)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5)
