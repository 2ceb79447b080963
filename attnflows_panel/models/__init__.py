"""Load encoders, make the offline default pair, fine-tune, and check that two models compare."""

from attnflows_panel.models.loading import LoadedModel, default_pretrained_path, load_encoder
from attnflows_panel.models.pair import ModelPair, pair_differences, validate_pair

__all__ = ["LoadedModel", "ModelPair", "default_pair", "default_pretrained_path", "load_encoder", "pair_differences", "validate_pair"]


def default_pair(device: str = "cpu", progress: bool = True) -> ModelPair:
    """The offline default pair: the bundled BERT and its sentiment fine-tune (made once, then cached)."""
    from attnflows_panel.models.finetune import default_finetuned

    finetuned = default_finetuned(progress=progress)
    return ModelPair(load_encoder(default_pretrained_path(), device), load_encoder(finetuned.path, device))
