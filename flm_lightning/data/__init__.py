from flm_lightning.data.datamodule import PackedTokens, TextDataModule

__all__ = ["PackedTokens", "TextDataModule"]
