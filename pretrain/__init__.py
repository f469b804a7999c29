"""ViT-MAE pretraining: the model, its masking and objective, presets, official checkpoints, the task.

from pretrain import create_mae, mae_loss
model = create_mae("mae_vit_base")                          # or "mae_vit_mnist_p4", ...
latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio=0.75)
pred = model.forward_decoder(latent, ids_restore)          # (N, L, p*p*C)
loss = mae_loss(pred, model.patchify(imgs), mask, norm_pix_loss=True)
"""

from pretrain.masking import random_masking
from pretrain.model import MaskedAutoencoderViT
from pretrain.objective import mae_loss, normalize_patches
from pretrain.official import from_hf_vitmae, load_official, read_state_dict
from pretrain.presets import PRESETS, MAEConfig, build_model, create_mae, register_preset
from pretrain.task import MAETask, build_task

__all__ = [
    "PRESETS",
    "MAEConfig",
    "MAETask",
    "MaskedAutoencoderViT",
    "build_model",
    "build_task",
    "create_mae",
    "from_hf_vitmae",
    "load_official",
    "mae_loss",
    "normalize_patches",
    "random_masking",
    "read_state_dict",
    "register_preset",
]
