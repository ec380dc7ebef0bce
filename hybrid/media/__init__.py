"""Media input (images) for K2.5/K2.6: loading (image.py), the reference preprocessing (preprocess.py),
chat parts and placeholder expansion (prompt.py), encoding with a content cache (encode.py).
Same layer as hybrid/text: imports hybrid.config / hybrid.model, never hybrid.apps."""
from hybrid.media.image import (FORMATS, ImageLimits, MediaError, NoVisionTower, TooManyImages,  # noqa: F401
                                VideoNotSupported, load_image)
from hybrid.media.preprocess import ProcessedImage, ProcessorConfig, navit_resize, preprocess, tokens_for_size  # noqa: F401
from hybrid.media.prompt import expand_placeholders, split_media  # noqa: F401
