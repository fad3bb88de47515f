"""Model growth (MSG): function-preserving width and depth growth with masks, optimizer transfer."""

from flm_lightning.growth.operators import (
    GrowthMasks,
    MaskPlan,
    check_growth,
    grow,
    layer_order,
    mask_value,
    masked_norm,
)
from flm_lightning.growth.optimizer import transfer_adam_state

__all__ = [
    "GrowthMasks",
    "MaskPlan",
    "check_growth",
    "grow",
    "layer_order",
    "mask_value",
    "masked_norm",
    "transfer_adam_state",
]
