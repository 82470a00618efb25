"""User-built detectors for the tests, loaded through 'tests.custom_detectors:NAME'."""

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone


def fasterrcnn_resnet18_fpn(
    num_classes: int = 5, trainable_layers: int = 3, min_size: int = 256, max_size: int = 256
) -> FasterRCNN:
    """ResNet-18 FPN Faster R-CNN with custom anchors. ``resnet_fpn_backbone`` uses
    FrozenBatchNorm2d and freezes the first stages, as a pretrained user model would."""
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=trainable_layers)
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(
        backbone, num_classes=num_classes, rpn_anchor_generator=anchors, min_size=min_size, max_size=max_size
    )
