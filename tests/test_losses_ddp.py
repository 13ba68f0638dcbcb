"""Two CPU processes (gloo) give the same loss and gradients as one process on the whole batch.

Convention under test (``med3dvlm.models.distributed``): every rank returns the global loss;
the gradient reaching rank r's features is ``world_size * dL/dx_r`` and the loss scalars'
gradients average over ranks to ``dL/dtheta``, so DDP's gradient averaging yields exactly the
single-process gradients. The last check wraps a tiny model in real DDP to confirm that.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from med3dvlm.models.losses import ClipLoss, SigLipLoss

pytestmark = pytest.mark.slow  # two spawned gloo processes: make test-slow

WORLD = 2
WIDTH, IN_WIDTH = 4, 3


def _siglip(**kwargs):
    def build():
        loss_fn = SigLipLoss(**kwargs)
        # Off the init so the scale and bias both shape the gradients.
        loss_fn.logit_scale.data.fill_(1.1)
        loss_fn.logit_bias.data.fill_(-1.7)
        return loss_fn

    return build


# name -> (loss factory, local batch size of each rank)
CASES = {
    "siglip_full": (_siglip(), (3, 3)),
    "siglip_full_symmetric_uneven": (_siglip(symmetric_logits=True), (4, 2)),
    "siglip_ring": (_siglip(chunked=True), (3, 3)),
    "siglip_ring_symmetric_uneven": (_siglip(symmetric_logits=True, chunked=True), (2, 3)),
    "siglip_ring_chunk2": (_siglip(chunked=True, chunk_size=2), (3, 3)),
    "clip": (ClipLoss, (3, 3)),
    "clip_uneven": (ClipLoss, (1, 4)),
}
DDP_CASES = ("siglip_full", "siglip_ring_symmetric_uneven", "clip")


def _features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, WIDTH, generator=generator, dtype=torch.float64), dim=-1)
    noise = torch.randn(n, WIDTH, generator=generator, dtype=torch.float64)
    return image, F.normalize(image + noise, dim=-1)


class _TinyContrastiveModel(nn.Module):
    """Two linear 'encoders' and the loss, as the stage-1 LightningModule would hold them."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(IN_WIDTH, WIDTH)
        self.text_proj = nn.Linear(IN_WIDTH, WIDTH)
        self.loss_fn = loss_fn

    def forward(self, volumes: torch.Tensor, reports: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.image_proj(volumes), dim=-1)
        text = F.normalize(self.text_proj(reports), dim=-1)
        return self.loss_fn(image, text)


def _model_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 100)
    return (
        torch.randn(n, IN_WIDTH, generator=generator, dtype=torch.float64),
        torch.randn(n, IN_WIDTH, generator=generator, dtype=torch.float64),
    )


def _local(tensors, sizes, rank):
    start = sum(sizes[:rank])
    return [t[start : start + sizes[rank]].clone() for t in tensors]


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for seed, (name, (factory, sizes)) in enumerate(CASES.items()):
            image, text = _local(_features(sum(sizes), seed), sizes, rank)
            image.requires_grad_()
            text.requires_grad_()
            loss_fn = factory().double()
            loss = loss_fn(image, text)
            grads = torch.autograd.grad(loss, [image, text, *loss_fn.parameters()])
            results[name] = {"loss": loss.detach(), "grads": grads}
        for seed, name in enumerate(DDP_CASES):
            factory, sizes = CASES[name]
            model = nn.parallel.DistributedDataParallel(_TinyContrastiveModel(factory()).double())
            loss = model(*_local(_model_inputs(sum(sizes), seed), sizes, rank))
            loss.backward()
            results[f"ddp_{name}"] = {
                "loss": loss.detach(),
                "grads": {n: p.grad for n, p in model.module.named_parameters()},
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out_dir = tmp_path_factory.mktemp("ddp")
    # Spawned children must import this file by the same name the parent used.
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        mp.spawn(_worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, join=True)
    finally:
        sys.path.remove(os.path.dirname(__file__))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_loss_and_gradients_equal_single_process(rank_results, name):
    factory, sizes = CASES[name]
    image, text = (t.requires_grad_() for t in _features(sum(sizes), list(CASES).index(name)))
    loss_fn = factory().double()
    loss = loss_fn(image, text)
    grad_image, grad_text, *grad_params = torch.autograd.grad(loss, [image, text, *loss_fn.parameters()])

    for rank, results in enumerate(rank_results):
        got = results[name]
        _close(got["loss"], loss.detach())  # every rank reports the global loss
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        got_image, got_text = got["grads"][:2]
        _close(got_image / WORLD, grad_image[rows])
        _close(got_text / WORLD, grad_text[rows])
    for index, want in enumerate(grad_params):
        averaged = sum(r[name]["grads"][2 + index] for r in rank_results) / WORLD
        _close(averaged, want)


@pytest.mark.parametrize("name", DDP_CASES)
def test_real_ddp_parameter_gradients_equal_single_process(rank_results, name):
    factory, sizes = CASES[name]
    model = _TinyContrastiveModel(factory()).double()
    loss = model(*_model_inputs(sum(sizes), DDP_CASES.index(name)))
    loss.backward()
    for results in rank_results:
        got = results[f"ddp_{name}"]
        _close(got["loss"], loss.detach())
        for param_name, param in model.named_parameters():
            _close(got["grads"][param_name], param.grad)
