"""Gated residuals against hand-written formulas and the reference packages' cells."""

from __future__ import annotations

import pytest
import torch

from memtx.layers.gating import NBRC, GatedResidual, Mogrifier


def test_nbrc_formula():
    cell = NBRC(3, 3)
    x, h = torch.randn(4, 3), torch.randn(4, 3)
    a = 1 + torch.tanh(cell.Ua(x) + cell.Wa(h))
    c = torch.sigmoid(cell.Uc(x) + cell.Wc(h))
    expected = c * h + (1 - c) * torch.tanh(cell.U(x) + a * h)
    assert torch.allclose(cell(x, h), expected)


def test_mogrifier_matches_the_mogrifier_package():
    mogrifier = pytest.importorskip("mogrifier")
    ours = Mogrifier(8, rank=2)
    theirs = mogrifier.Mogrifier(8, factorize_k=2)
    # theirs: Q = Sequential(Sequential(Linear, Linear), Sigmoid)
    for name in ("Q", "R"):
        getattr(theirs, name)[0].load_state_dict(getattr(ours, name).state_dict())
    x, h = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for a, b in zip(ours(x, h), theirs(x, h)):
        assert torch.allclose(a, b, atol=1e-6)


def test_gated_residual_uses_branch_as_input_and_residual_as_hidden():
    gate = GatedResidual(4, "gru")
    branch, residual = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = gate.cell(branch.reshape(-1, 4), residual.reshape(-1, 4)).reshape(2, 3, 4)
    assert torch.allclose(gate(branch, residual), expected)
    with pytest.raises(ValueError, match="unknown gating cell 'lstm'"):
        GatedResidual(4, "lstm")
