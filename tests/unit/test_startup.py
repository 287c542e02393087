"""Start-up checks (appliance.runtime.startup) without a process: images, and what a
failed start may remove again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.config import NamespaceConfig
from appliance.errors import StartupError
from appliance.runtime import startup

SIZE = 1 << 20


def ns(image: Path, **keys: object) -> NamespaceConfig:
    return NamespaceConfig(**{"image": str(image), "size": SIZE, "block_size": 512,
                              "read_only": False, "grow": False, **keys})


@pytest.mark.parametrize(("have", "keys", "error"), [
    (None, {}, None),  # created at start
    (SIZE, {}, None),
    (SIZE // 2, {"grow": True}, None),
    (SIZE // 2, {}, r"KEY.size: .* is 524288 bytes \(0.5 MiB\), size is 1048576 bytes \(1 MiB\) \(set"),
    (SIZE * 2, {"grow": True}, r"KEY.size: .*refusing to serve it cut"),
    (SIZE // 2, {"grow": True, "read_only": True}, r"KEY.grow: .*a read-only image is never grown"),
    (SIZE, {"read_only": True}, None),
])
def test_check_image(tmp_path: Path, have: int | None, keys: dict[str, object],
                     error: str | None) -> None:
    image = tmp_path / "a.img"
    if have is not None:
        with open(image, "wb") as f:
            f.truncate(have)
    if error is None:
        startup.check_image("KEY", ns(image, **keys))
    else:
        with pytest.raises(StartupError, match=error):
            startup.check_image("KEY", ns(image, **keys))
    assert (image.stat().st_size if image.exists() else None) == have  # looked at, not changed


def test_check_image_refuses_what_is_not_an_image_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(StartupError, match=r"^KEY.image: .*/d is a directory, not an image file$"):
        startup.check_image("KEY", ns(tmp_path / "d"))
    os.mkfifo(tmp_path / "p")
    with pytest.raises(StartupError, match=r"^KEY.image: .*/p is not a regular file$"):
        startup.check_image("KEY", ns(tmp_path / "p"))
    (tmp_path / "f").write_text("")
    with pytest.raises(StartupError, match=r"^KEY.image: parent .*/f is not a directory$"):
        startup.check_image("KEY", ns(tmp_path / "f" / "x" / "a.img"))


def test_only_untouched_new_images_are_removed_after_a_failed_start(tmp_path: Path) -> None:
    fresh, written, resized = tmp_path / "fresh.img", tmp_path / "written.img", tmp_path / "r.img"
    for image, size in ((fresh, SIZE), (written, SIZE), (resized, SIZE * 2)):
        with open(image, "wb") as f:
            f.truncate(size)
    with open(written, "r+b") as f:
        f.write(b"data")
        os.fsync(f.fileno())
    startup.remove_new_images([(str(fresh), SIZE), (str(written), SIZE), (str(resized), SIZE),
                               (str(tmp_path / "never.img"), SIZE)])
    assert not fresh.exists() and written.exists() and resized.exists()
