import numpy as np
import pytest

from deephemnma import hemnma
from deephemnma import model as model_mod
from deephemnma import nma as nma_mod
from deephemnma.fit import fit_to_map, refined_modes
from deephemnma.flexible import FlexibleModel
from deephemnma.fsc import model_map

from .conftest import CLOSED_PDB

BOX, PX, SIGMA = 32, 4.4, 3.0


COARSE = 500  # modes on the CA atoms, extended to all: fast enough to recompute per round


@pytest.fixture(scope="module")
def open_closed(adk_atoms):
    """Open AK (3 modes) and closed AK superposed on it, as references."""
    refs = []
    for ag in (adk_atoms, model_mod.prepare_model(CLOSED_PDB, "heavy", None)):
        _, evals, modes = nma_mod.compute_modes(ag, 3, 15.0, 1.0, COARSE)
        weights = model_mod.scattering_weights(ag.getElements())
        refs.append(
            FlexibleModel(
                ag.getCoords(), modes, weights, np.arange(7, 10), evals, model_mod.atom_labels(ag)
            )
        )
    return refs[0], hemnma.superpose(refs[1], refs[0])


def rmsd(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1).mean()))


def test_refined_modes_at_the_model_match_its_own(open_closed):
    """Recomputed at the undeformed model, the modes are those of nma.compute_modes."""
    ref = open_closed[0]
    evals, modes = refined_modes(ref.coords, ref.atom_ids, 3, 15.0, 1.0, COARSE)
    a, b = modes.reshape(3, -1), ref.modes.reshape(3, -1)
    np.testing.assert_allclose(a * np.sign((a * b).sum(1))[:, None], b, atol=1e-6)  # up to sign
    np.testing.assert_allclose(evals, ref.eigenvalues, rtol=1e-6)


def test_fit_moves_the_open_model_to_the_closed_map(open_closed):
    """A reference update's core: fitted into a map of the closed form, the open model's RMSD to
    the closed structure falls from 7.0 Å to about its best fit on the modes (3.7 Å with 3)."""
    op, cl = open_closed
    start = rmsd(op.coords, cl.coords)
    fitted, cc = fit_to_map(
        op, model_map(cl.coords, cl.weights, BOX, PX, SIGMA), PX, SIGMA, 2, coarse_above=COARSE
    )
    end = rmsd(fitted.coords, cl.coords)
    print(f"RMSD to closed {start:.2f} -> {end:.2f} Å, correlation per round {np.round(cc, 4)}")
    assert start > 6.5 and end < 4.5 and cc[-1] > 0.93
    # fitted into its own map, the model stays where it is
    same, _ = fit_to_map(
        op, model_map(op.coords, op.weights, BOX, PX, SIGMA), PX, SIGMA, 1, coarse_above=COARSE
    )
    assert rmsd(same.coords, op.coords) < 0.3
