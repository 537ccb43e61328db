"""The `m3export` command line: parse arguments, load the spec, call library functions. No logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

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
model_app = typer.Typer(help="Run the eager PyTorch model a spec describes.", no_args_is_help=True)
app.add_typer(model_app, name="model")


# Options shared by `run` and `generate`.
BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="ort: the ONNX subgraphs; torch: the eager stage wrappers; trt: the TensorRT engines (GPU)",
    ),
]
ImageOption = Annotated[
    list[Path] | None,
    typer.Option("--image", metavar="FILE", help="image file; repeat for several, in prompt order"),
]
KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        metavar="FILE",
        help="HMAC key file: also require the build's manifest.sig to match (a build signed with --sign-key)",
    ),
]
VideoOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--video",
        metavar="DIR",
        help="a video as a directory of sampled frame images (file-name order); write the video token id "
        "(multimodal.video_token_index) once per --video; repeat for several, in prompt order",
    ),
]


def _echo_logits(result: Any, what: str) -> None:
    """The one-prompt summary of `model forward` and `run`: logits shape, last top-1, saved file."""
    typer.echo(
        f"logits {list(result.logits.shape)} ({what}); top-1 token at the last position: {result.top1_last}"
    )
    if result.logits_path is not None:
        typer.echo(f"wrote {result.logits_path}")


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


@spec_app.command("validate")
def spec_validate(file: Annotated[Path, typer.Argument(help="YAML spec file")]) -> None:
    """Validate a spec: exit 0 when valid, 2 with a one-line error naming the field otherwise."""
    from m3export.spec import load_spec

    spec = load_spec(file)
    typer.echo(
        f"{file}: ok ({spec.name}, {spec.text.num_hidden_layers} layers, weights {spec.dtype}, graphs {spec.graph_dtype})"
    )


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
    from m3export.runtime.outputs import write_spec_file
    from m3export.spec import from_hf_config
    from m3export.spec.load import spec_yaml

    spec = from_hf_config(directory, name=name)
    if output is None:
        typer.echo(spec_yaml(spec), nl=False)
        return
    typer.echo(f"wrote {write_spec_file(spec, output)}")


@model_app.command("forward")
def model_forward(
    spec_file: Annotated[Path, typer.Argument(help="YAML spec file")],
    input_ids: Annotated[
        str,
        typer.Option(
            "--input-ids",
            help="comma-separated token ids, e.g. '1,2,3'. Write the image token id "
            "(multimodal.image_token_index) once per --image, where the image goes; it is expanded "
            "to the image's feature tokens.",
        ),
    ],
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image", metavar="FILE", help="image file (PNG, JPEG, ...); repeat for several, in prompt order"
        ),
    ] = None,
    logits_out: Annotated[
        Path | None,
        typer.Option(
            "--logits-out", metavar="FILE.npy", help="write the logits [1, S, V] float32 to this .npy file"
        ),
    ] = None,
    video: VideoOption = None,
) -> None:
    """Run the eager model on one prompt; print the logits shape and the last position's top-1 token.

    Weights are the spec's (random seed or checkpoint). Each --image expands one image token id in --input-ids.
    """
    from m3export.runtime.forward import run_forward
    from m3export.spec import load_spec

    result = run_forward(load_spec(spec_file), input_ids, image or [], logits_out, video or [])
    _echo_logits(result, f"{result.num_images} image(s)")


@app.command("build")
def build_cmd(
    spec_file: Annotated[Path, typer.Argument(help="YAML spec file")],
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="artifact directory (default: artifacts/<spec.name>)"),
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            metavar="NAMES",
            help="comma-separated subgraphs to export (e.g. text_0,text_1); the chained steps a and c "
            "then run only if every subgraph is named",
        ),
    ] = None,
    sign_key: Annotated[
        Path | None,
        typer.Option("--sign-key", metavar="FILE", help="HMAC key file: sign the manifest (manifest.sig)"),
    ] = None,
) -> None:
    """Split, export to ONNX and gate on parity (split, onnx, end_to_end, decode); publish to --out.

    Exit 0 when every parity check passed, 1 on a parity failure (the build goes to <out>.failed and
    <out> is left intact), 2 on a user error.
    """
    from m3export.artifacts.seal import read_key
    from m3export.build.driver import build
    from m3export.parity.report import parity_rows
    from m3export.spec import load_spec

    spec = load_spec(spec_file)
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    key = read_key(sign_key) if sign_key is not None else None
    result = build(spec, out or Path("artifacts") / spec.name, names, progress=typer.echo, sign_key=key)
    if result.up_to_date:
        typer.echo(f"build {spec.name}: up to date ({result.seconds:.1f} s) -> {result.out_dir}")
        return
    header = ("subgraph", "step", "case", "output", "max_abs", "cosine", "top1", "result")
    rows = [header, *parity_rows(result.reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    if result.passed:
        typer.echo(f"build {spec.name}: pass ({result.seconds:.1f} s) -> {result.out_dir}")
        return
    for rep in result.reports:
        if rep.localisation is not None:
            _echo_err(f"{rep.subject} {rep.case}: {rep.localisation['summary']}")
    _echo_err(
        f"build {spec.name}: parity FAILED in {', '.join(result.failed_subjects())} "
        f"({result.seconds:.1f} s) -> {result.out_dir}"
    )
    raise typer.Exit(1)


@app.command("plan")
def plan_cmd(
    spec_file: Annotated[Path, typer.Argument(help="YAML spec file")],
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object instead of the table")
    ] = False,
) -> None:
    """What a build of SPEC holds and needs, without reading any weights: per subgraph its layers,
    parameters, weight bytes at the spec dtype, disk and build memory; the total parameter count, the
    artifact directory's size and the build's peak memory. Exit 0."""
    from m3export.build.plan_report import format_figures, plan_figures
    from m3export.spec import load_spec

    figures = plan_figures(load_spec(spec_file))
    if as_json:
        typer.echo(json.dumps(figures.to_json(), indent=2))
        return
    for line in format_figures(figures):
        typer.echo(line)


@app.command("run")
def run_cmd(
    artifacts: Annotated[Path, typer.Argument(help="artifact directory written by `m3export build`")],
    input_ids: Annotated[
        str,
        typer.Option(
            "--input-ids",
            help="comma-separated token ids, e.g. '1,2,3'; write the image token id once per --image "
            "(expanded to the image's feature tokens, as in `model forward`)",
        ),
    ],
    backend: BackendOption = "ort",
    image: ImageOption = None,
    logits_out: Annotated[
        Path | None,
        typer.Option("--logits-out", metavar="FILE.npy", help="write the logits [1, S, V] float32 here"),
    ] = None,
    video: VideoOption = None,
    key: KeyOption = None,
) -> None:
    """Run one prompt through the chained subgraphs of a build; print the logits shape and last top-1.

    Exit 3 when the artifact directory is missing or unreadable, 2 on a user error.
    """
    from m3export.artifacts.seal import read_key
    from m3export.runtime.run import run_artifacts

    secret = read_key(key) if key is not None else None
    result = run_artifacts(artifacts, backend, input_ids, image or [], logits_out, video or [], secret)
    _echo_logits(result, f"{result.num_images} image(s), backend {result.backend}")


@app.command("check")
def check_cmd(
    artifacts: Annotated[Path, typer.Argument(help="artifact directory written by `m3export build`")],
    backend: Annotated[
        str, typer.Option("--backend", help="ort: ONNX Runtime (CPU); trt: TensorRT (needs the trt extra)")
    ] = "ort",
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            metavar="FILE",
            help="write a JSON report to FILE and, beside it, JUnit XML (.xml), Markdown (.md), a plot (.png)",
        ),
    ] = None,
    key: KeyOption = None,
) -> None:
    """Verify an artifact directory (manifest seal, sha256 of every file, paths), then re-run its goldens.

    Exit 0 pass, 1 parity failure, 2 usage error, 3 integrity failure (nothing is run then).
    """
    from m3export.artifacts.seal import read_key
    from m3export.parity.report import format_table
    from m3export.runtime.check import check_artifacts

    secret = read_key(key) if key is not None else None
    result = check_artifacts(artifacts, backend, report, progress=typer.echo, key=secret)
    for line in format_table(result.to_json()):
        typer.echo(line)
    for path in result.report_files:
        typer.echo(f"wrote {path}")
    for skipped in result.skipped:
        typer.echo(f"not re-run: {skipped}")
    if result.passed:
        typer.echo(f"check {artifacts}: pass ({len(result.entries)} comparisons, {result.seconds:.1f} s)")
        return
    _echo_err(f"check {artifacts}: parity FAILED: {result.failures()[0]} ({len(result.failures())} failing)")
    raise typer.Exit(result.exit_code)


@app.command("generate")
def generate_cmd(
    artifacts: Annotated[Path, typer.Argument(help="artifact directory written by `m3export build`")],
    input_ids: Annotated[
        str,
        typer.Option(
            "--input-ids",
            help="comma-separated prompt token ids; write the image token id once per --image (as in `run`)",
        ),
    ],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="stop after this many tokens")] = 32,
    backend: BackendOption = "ort",
    image: ImageOption = None,
    video: VideoOption = None,
    mtp: Annotated[
        bool,
        typer.Option(
            "--mtp", help="speculative decoding with the MTP subgraph (same tokens, fewer forwards)"
        ),
    ] = False,
    key: KeyOption = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            "--prefill-chunk",
            help="prefill a text prompt in calls of at most this many tokens through the cache "
            "(memory follows the chunk, not the prompt); default: one call",
        ),
    ] = None,
) -> None:
    """Greedy decoding with the KV cache, streaming token ids as they are produced (one per line).

    Stops at the spec's EOS token, --max-new-tokens, or the spec's maximum length. Exit 3 when the
    artifact directory is missing or unreadable, 2 on a user error.
    """
    from m3export.artifacts.seal import read_key
    from m3export.runtime.generate import generate_artifacts

    def show(tok: int) -> None:
        typer.echo(tok)

    result = generate_artifacts(
        artifacts,
        backend,
        input_ids,
        image or [],
        max_new_tokens,
        mtp=mtp,
        on_token=show,
        videos=video or [],
        key=read_key(key) if key is not None else None,
        prefill_chunk=prefill_chunk,
    )
    rate = result.decode_tokens_per_second
    stats = (
        f"{len(result.tokens)} tokens ({result.stop_reason}) in {result.seconds:.2f} s, backend {result.backend}, "
        f"{result.main_forwards} main forwards ({result.tokens_per_forward:.2f} tokens/forward); "
        f"prefill of {result.prompt_len} tokens {result.prefill_seconds:.2f} s, decode "
        + (f"{rate:.1f} tokens/s" if rate is not None else "-")
    )
    if result.acceptance_rate is not None:
        stats += f"; MTP acceptance {result.accepted}/{result.drafted} = {result.acceptance_rate:.2f}"
    _echo_err(stats)


class StdoutFailed(BaseException):
    """Writing to standard output failed (a closed pipe, a full disk): stop the command. A
    BaseException, so that no library `except Exception` swallows it."""

    def __init__(self, err: OSError) -> None:
        super().__init__(err)
        self.err = err


class _GuardedStream:
    """sys.stdout whose write / flush errors become StdoutFailed (raised out of any library code)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except OSError as err:
            raise StdoutFailed(err) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            raise StdoutFailed(err) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit code."""
    import errno
    import logging
    import warnings

    import typer._click.exceptions as click_exc
    import typer.exceptions as typer_exc

    # Library warnings (Pillow, torch's exporter) are not the user's business on a successful run:
    # torch.onnx logs one "torchvision is not installed" line per op per export at WARNING.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|onnxscript|PIL)\b")
    real_stdout = sys.stdout
    sys.stdout = _GuardedStream(real_stdout)  # type: ignore[assignment]
    code = 0
    try:
        result = app(standalone_mode=False, prog_name="m3export")
        code = result if isinstance(result, int) else 0
        sys.stdout.flush()
    except click_exc.NoArgsIsHelpError as err:  # `m3export` / `m3export spec` alone: the help
        if err.ctx is not None:
            typer.echo(err.ctx.get_help())
        code = 2
    except click_exc.UsageError as err:
        cmd = err.ctx.command_path if err.ctx is not None else "m3export"
        _echo_err(f"error: {cmd}: {' '.join(err.format_message().split())} (see `{cmd} --help`)")
        code = 2
    except typer_exc.Exit as err:
        code = err.exit_code
    except typer_exc.Abort:
        _echo_err("interrupted")
        code = 130
    except M3ExportError as err:
        _echo_err("error: " + " ".join(str(err).splitlines()))
        code = err.exit_code
    except StdoutFailed as failed:
        _silence_stdout()
        if failed.err.errno == errno.EPIPE:  # the reader went away (`| head`): stop, as SIGPIPE would
            code = 141
        else:
            _echo_err(f"error: cannot write to standard output: {failed.err.strerror}")
            code = 2
    except KeyboardInterrupt:
        _echo_err("interrupted")
        code = 130
    finally:
        sys.stdout = real_stdout
    sys.exit(code)


if __name__ == "__main__":
    main()
