"""PyTorch twins of VTP's architectures, parameter for parameter, so VTP
checkpoints (safetensors) load with `load_state_dict`."""
import torch
import torch.nn.functional as F
from torch import nn


class SmallCnn(nn.Module):
    """vtp_trainer::engine::model's `small_cnn`."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.bn3(self.conv3(x))), 1)
        return self.fc(torch.flatten(x, 1))


def build(name: str, classes: int) -> nn.Module:
    """The twin of a VTP model name."""
    if name == "small_cnn":
        return SmallCnn(classes)
    import torchvision

    return {
        "resnet18": torchvision.models.resnet18,
        "resnet34": torchvision.models.resnet34,
        "mobilenet_v2": torchvision.models.mobilenet_v2,
    }[name](num_classes=classes)


def load_vtp_weights(model: nn.Module, state: dict) -> None:
    """Loads VTP weights; only BatchNorm's `num_batches_tracked` (which tch
    does not keep) may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    assert not unexpected, unexpected
