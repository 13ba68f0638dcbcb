"""Contrastive losses against their formulas written out as loops, and the training guard."""

from __future__ import annotations

import math

import pytest
import torch

from med3dvlm.models.losses import (
    CLIP_MAX_LOGIT_SCALE,
    ClipLoss,
    LossHealthMonitor,
    SigLipLoss,
    check_loss_is_finite,
)

N, WIDTH = 7, 5


def unit_features(n: int = N, width: int = WIDTH, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, width, generator=generator), dim=-1)
    # Texts near their images so the positives are not lost among the negatives.
    noise = torch.randn(n, width, generator=generator)
    text = torch.nn.functional.normalize(image + 0.8 * noise, dim=-1)
    return image.double().requires_grad_(), text.double().requires_grad_()


def siglip_by_loop(image, text, t_prime, bias, symmetric):
    """SPEC §3 written out: -(1/N) sum_ij log sigmoid(z_ij (exp(t') s_ij + b))."""
    n = image.shape[0]
    total = image.new_zeros(())
    for i in range(n):
        for j in range(n):
            similarity = torch.dot(image[i], text[j])
            if symmetric:
                similarity = (similarity + torch.dot(image[j], text[i])) / 2
            logit = torch.exp(t_prime) * similarity + bias
            z = 1.0 if i == j else -1.0
            total = total - torch.log(1.0 / (1.0 + torch.exp(-z * logit)))
    return total / n


def clip_by_loop(image, text, t_prime):
    """CLIP written out: mean of image->text and text->image cross-entropies."""
    n = image.shape[0]
    scale = torch.exp(t_prime)
    logits = [[scale * torch.dot(image[i], text[j]) for j in range(n)] for i in range(n)]
    image_to_text = image.new_zeros(())
    text_to_image = image.new_zeros(())
    for i in range(n):
        row = torch.stack([logits[i][j] for j in range(n)])
        column = torch.stack([logits[j][i] for j in range(n)])
        image_to_text = image_to_text - (logits[i][i] - torch.log(torch.exp(row).sum()))
        text_to_image = text_to_image - (logits[i][i] - torch.log(torch.exp(column).sum()))
    return (image_to_text + text_to_image) / (2 * n)


