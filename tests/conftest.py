"""Shared fixtures: tiny checkpoints written once per session by the project's own tool."""

from __future__ import annotations

import pytest
import torch

from weights_tools.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """make_tiny(preset) -> directory of an official-format checkpoint, written once per preset per session."""
    made: dict[str, str] = {}

    def get(preset: str = "tiny") -> str:
        if preset not in made:
            out = tmp_path_factory.mktemp(preset)
            make_tiny(out, preset=preset, seed=0)
            made[preset] = str(out)
        return made[preset]

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_REPORTED: list[tuple[str, str]] = []


@pytest.fixture
def report(request):
    """report(what, value): a measured figure, printed in the summary at the end of the run."""
    return lambda what, value: _REPORTED.append((f"{request.node.name}: {what}", str(value)))


def pytest_terminal_summary(terminalreporter):
    if _REPORTED:
        terminalreporter.section("measured")
        for what, value in _REPORTED:
            terminalreporter.write_line(f"{what}: {value}")
