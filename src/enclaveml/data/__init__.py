"""Data sets and the one preprocessing pipeline shared by the owner's tools and the enclave."""

from .preprocess import Preprocessing, array_to_tensor, decode_array, decode_image, image_to_tensor, load_image_bytes
from .folder import ImageFolder, load_image_folder

__all__ = [
    "Preprocessing",
    "array_to_tensor",
    "decode_array",
    "decode_image",
    "image_to_tensor",
    "load_image_bytes",
    "ImageFolder",
    "load_image_folder",
]
