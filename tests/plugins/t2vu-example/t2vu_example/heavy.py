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
    def __init__(self, options):
        self.options = options

    def __call__(self, video, prompt):
        return self.options.label
