"""Bad input: one clear ClipadError line, never a traceback from deep inside torch."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from clipad.export.models.factory import build_detector
from clipad.export.prompts import resolve_class
from clipad.runtime.errors import ClipadError
from tiny_fixtures import TINY, write_aaclip_ckpt


def build(files, kind="aaclip", **kw):
    args = dict(arch=TINY, image_size=56, clip_weights=str(files["state_dict"]),
                ckpt=str(files[kind]) if kind in ("aaclip", "crane") else None,
                class_names=["bottle"] if kind != "crane" else None)
    args.update(kw)
    return build_detector(kind, **args)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_clip_weights(tiny_files):
    with pytest.raises(ClipadError) as e:
        build(tiny_files, clip_weights=None)
    assert "--clip-weights" in one_line(e) and "--random-init" in one_line(e)
    with pytest.raises(ClipadError, match="no such file"):
        build(tiny_files, clip_weights="/nonexistent/ViT-L-14-336px.pt")


def test_missing_checkpoint(tiny_files, tmp_path):
    with pytest.raises(ClipadError, match="--ckpt is required"):
        build(tiny_files, ckpt=None)
    with pytest.raises(ClipadError, match="not a directory"):
        build(tiny_files, ckpt=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipadError, match="no image_adapter"):
        build(tiny_files, ckpt=str(tmp_path / "empty"))
    with pytest.raises(ClipadError, match="no image_adapter_9.pth"):
        build(tiny_files, epoch=9)
    with pytest.raises(ClipadError, match="no such file"):
        build(tiny_files, kind="crane", ckpt=str(tmp_path / "epoch_5.pth"))


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
def test_corrupt_or_truncated_checkpoint(tiny_files, tmp_path, damage):
    folder = tmp_path / "ck"
    shutil.copytree(tiny_files["aaclip"], folder)
    target = folder / "image_adapter_7.pth"
    data = target.read_bytes()
    # Many different damaged byte patterns: torch.load fails with varying exception types on them.
    rng = __import__("numpy").random.default_rng(0)
    variants = {"truncated": [data[:n] for n in (10, 100, len(data) // 3, len(data) // 2, len(data) - 10)],
                "corrupt": [rng.integers(0, 256, 4096, dtype="uint8").tobytes() for _ in range(40)],
                "empty": [b""]}[damage]
    for blob in variants:
        target.write_bytes(blob)
        with pytest.raises(ClipadError) as e:
            build(tiny_files, ckpt=str(folder))
        assert "image_adapter_7.pth" in one_line(e)


def test_truncated_and_corrupt_base_weights(tiny_files, tmp_path):
    for name, data in (("cut.pt", tiny_files["state_dict"].read_bytes()[:5000]), ("junk.pt", b"\x00" * 100),
                       ("cut.safetensors", tiny_files["safetensors"].read_bytes()[:300])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ClipadError) as e:
            build(tiny_files, kind="clip", clip_weights=str(tmp_path / name))
        assert name in one_line(e)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED_MARKER",))


def test_code_executing_pickle_is_refused(tiny_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    shutil.copytree(tiny_files["aaclip"], folder)
    with open(folder / "text_adapter.pth", "wb") as fh:
        pickle.dump({"text_adapter": _Exploit()}, fh)
    torch.save({"epoch": 1, "state_dict": {"x": _Exploit()}}, tmp_path / "evil_weights.pt")
    with pytest.raises(ClipadError) as e:
        build(tiny_files, ckpt=str(folder))
    assert "refused" in one_line(e) or "not a torch checkpoint" in one_line(e)   # a bare pickle is not one
    with pytest.raises(ClipadError) as e:
        build(tiny_files, kind="clip", clip_weights=str(tmp_path / "evil_weights.pt"))
    assert "refused" in one_line(e)
    assert not (tmp_path / "EXPLOITED_MARKER").exists()


def test_adapter_shapes_that_do_not_fit(tiny_files, tmp_path):
    wrong = write_aaclip_ckpt(tmp_path / "wide", width=1024, text_width=768, embed=768)
    with pytest.raises(ClipadError) as e:
        build(tiny_files, ckpt=str(wrong))
    msg = one_line(e)
    assert "text_adapter.0.fc.0.weight" in msg and "[768, 768]" in msg and "[48, 48]" in msg


def test_crane_checkpoint_for_another_width(tiny_files):
    from conftest import CRANE_FIXTURES, need_shared

    real = need_shared(CRANE_FIXTURES / "trained_on_mvtec_crane_epoch_5.pth")
    with pytest.raises(ClipadError, match="width 768"):
        build(tiny_files, kind="crane", ckpt=str(real))


def test_base_weights_of_another_architecture(tiny_files, tmp_path):
    sd = dict(tiny_files["state"])
    sd["visual.proj"] = torch.zeros(64, 16)
    torch.save(sd, tmp_path / "bad_shape.pt")
    with pytest.raises(ClipadError) as e:
        build(tiny_files, kind="clip", clip_weights=str(tmp_path / "bad_shape.pt"))
    assert "'visual.proj'" in one_line(e) and "[64, 16]" in one_line(e) and "[64, 32]" in one_line(e)
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(ClipadError, match="missing key 'visual.proj'"):
        build(tiny_files, kind="clip", clip_weights=str(tmp_path / "missing.pt"))


def test_unknown_class_and_dataset():
    assert resolve_class("bottle", "MVTec") == ("dark bottle", "industrial")
    with pytest.raises(ClipadError, match="unknown class 'bottel' for dataset MVTec"):
        resolve_class("bottel", "MVTec")
    with pytest.raises(ClipadError, match="unknown dataset"):
        resolve_class("bottle", "MVTecc")
    assert resolve_class("blue ceramic tile") == ("blue ceramic tile", "industrial")  # literal names are allowed


def test_missing_class_name_and_mixed_domains(tiny_files):
    with pytest.raises(ClipadError, match="--class-name is required"):
        build(tiny_files, class_names=None)
    with pytest.raises(ClipadError, match="mix industrial and medical"):
        build(tiny_files, class_names=["bottle", "Brain"])
    with pytest.raises(ClipadError, match="at most one --class-name"):
        build(tiny_files, kind="crane", class_names=["a", "b"])


def test_bad_architecture_and_image_size(tiny_files):
    with pytest.raises(ClipadError, match="unknown architecture"):
        build(tiny_files, arch="ViT-Q-99")
    with pytest.raises(ClipadError, match="not a multiple of the patch size"):
        build(tiny_files, image_size=60)
