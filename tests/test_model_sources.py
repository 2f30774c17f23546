"""model.source: the built-in models, folders and Hub repo ids, and clear errors for names that are none of them."""

from __future__ import annotations

import pytest

from lens_tune.errors import ModelLoadError
from lens_tune.model.sources import locate_model


def test_built_in_models_resolve_to_pipeline_folders():
    for name in ("tiny", "toy", "lens-toy"):
        assert (locate_model(name) / "model_index.json").is_file(), name
    assert locate_model("toy") == locate_model("lens-toy") != locate_model("tiny")


def test_a_name_too_long_for_the_filesystem_is_a_clear_error_not_errno_36():
    with pytest.raises(ModelLoadError, match=r"model.source 'x{200}\.\.\. \(5000 characters\)' does not exist"):
        locate_model("x" * 5000)
    with pytest.raises(ModelLoadError, match=r"neither a local folder nor a valid Hub repo id.*at most 96 characters"):
        locate_model("owner/" + "x" * 5000)


def test_an_impossible_repo_id_is_refused_without_the_network(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model.source '-a/b-' is neither a local folder nor a valid Hub repo id"):
        locate_model("-a/b-")
    with pytest.raises(ModelLoadError, match="is not a Lens pipeline folder"):
        locate_model(str(tmp_path))
