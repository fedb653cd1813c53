# The small CPU model of the quickstarts: a ResNet-18 trained from scratch (trainable BatchNorm,
# since FrozenBN would keep its random-init statistics, and nothing frozen); three levels at strides
# 8, 16, 32, which suit 100-200 px images, the third from the neck's stride-2 conv on res4 so that
# res5 (2/3 of ResNet-18's weights) is not built; d_model 128, 1 encoder and 3 decoder layers with
# FFN 256. No dropout: a short schedule on a large synthetic set does not overfit, and dropout would
# only slow learning. Not a config: quickstart configs call it on their model.


def shrink_for_cpu(model):
    """Set the quickstart's backbone and transformer sizes on a Deformable-DETR-style model config
    (any config with ``backbone`` and ``transformer.{encoder,decoder}`` as
    configs/common/models/deformable_detr.py); returns it."""
    model.backbone.depth = 18
    model.backbone.freeze_at = 0
    model.backbone.norm = "BN"
    model.backbone.in_features = ["res3", "res4"]
    model.backbone.num_extra_levels = 1
    model.transformer.num_levels = 3
    model.transformer.d_model = 128
    model.transformer.encoder.num_layers = 1
    model.transformer.decoder.num_layers = 3
    model.transformer.encoder.d_ffn = 256
    model.transformer.decoder.d_ffn = 256
    model.transformer.encoder.dropout = 0.0
    model.transformer.decoder.dropout = 0.0
    return model
