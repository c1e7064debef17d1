"""Implementations: imported only when a run builds them."""


class Backbone:
    def __init__(self, options):
        self.options = options


class Eraser:
    def __init__(self, options):
        self.options = options


class L1Loss:
    def __init__(self, options):
        self.options = options


class Judge:
    """Judges a video [F, 3, H, W] in [0, 1] 'bright' or 'dark' by its mean value."""

    attribute = "brightness"
    labels = ("bright", "dark")

    def __init__(self, options):
        self.options = options

    def __call__(self, video):
        return "bright" if float(video.mean()) > self.options.threshold else "dark"
