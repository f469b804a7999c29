"""WebDataset shards: ``mae-prepare`` writes them, ``build_loader`` reads them on every rank.

info = dataset_info(cfg)                       # prepares built-in MNIST under cfg.root on first use
loader = build_loader(cfg, "train", preset="pretrain", batch_size=64, img_size=28, seed=0,
                      rank=rank, world_size=world)
for epoch in range(epochs):
    loader.set_epoch(epoch)
    for batch in loader: ...                   # {"image": (B, C, H, W), "label": (B,), "key": [...]}
"""

from launch.data.config import DataConfig
from launch.data.dataset import DatasetInfo, dataset_info
from launch.data.loader import ShardLoader, build_loader

__all__ = ["DataConfig", "DatasetInfo", "ShardLoader", "build_loader", "dataset_info"]
