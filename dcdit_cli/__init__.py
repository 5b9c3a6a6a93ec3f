"""dcdit: Dynamic Chunking Diffusion Transformers (DC-DiT).

The package is importable without Typer: the CLI in :mod:`dcdit_cli.cli` only parses
arguments and delegates to the library modules (``recipe``, ``models``, ``diffusion``,
``train``, ``sample``, ``fid``, ...).
"""

__version__ = "0.1.0"
