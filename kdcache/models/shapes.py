"""What input a model builder was given: image models need (C, H, W), patch models a square image."""

from ..errors import KDCacheError


def image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """(C, H, W) of an image input, or a one-line error naming the model and what it got instead."""
    if len(input_shape) != 3:
        raise KDCacheError(f"model {name!r} takes images (C, H, W), but the inputs have shape {tuple(input_shape)}: "
                           "use a model for such inputs (e.g. mlp, or package.module:factory)")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def square_image(input_shape: tuple[int, ...], name: str) -> tuple[int, int]:
    """(channels, side) of a square image input."""
    c, h, w = image_shape(input_shape, name)
    if h != w:
        raise KDCacheError(f"model {name!r} takes square images, but the inputs are {h}x{w}: use a model for such "
                           "inputs (e.g. mlp, or package.module:factory)")
    return c, h
