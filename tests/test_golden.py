"""Golden digests: the decoded arrays of three caches, pinned, so a refactor that changes any stored byte fails.

The teacher is a fixed MLP whose weights come from numpy's seeded generator (not torch's initialisers, which
a model refactor could change); the caches are made through the CLI and read with plain zarr/h5py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from clitools import dump_args, kd, ok, read_plain

IMAGE_SIZE = 8
HIDDEN = 16
# cache -> array name -> sha256 of its C-order bytes
GOLDEN = {
    "full-f32.zarr": {
        "checksum": "d29bf31ed0877c8c7df82a18ef20e637b0a24fd7c1673d1cd7b4b0cda5cb68bb",
        "done": "4bf5122f344554c53bde2ebb8cd2b7e3d1600ad631c385a5d7cce23c7785459a",
        "labels": "bfbb941d8dc868fac16518dd89ffb47d03dc677d27f3fbec3e0324fb77bc9480",
        "values": "dbe2a80c5ebd6b28802a600f7be437fe8e8cf27cc935013fc0ab80ffcd3fdb96",
        "views": "935f28f547ae5355eabe9a25ba2f4ec8e1a29a5f950fa922a97504e77fd701e8",
    },
    "top3.h5": {
        "checksum": "befc308c0051568f72489092b002f5f2e41d7bb33fd8b2be57f7114e16aa97cf",
        "done": "4bf5122f344554c53bde2ebb8cd2b7e3d1600ad631c385a5d7cce23c7785459a",
        "indices": "8595182dcbf50dc17b7b8ed3e24c7fbcab087eff0501d8330df0592f6c824735",
        "labels": "bfbb941d8dc868fac16518dd89ffb47d03dc677d27f3fbec3e0324fb77bc9480",
        "tail": "9da946a9c787b5597f52608cb72c0adad8870a2ee6435eb1bfef361131e42367",
        "values": "d9fe1b2787579de684969e22c422271bf8ba41bf629467e31bc42f1c435e1e0c",
        "views": "935f28f547ae5355eabe9a25ba2f4ec8e1a29a5f950fa922a97504e77fd701e8",
    },
    "views-top3.zarr": {
        "checksum": "59fb9a2a6ddeaa3c3dd01c2b2d5ac07a3754d0cbb15c9856c5cff94f44be9002",
        "done": "dfea2964b5deedea7b1ef077de529c3959e6788bdbb3441e70c77a1ae875bb48",
        "indices": "1858202e55c2c6739d25a4b617164b775f2f142cf898b3cc299e4ad19a6c5696",
        "labels": "bfbb941d8dc868fac16518dd89ffb47d03dc677d27f3fbec3e0324fb77bc9480",
        "tail": "d973d269ddd7bd58f7f538afc7d8d939281c6a3db1dbf2d88e6a4362c31f1409",
        "values": "f77c490f469a83b6f24a19d45dcdd2e225a54989607b3426121afc2e1009a694",
        "views": "2392cafb6374dd260b89a1a6c3703ff5107cc64f587179caba3efacdabfcadd7",
    },
}
CASES = {
    "full-f32.zarr": ["--dtype", "float32"],
    "top3.h5": ["--topk", "3"],
    "views-top3.zarr": ["--topk", "3", "--views", "3", "--augment", "rrc(0.35,1)+flip", "--seed", "5",
                        "--chunk-rows", "256"],
}


@pytest.fixture(scope="module")
def fixed_teacher(tmp_path_factory) -> str:
    """A checkpoint of mlp(hidden=(16,)) for 10 classes at 8 px with weights drawn by numpy (seed 0)."""
    import torch

    rng = np.random.default_rng(0)
    shapes = {"net.1.weight": (HIDDEN, 3 * IMAGE_SIZE * IMAGE_SIZE), "net.1.bias": (HIDDEN,),
              "net.4.weight": (10, HIDDEN), "net.4.bias": (10,)}
    state = {k: torch.from_numpy(rng.normal(0, 0.3, s).astype(np.float32)) for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("golden") / "teacher.pt"
    torch.save({"model": state, "arch": "mlp", "arch_args": {"hidden": [HIDDEN]}}, path)
    return str(path)


def digests(path: str) -> dict[str, str]:
    arrays, _ = read_plain(path)
    return {k: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for k, a in sorted(arrays.items())}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_arrays(tmp_path, fixed_teacher, name):
    out = tmp_path / name
    ok(kd(*dump_args(fixed_teacher, out, *CASES[name], image_size=IMAGE_SIZE)))
    assert digests(str(out)) == GOLDEN[name]
