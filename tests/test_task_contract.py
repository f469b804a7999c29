"""One contract over every ``Task`` (as timm's tests run one contract over every model).

Each task is built the way its stage builds it (``pretrain.presets.build_task``, the finetune
backbone builders, ``baselines.families.build_task`` and the probe / classifier tasks of
``baselines.run``) at tiny sizes, on one batch of four 28 px one-channel normalized images
with labels. For every phase: a finite scalar ``loss`` and only scalar outputs, no host sync
in ``forward``, a gradient on every trainable parameter of ``phase_module(phase)``. Then:
``eval_step`` sums with ``count`` equal to the batch size, a ``state_dict`` round trip into a
freshly built task gives identical outputs, ``pictures()`` are (3, H, W) in [0, 1].
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from baselines import aae, ae, cae, dae, stacked, vae
from baselines.base import ClassifierTask
from baselines.families import build_task as build_baseline
from baselines.pixels import Pixels
from baselines.run import CodeProbeTask
from finetune.backbone import build_vit, resolve_backbone, set_input_size
from finetune.finetune import FinetuneConfig, FinetuneTask, build_classifier, build_mixup
from finetune.probe import ProbeTask
from launch.task import Task
from pretrain.presets import MAEConfig, create_mae
from pretrain.task import build_task as build_mae

SIZE, CLASSES, BATCH = 28, 10, 4
MEAN, STD = (0.13,), (0.31,)
MAE_ARCH = {
    "depth": 1,
    "embed_dim": 32,
    "num_heads": 2,
    "decoder_embed_dim": 16,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}

#: ops that wait for the device on CUDA: reading a value on the host (``.item()``, ``float(t)``,
#: ``if t:`` dispatch ``_local_scalar_dense``) or an output shape that depends on data. Not seen on
#: CPU: ``.tolist()``, ``.numpy()`` and ``.cpu()`` of a CPU tensor dispatch no op at all.
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
}
#: indexing ops that sync when an index is a boolean mask (``x[mask]``, ``x[mask] = v``)
MASK_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _mae() -> Task:
    return build_mae(MAEConfig(preset="mae_vit_mnist_p7", **MAE_ARCH), image_mean=MEAN, image_std=STD)


def _vit_source():
    """The backbone as ``run_probe`` / ``run_finetune`` resolve it (here: an MAE module)."""
    return resolve_backbone(create_mae("mae_vit_mnist_p7", **MAE_ARCH), {})


def _probe() -> Task:
    return ProbeTask(set_input_size(build_vit(_vit_source(), num_classes=0), SIZE), CLASSES, "avg")


def _finetune(**settings) -> Callable[[], Task]:
    def build() -> Task:
        cfg = FinetuneConfig(**settings)
        model = build_classifier(cfg, _vit_source(), CLASSES)
        return FinetuneTask(
            set_input_size(model, SIZE),
            mixup=build_mixup(cfg, CLASSES),
            smoothing=cfg.smoothing,
            ema_decay=cfg.ema_decay if cfg.ema else None,
        )

    return build


def _baseline(cfg) -> Callable[[], Task]:
    return lambda: build_baseline(cfg, Pixels(MEAN, STD), SIZE)


def _sdae_bottom() -> Task:
    """The first greedy fit of a stacked DAE (its later layers frozen)."""
    return next(iter(build_baseline(SDAE, Pixels(MEAN, STD), SIZE).stages()))[1]


SDAE = stacked.SDAEConfig(layers=[32, 8])
TASKS: dict[str, Callable[[], Task]] = {
    "mae": _mae,
    "probe": _probe,
    "finetune": _finetune(),
    "finetune_cls_ema_no_mixup": _finetune(pool="cls", ema=True, mixup=0.0, cutmix=0.0),
    "ae": _baseline(ae.AEConfig(hidden=[32], latent_dim=8)),
    "dae": _baseline(dae.DAEConfig(widths=[8, 8])),
    "sdae_top_layer": _baseline(SDAE),
    "sdae_bottom_layer": _sdae_bottom,
    "cae": _baseline(cae.CAEConfig(widths=[8, 4])),
    "vae": _baseline(vae.VAEConfig(hidden=[32], latent_dim=2)),
    "aae": _baseline(aae.AAEConfig(hidden=[32], latent_dim=2, disc_hidden=[16])),
    "aae_conv_mog": _baseline(aae.AAEConfig(arch="conv", widths=[8, 8], latent_dim=3, prior="mog", disc_hidden=[16])),
    "code_probe_ae": lambda: CodeProbeTask(_baseline(ae.AEConfig(hidden=[32], latent_dim=8))().backbone(), CLASSES),
    "code_probe_vae": lambda: CodeProbeTask(_baseline(vae.VAEConfig(hidden=[32], latent_dim=2))().backbone(), CLASSES),
    "classifier_sdae": lambda: ClassifierTask(_baseline(SDAE)().backbone(), CLASSES),
    "classifier_cae": lambda: ClassifierTask(_baseline(cae.CAEConfig(widths=[8, 4]))().backbone(), CLASSES),
}


class _SyncRecorder(TorchDispatchMode):
    """Records every dispatched op that would make the host wait for a CUDA device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func._schema.name
        if op in SYNC_OPS or (op in MASK_INDEX_OPS and any(_is_mask(i) for i in args[1])):
            self.syncs.append(op)
        return func(*args, **(kwargs or {}))


