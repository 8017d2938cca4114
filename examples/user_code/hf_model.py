"""A Hugging Face transformers image classifier for train.py
(``config["backbone"] = "hf/vit"``): a small ViT built from a ``ViTConfig``
(randomly initialised: nothing is downloaded from the hub), returning plain
logits like any PyTorch classifier."""

import torch
from transformers import ViTConfig, ViTForImageClassification


class ViT(torch.nn.Module):
    def __init__(self, size: int, classes: int) -> None:
        super().__init__()
        config = ViTConfig(
            image_size=size, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, num_labels=classes,
        )
        self.vit = ViTForImageClassification(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixels).logits


def build(size: int, classes: int) -> torch.nn.Module:
    return ViT(size, classes)
