"""Parameter-free ops of DeML: object attention (random walk, box, crop) and gradient reversal."""

from deml_jax.ops.random_walk import random_walk_attention, spatial_kernel, transition_matrix
from deml_jax.ops.crop import (attention_boxes, crop_and_resize, crop_and_resize_uint8,
                               object_attention_crop, squarify_box, upsample_like_cv2)
from deml_jax.ops.regions import connected_components, largest_region_bbox
from deml_jax.ops.grad_reverse import gradient_reversal, dann_lambda

__all__ = [
    "random_walk_attention", "spatial_kernel", "transition_matrix",
    "attention_boxes", "connected_components", "largest_region_bbox", "crop_and_resize",
    "crop_and_resize_uint8",
    "object_attention_crop", "squarify_box", "upsample_like_cv2",
    "gradient_reversal", "dann_lambda",
]
