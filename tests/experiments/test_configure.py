"""Settings a recipe cannot use are refused by ``configure``, before any folder is written."""

from __future__ import annotations

import pytest

from sgdstab.errors import InputError
from sgdstab.experiments import configure, reproduce


@pytest.mark.parametrize(
    ("only", "override", "message"),
    [
        ("E2", "E2.lrs=[]", "E2.lrs is empty"),  # review row 32
        ("E3", "E3.widths=[]", "E3.widths is empty"),  # row 35
        ("E4", "E4.repeats=0", "E4.repeats must be >= 2"),  # row 33
        ("E4", "E4.repeats=1", "E4.repeats must be >= 2"),  # row 34
    ],
)
def test_unusable_settings_are_refused_before_any_work(tmp_path, only, override, message):
    with pytest.raises(InputError, match=message):
        configure("smoke", [only], overrides=[override])
    with pytest.raises(InputError, match=message):
        reproduce(tmp_path / "suite", "smoke", [only], overrides=[override])
    assert not (tmp_path / "suite").exists()


def test_usable_settings_pass() -> None:
    configs = configure("smoke", ["E2", "E4"], overrides=["E2.lrs=[0.05]", "E4.repeats=2"])
    assert configs["E2"].lrs == (0.05,) and configs["E4"].repeats == 2
