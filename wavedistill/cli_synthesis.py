"""CLI entries for synthesize, eval and bench."""


def register(sub) -> None:
    pass
