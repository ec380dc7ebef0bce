"""kt-kernel backend placeholder (filled in below)."""


def kt_available():
    return False


class KTExperts:
    def __init__(self, *a, **k):
        raise ImportError("kt-kernel is not installed")
