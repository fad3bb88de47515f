from flm_lightning.model.config import ModelConfig
from flm_lightning.model.counting import ModelSize, build_meta_model, count_model
from flm_lightning.model.transformer import FLMTransformer

__all__ = ["FLMTransformer", "ModelConfig", "ModelSize", "build_meta_model", "count_model"]