def loss_and_grads(loss_fn, image, text):
    loss = loss_fn(image, text)
    inputs = [image, text, *loss_fn.parameters()]
    return loss, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("preset", ["paper", "released"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_siglip_matches_formula_values_and_gradients(preset, symmetric):
    image, text = unit_features()
    loss_fn = SigLipLoss.from_preset(preset, symmetric_logits=symmetric).double()
    loss, grads = loss_and_grads(loss_fn, image, text)

    t_prime = loss_fn.logit_scale.detach().clone().requires_grad_()
    bias = loss_fn.logit_bias.detach().clone().requires_grad_()
    expected = siglip_by_loop(image, text, t_prime, bias, symmetric)
    expected_grads = torch.autograd.grad(expected, [image, text, t_prime, bias])

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_siglip_presets_hold_the_published_inits():
    paper, released = SigLipLoss.from_preset("paper"), SigLipLoss.from_preset("released")
    assert paper.logit_scale.item() == pytest.approx(math.log(10))
    assert paper.logit_bias.item() == -10 and not paper.symmetric_logits
    assert released.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert released.logit_bias.item() == 0 and released.symmetric_logits
    # Defaults are the paper's; the learnable scalars belong to the loss module.
    default = SigLipLoss()
    assert default.logit_scale.item() == pytest.approx(math.log(10))
    assert {name for name, _ in default.named_parameters()} == {"logit_scale", "logit_bias"}
    with pytest.raises(ValueError, match="preset"):
        SigLipLoss.from_preset("openai")


@pytest.mark.parametrize("chunk_size", [1, 3, 4, N])
@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_siglip_equals_full(chunk_size, symmetric):
    image, text = unit_features(seed=1)
    full = SigLipLoss.from_preset("released", symmetric_logits=symmetric).double()
    chunked = SigLipLoss.from_preset(
        "released", symmetric_logits=symmetric, chunked=True, chunk_size=chunk_size
    ).double()
    # Move away from the init so both scalars matter in the comparison.
    for loss_fn in (full, chunked):
        loss_fn.logit_scale.data.fill_(1.3)
        loss_fn.logit_bias.data.fill_(-2.5)

    loss_full, grads_full = loss_and_grads(full, image, text)
    loss_chunked, grads_chunked = loss_and_grads(chunked, image, text)
    torch.testing.assert_close(loss_chunked, loss_full, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_chunked, grads_full):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_siglip_rejects_unpaired_features():
    with pytest.raises(ValueError, match="same shape"):
        SigLipLoss()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        SigLipLoss(chunked=True, chunk_size=0)


def test_siglip_float32_params_promote_low_precision_features():
    image, text = unit_features()
    loss = SigLipLoss()(image.detach().bfloat16(), text.detach().bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_clip_matches_formula_values_and_gradients():
    image, text = unit_features(seed=2)
    loss_fn = ClipLoss().double()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    loss, grads = loss_and_grads(loss_fn, image, text)

    t_prime = loss_fn.logit_scale.detach().clone().requires_grad_()
    expected = clip_by_loop(image, text, t_prime)
    expected_grads = torch.autograd.grad(expected, [image, text, t_prime])

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_clip_scale_is_clipped_at_100():
    image, text = unit_features(seed=3)
    clipped = ClipLoss(init_logit_scale=math.log(1e4)).double()(image, text)
    limit = torch.tensor(math.log(CLIP_MAX_LOGIT_SCALE), dtype=torch.float64)
    at_limit = clip_by_loop(image, text, limit)
    torch.testing.assert_close(clipped, at_limit, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_loss_guard_raises_on_non_finite_loss(bad):
    with pytest.raises(RuntimeError, match=r"at step 17\. Lower the learning rate"):
        check_loss_is_finite(torch.tensor(bad), step=17)
    with pytest.raises(RuntimeError, match="NaN" if math.isnan(bad) else "infinite"):
        LossHealthMonitor().check(bad, step=3)


def test_loss_guard_accepts_finite_loss():
    check_loss_is_finite(torch.tensor(0.7), step=0)
    monitor = LossHealthMonitor(patience=2)
    image, text = unit_features(n=16, width=8)
    for step in range(5):
        monitor.check(torch.tensor(1.0), step, image=image, text=text)
    assert monitor.collapsed_steps == 0


def test_collapse_detected_after_patience_steps_of_identical_embeddings():
    monitor = LossHealthMonitor(patience=3)
    healthy, _ = unit_features(n=16, width=8)
    collapsed = torch.nn.functional.normalize(torch.ones(16, 8), dim=-1)
    monitor.check(0.69, 0, image=collapsed, text=healthy)
    monitor.check(0.69, 1, image=collapsed, text=healthy)
    monitor.check(0.69, 2, image=healthy, text=healthy)  # a healthy step resets the count
    monitor.check(0.69, 3, image=collapsed, text=healthy)
    monitor.check(0.69, 4, image=collapsed, text=healthy)
    with pytest.raises(RuntimeError, match=r"collapse at step 5: the image embeddings"):
        monitor.check(0.69, 5, image=collapsed, text=healthy)


def test_collapse_can_warn_instead_of_raising():
    monitor = LossHealthMonitor(patience=1, on_collapse="warn")
    collapsed = torch.zeros(4, 8)
    with pytest.warns(RuntimeWarning, match="identical across the batch"):
        monitor.check(0.69, 9, text=collapsed)
    # A single-sample batch has no spread to judge.
    LossHealthMonitor(patience=1).check(0.69, 0, text=torch.zeros(1, 8))
