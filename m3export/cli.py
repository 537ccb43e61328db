"""The `m3export` command line: parse arguments, load the spec, call library functions. No logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from m3export.errors import M3ExportError

app = typer.Typer(
    name="m3export",
    help="Compile MiniMax M3 from a YAML spec to ONNX / TensorRT, checking parity after every step.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
spec_app = typer.Typer(help="Validate, describe and create variant specs.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


@spec_app.command("validate")
def spec_validate(file: Annotated[Path, typer.Argument(help="YAML spec file")]) -> None:
    """Validate a spec: exit 0 when valid, 2 with a one-line error naming the field otherwise."""
    from m3export.spec import load_spec

    spec = load_spec(file)
    typer.echo(f"{file}: ok ({spec.name}, {spec.text.num_hidden_layers} layers, dtype {spec.dtype})")


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the spec's JSON Schema (point your editor's YAML language server at it)."""
    from m3export.spec import M3Spec

    typer.echo(json.dumps(M3Spec.model_json_schema(), indent=2))


@spec_app.command("from-hf")
def spec_from_hf(
    directory: Annotated[Path, typer.Argument(help="HF checkpoint directory with config.json")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the YAML here")] = None,
    name: Annotated[str | None, typer.Option(help="spec name (default: the directory name)")] = None,
) -> None:
    """Write a spec for an HF-format checkpoint directory (weights: {checkpoint: DIR})."""
    from m3export.spec import dump_spec, from_hf_config

    spec = from_hf_config(directory, name=name)
    text = yaml.safe_dump(dump_spec(spec), sort_keys=False, default_flow_style=None, width=110)
    if output is None:
        typer.echo(text, nl=False)
        return
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(output)
    typer.echo(f"wrote {output}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    try:
        app()
    except M3ExportError as err:
        _echo_err("error: " + " ".join(str(err).splitlines()))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _echo_err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
