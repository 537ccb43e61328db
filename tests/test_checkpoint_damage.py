"""`build` on a damaged checkpoint (truncated shard, missing shard, shard path leaving the checkpoint
directory): one line, exit 2, before anything is exported; the previous build at OUT is untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from m3export.model.checkpoint import save_checkpoint
from m3export.model.text import M3ForCausalLM
from m3export.spec import M3Spec


@pytest.fixture(scope="module")
def model(tiny_text_spec: M3Spec) -> M3ForCausalLM:
    return M3ForCausalLM.from_config(tiny_text_spec)


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _truncate(d: Path) -> None:
    shard = _shards(d)[1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _drop_shard(d: Path) -> None:
    _shards(d)[-1].unlink()


def _escape(d: Path) -> None:
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = _shards(d)[0]
    (d.parent / "outside.safetensors").write_bytes(first.read_bytes())
    index["weight_map"] = {
        k: "../outside.safetensors" if v == first.name else v for k, v in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "words"),
    [(_truncate, "not fully covered"), (_drop_shard, "shard missing"), (_escape, "outside")],
)
def test_damaged_checkpoint_fails_the_build_in_one_line_and_keeps_out(
    damage: Any,
    words: str,
    tiny_build: Path,
    tiny_text_spec: M3Spec,
    model: M3ForCausalLM,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before anything is exported: exit 2, one line naming the problem, the previous build untouched."""
    import shutil

    from clihelp import run_cli

    from m3export.artifacts.io import sha256_file
    from m3export.spec import dump_spec

    ckpt = save_checkpoint(model, tiny_text_spec, tmp_path / "ckpt", max_shard_size="300KB")
    damage(ckpt)
    data = dump_spec(tiny_text_spec)
    data["weights"] = {"checkpoint": str(ckpt)}
    spec_file = tmp_path / "spec.yaml"  # JSON is YAML
    spec_file.write_text(json.dumps(data))
    out = shutil.copytree(tiny_build, tmp_path / "out")
    before = {p.relative_to(out): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    code, _, err = run_cli(["build", str(spec_file), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert "Traceback" not in err
    assert before == {p.relative_to(out): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.")]  # no staging or .failed left