def _is_mask(index: torch.Tensor | None) -> bool:
    return index is not None and index.dtype in (torch.bool, torch.uint8)


def _batch(n: int = BATCH) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(n, 1, SIZE, SIZE, generator=g),
        "label": torch.arange(n) % CLASSES,
        "key": [f"{i:06d}" for i in range(n)],
    }


def _seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws its lambda with numpy
    torch.manual_seed(seed)


def _build(name: str, seed: int) -> Task:
    _seeded(seed)
    return TASKS[name]()


@pytest.fixture(params=list(TASKS))
def name(request) -> str:
    return request.param


def test_forward_gives_scalars_without_host_sync_and_grads_reach_the_phase_module(name: str) -> None:
    task, batch = _build(name, 0).train(), _batch()
    for phase in task.phases:
        task.zero_grad(set_to_none=True)
        with _SyncRecorder() as recorder:
            out = task(batch, phase)
        assert not recorder.syncs, f"{name}/{phase}: forward syncs with the host ({', '.join(recorder.syncs)})"
        assert "loss" in out and torch.isfinite(out["loss"]), f"{name}/{phase}: no finite loss"
        assert all(v.shape == () for v in out.values()), f"{name}/{phase}: non-scalar outputs {list(out)}"
        out["loss"].backward()
        trainable = {n: p for n, p in task.phase_module(phase).named_parameters() if p.requires_grad}
        assert trainable, f"{name}/{phase}: nothing to train"
        missing = {n for n, p in trainable.items() if p.grad is None}  # no task has a legitimately unused one
        assert not missing, f"{name}/{phase}: no gradient reaches {sorted(missing)}"


def test_eval_step_sums_with_count(name: str) -> None:
    sums = _build(name, 0).eval().eval_step(_batch())
    assert sums["count"].item() == BATCH and "loss" in sums
    assert all(v.shape == () and torch.isfinite(v) for v in sums.values()), f"{name}: {sums}"


def _outputs(task: Task) -> dict[str, torch.Tensor]:
    """Everything the trainer reads from ``task``, under fixed seeds (noise, masks, mixup)."""
    out = {}
    for phase in task.phases:
        _seeded(3)
        out |= {f"{phase}/{k}": v.detach() for k, v in task.train()(_batch(), phase).items()}
    _seeded(3)
    return out | {f"eval/{k}": v for k, v in task.eval().eval_step(_batch()).items()}


def test_state_dict_round_trip_gives_identical_outputs(name: str) -> None:
    trained, fresh = _build(name, 0), _build(name, 1)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values())), (
        f"{name}: seeds 0 and 1 build the same weights, the round trip would prove nothing"
    )
    fresh.load_state_dict(trained.state_dict())
    expected, got = _outputs(trained), _outputs(fresh)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{name}: {key} differs after the round trip"


def test_pictures_are_rgb_in_unit_range(name: str) -> None:
    # 12 labelled images: the baselines add a scatter of the codes from ten images on
    for picture_name, picture in _build(name, 0).eval().pictures(_batch(12)).items():
        assert picture.ndim == 3 and picture.shape[0] == 3, f"{name}/{picture_name}: shape {tuple(picture.shape)}"
        assert picture.dtype.is_floating_point and 0 <= picture.min() and picture.max() <= 1, f"{name}/{picture_name}"


def test_the_sync_check_catches_host_reads_and_data_dependent_shapes() -> None:
    x = torch.randn(8)
    reads = (
        lambda: x.sum().item(),
        lambda: bool(x.sum() > 0),
        lambda: x[x > 0],
        lambda: x.clone().index_put_((x > 0,), torch.tensor(0.0)),
    )
    for read in reads:
        with _SyncRecorder() as recorder:
            read()
        assert recorder.syncs
