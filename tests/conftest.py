"""Shared fixtures: repository paths and a cached model + modes of open adenylate kinase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deephemnma import model as model_mod
from deephemnma import nma as nma_mod
from deephemnma.simulate import SimulationSettings

REPO = Path(__file__).resolve().parents[1]
OPEN_PDB = REPO / "resources" / "adk_open.pdb"
CLOSED_PDB = REPO / "resources" / "adk_closed.pdb"


def simulate_as_relion(folder: Path, model: Path, modes: Path, *options) -> tuple:
    """Simulate particles in `folder` (`deephemnma simulate` with `options`, stacks under the
    folder) and return (optics, particles, truth): the STAR as RELION would hold it, without our
    `_dh*` columns, and the particle table with them."""
    import starfile

    from deephemnma.cli import main as cli

    args = ["simulate", "--model", model, "--modes", modes, *options]
    args += ["--out-star", folder / "sim.star", "--out-montage", folder / "montage.png"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert cli([str(a) for a in args]) == 0
    blocks = starfile.read(folder / "sim.star", always_dict=True)
    truth = blocks["particles"]
    parts = truth[[c for c in truth.columns if not c.startswith("dh")]].copy()
    return blocks["optics"].drop(columns="dhCtf"), parts, truth


def sim_config(**overrides) -> SimulationSettings:
    """The simulator's defaults, with overrides, for tests that call its functions directly."""
    return SimulationSettings(**overrides)


@pytest.fixture(scope="session")
def adk_atoms():
    """Heavy atoms of open AK, centred (ProDy AtomGroup)."""
    return model_mod.prepare_model(OPEN_PDB, "heavy", None)


@pytest.fixture(scope="session")
def adk_modes(adk_atoms):
    """(eigenvalues_all, eigenvalues, modes) of open AK heavy atoms, modes 7-9."""
    return nma_mod.compute_modes(adk_atoms, 3, 15.0, 1.0, 5000)


@pytest.fixture(scope="session")
def adk_model_files(tmp_path_factory, adk_atoms, adk_modes):
    """model.npz and modes.npz of open AK on disk."""
    d = tmp_path_factory.mktemp("adk")
    model_mod.save_model(adk_atoms, d / "model.npz", d / "model.pdb")
    evals_all, evals, modes = adk_modes
    np.savez(
        d / "modes.npz",
        coords=adk_atoms.getCoords(),
        modes=modes,
        mode_numbers=np.arange(7, 10),
        eigenvalues=evals,
        eigenvalues_all=evals_all,
        collectivity=nma_mod.collectivity(modes),
    )
    return d
