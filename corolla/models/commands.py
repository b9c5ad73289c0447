"""Model commands for the CLI: `corolla convert-gguf FILE.gguf OUTDIR`."""

from __future__ import annotations


def cmd_convert_gguf(args) -> None:
    from corolla.errors import CorollaError
    from corolla.models.checkpoint import DTYPES
    from corolla.models.gguf import convert_gguf

    if args.dtype is not None and args.dtype not in DTYPES:
        raise CorollaError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    target = convert_gguf(args.gguf_file, args.output_dir, dtype=DTYPES[args.dtype] if args.dtype else None,
                          progress=not args.quiet)
    print(target)


def add_commands(subparsers) -> None:
    # No import of corolla.models.checkpoint here: it loads transformers, seconds on every start of the CLI.
    convert = subparsers.add_parser(
        "convert-gguf", help="convert a GGUF checkpoint once into a safetensors model directory",
        description="Dequantize a GGUF checkpoint (llama.cpp format) with transformers and save it, with its "
                    "tokenizer, as a Hugging Face-format directory that `corolla server` and clients load.")
    convert.add_argument("gguf_file", help="the .gguf file")
    convert.add_argument("output_dir", help="the model directory to write (replaced if it exists)")
    convert.add_argument("--dtype", default=None,
                         help="dtype of the saved weights: float32, float16 or bfloat16 (default: float32)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=cmd_convert_gguf)
