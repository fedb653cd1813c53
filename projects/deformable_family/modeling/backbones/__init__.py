from .multiscale_resnet import MultiScaleResNet, build_multiscale_resnet_backbone

__all__ = ["MultiScaleResNet", "build_multiscale_resnet_backbone"]
