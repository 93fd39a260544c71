"""Triton backend (placeholder until the kernels land)."""


def is_available() -> bool:
    return False


def unavailable_reason() -> str:
    return "the Triton kernels are not written yet"
