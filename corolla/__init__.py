"""Corolla: run and fine-tune large language models together, BitTorrent-style."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("corolla")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def __getattr__(name: str):
    # Lazy so that `import corolla` (e.g. for the CLI's --help) stays cheap: torch loads only when needed.
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from corolla.client import model

        return getattr(model, name)
    raise AttributeError(name)


__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "__version__"]
