"""A clock a test moves by hand, to stand in for `time.time` or `time.monotonic`."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
