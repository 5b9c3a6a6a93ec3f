"""dcdit: Dynamic Chunking Diffusion Transformers (DC-DiT).

The package is importable without Typer: the CLI in :mod:`dcdit_cli.cli` only parses
arguments and delegates to the library, one subpackage per pipeline stage: ``config``,
``models``, ``diffusion``, ``data``, ``training``, ``sampling``, ``evaluation``, on top of
``common`` (docs/architecture.md).
"""

__version__ = "0.1.0"
