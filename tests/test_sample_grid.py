"""Sample grids a person can read: each row labelled with its prompt or class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.trainers.callbacks.samples import grid_image


def test_rows_are_labelled_on_the_left():
    images = torch.ones(6, 3, 8, 8)  # white tiles on a white canvas: only the labels are dark
    bare = np.asarray(grid_image(images, nrow=3))
    labelled = np.asarray(grid_image(images, nrow=3, labels=["red heart", "pizza"]))
    assert labelled.shape[0] == bare.shape[0] and labelled.shape[1] > bare.shape[1] + 30
    left = labelled[:, : labelled.shape[1] - bare.shape[1]]
    dark_rows = np.flatnonzero((left < 128).any(axis=(1, 2)))
    top, bottom = dark_rows.min(), dark_rows.max()
    assert top < bare.shape[0] / 2 < bottom  # text beside the first row and beside the second
    assert (labelled[:, left.shape[1]:] == bare).all()  # the images themselves unchanged
    with pytest.raises(ValueError, match="2 rows got 1 row labels"):
        grid_image(images, nrow=3, labels=["one"])
