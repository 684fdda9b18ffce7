"""Typed errors for bad inputs, so a data pipeline can skip and count a sample instead of crashing or hanging."""


class MediaError(ValueError):
    """An image or video cannot be used; the message names the file and the problem."""


class ImageLoadError(MediaError):
    """Missing, unreadable, corrupt, zero-size or unsupported image."""


class VideoLoadError(MediaError):
    """Missing, unreadable or empty video, or every decoder failed on it."""


class VideoTimeoutError(VideoLoadError):
    """A decoder did not answer within the time limit (some files make decoders hang)."""


class SampleTooLongError(ValueError):
    """The sample cannot fit the max length even after Automatic Degrade Sampling."""

    def __init__(self, message: str, text_tokens: int, min_visual_tokens: int | None, max_length: int):
        super().__init__(message)
        self.text_tokens = text_tokens
        self.min_visual_tokens = min_visual_tokens
        self.max_length = max_length
