"""The `peftc` command line.

    peftc show MODEL [--targets PATTERN]
    peftc apply MODEL --passes "freeze, dce" [--out DIR]
    peftc demo [--steps 150] [--data DIR] [--out DIR] [--pipeline TEXT]
    peftc export MODEL --passes "nf4, ..." --onnx OUT.onnx [--dtype float16] [--quant int4]
                 [--adapters]
    peftc plan MODEL --passes "nf4, side" [--batch 8] [--seq 256]
    peftc serve MODEL --adapters NAME=DIR ... [--passes nf4] [--port 8000]
    peftc passes [--markdown]

MODEL is a built-in name (`tiny-llama`, `tiny-gpt2`, `tiny-bert`, `minilm`, ...), a local
Hugging Face model folder, or `package.module:factory`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from peftc._io import atomic_write
from peftc.errors import PeftcError
from peftc.ir.capture import capture, export_program
from peftc.ir.graph import peftc_meta
from peftc.ir.pipeline import Pipeline, apply
from peftc.ir.registry import PassInfo, registered_passes
from peftc.technique.checkpoint import load_adapter
from peftc.technique.options import option_rows
from peftc.technique.registry import techniques
from peftc.tools.inspect import diff, save_graph, show, summary
from peftc.tools.models import BUILTIN_MODELS, LoadedModel, load_model
from peftc.tools.plan import plan

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as e:
        print(f"peftc: interrupted {e}".rstrip(), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`peftc passes | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if args.debug:
            raise
        print(f"peftc: error: {_message(e)}", file=sys.stderr)
        return 2


def _message(e: Exception) -> str:
    """One message for any failure; a traceback only with --debug."""
    if isinstance(e, PeftcError):
        return str(e)
    if isinstance(e, OSError):  # a path that cannot be read or written: say which
        where = f" {e.filename}" if e.filename else ""
        return f"cannot use{where}: {e.strerror or e}; check the path"
    return f"{type(e).__name__}: {e} (an unexpected failure: rerun with --debug for the traceback)"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftc", description="Capture, rewrite and inspect models for PEFT."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    model_help = (
        f"built-in ({', '.join(BUILTIN_MODELS)}), a Hugging Face model folder, or "
        "package.module:factory (from the current folder only with --trust-local-code; the factory "
        "returns a model, "
        "(model, args) or (model, args, kwargs), args being example inputs)"
    )
    _add_demo(sub)
    _add_show(sub, model_help)
    _add_apply(sub, model_help)
    _add_export(sub, model_help)
    _add_plan(sub, model_help)
    _add_serve(sub, model_help)
    _add_passes(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of a failure")
        if any(a.dest == "model" for a in command._actions):
            command.add_argument(
                "--trust-local-code",
                action="store_true",
                help="let a package.module:factory model be imported from the current folder "
                "(importing runs its code)",
            )
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole job on real MiniLM + SST-2: quantize, adapt, train, merge, "
        "export, serve in ONNX Runtime, report",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("peftc-demo"), help="output folder (default: peftc-demo)"
    )
    demo.add_argument(
        "--data",
        help="GLUE SST-2 folder (train.tsv, dev.tsv), or 'generated'; default: "
        "$PEFTC_SST2, ../shared/data/sst2, else a generated task",
    )
    demo.add_argument(
        "--pipeline",
        default=None,
        help="the pass pipeline (default: nf4, freeze, lora on query/value)",
    )
    demo.add_argument("--steps", type=_positive, default=150, help="training steps (default 150)")
    demo.add_argument(
        "--batch-size", type=_positive, default=32, help="sentences per training step (default 32)"
    )
    demo.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    demo.add_argument(
        "--dev-size",
        type=_positive,
        default=None,
        help="evaluate on the first N dev sentences only",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the head, adapters and data order (default 0)"
    )
    demo.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        nargs="?",
        const="on",
        default="auto",
        help="train through torch.compile (peftc.compile): on 2 CPU cores 3-10%% faster a step "
        "after a compile of 5-20 s, so 'auto' (the default) compiles after timing a step, when "
        "the steps left repay it (docs/performance.md); --compile alone means on",
    )
    demo.set_defaults(run=_demo)


def _add_show(sub: argparse._SubParsersAction, model_help: str) -> None:
    show = sub.add_parser("show", help="capture a model and print its graph")
    show.add_argument("model", help=model_help)
    show.add_argument("--targets", help="only nodes under module paths matching this pattern")
    show.add_argument("--max-rows", type=int, default=None, help="print at most this many nodes")
    show.add_argument(
        "--all", action="store_true", help="also the bookkeeping nodes (shape asserts, sizes)"
    )
    show.set_defaults(run=_show)


def _add_apply(sub: argparse._SubParsersAction, model_help: str) -> None:
    apply = sub.add_parser(
        "apply", help="capture a model, run a pass pipeline, report (and save) the result"
    )
    apply.add_argument("model", help=model_help)
    apply.add_argument("--passes", required=True, help='pipeline text, e.g. "freeze, dce"')
    apply.add_argument(
        "--out",
        type=Path,
        help="write report.txt, graph.dot, graph.svg, program.pt2 and trainable.safetensors here",
    )
    apply.add_argument(
        "--check-numerics",
        action="store_true",
        help="compare outputs around passes that preserve them",
    )
    apply.add_argument(
        "--no-verify", action="store_true", help="skip lint and shape propagation after each pass"
    )
    apply.set_defaults(run=_apply)


def _add_export(sub: argparse._SubParsersAction, model_help: str) -> None:
    export = sub.add_parser("export", help="capture a model, run a pipeline and export it to ONNX")
    export.add_argument("model", help=model_help)
    export.add_argument(
        "--passes",
        default="",
        help='pipeline text, e.g. "nf4, freeze, lora(r=8), merge(dtype="float32")"',
    )
    export.add_argument("--onnx", type=Path, help="the .onnx file to write")
    export.add_argument(
        "--transformers",
        type=Path,
        metavar="DIR",
        help="write the merged model as a transformers folder (AutoModel*.from_pretrained loads "
        "it; dense weights, the tokenizer beside them)",
    )
    export.add_argument(
        "--keep-nf4",
        action="store_true",
        help="with --transformers: NF4 weights stay 4-bit, as a bitsandbytes checkpoint "
        "(from_pretrained loads it 4-bit; the merge requantizes them)",
    )
    export.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    export.add_argument(
        "--quant",
        choices=["nf4", "int4", "int8", "int4_int8", "float"],
        default=None,
        help="NF4 weights (from an nf4 pass) as MatMulBnb4 (nf4, the default) or requantized to "
        "MatMulNBits (int4); or every linear but the heads int8, activations quantized at run "
        "time (int8), or 4-bit in the file and expanded to int8 at load, run by the int8 kernels "
        "(int4_int8); or NF4 weights decoded to float (float)",
    )
    export.add_argument(
        "--attention",
        choices=["fused", "standard"],
        default="fused",
        help="attention as ONNX Runtime's fused MultiHeadAttention (fused, the default) or as "
        "ONNX's own ops, for runtimes without Microsoft's contrib ops (standard)",
    )
    export.add_argument(
        "--merged", action="store_true", help="fail if an unmerged adapter branch is left"
    )
    export.add_argument(
        "--adapters",
        action="store_true",
        help="export the base with a LoRA slot and one ONNX Runtime adapter file per adapter",
    )
    export.set_defaults(run=_export)


def _add_plan(sub: argparse._SubParsersAction, model_help: str) -> None:
    plan = sub.add_parser(
        "plan", help="capture a model, run a pipeline and size one training step's memory"
    )
    plan.add_argument("model", help=model_help)
    plan.add_argument(
        "--passes", default="", help='pipeline text, e.g. "nf4, side" or "nf4, freeze, lora(r=8)"'
    )
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--seq", type=int, default=512)
    plan.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd", "momentum"])
    plan.add_argument(
        "--dtype",
        help="check that the model computes in this dtype, e.g. bfloat16 (capture it in the "
        "dtype it trains in)",
    )
    plan.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="per-rank figures for N ranks of FSDP2 as peftc.distributed.shard wraps the graph "
        "(blocks sharded; --batch is per rank)",
    )
    plan.set_defaults(run=_plan)


def _add_serve(sub: argparse._SubParsersAction, model_help: str) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve many adapters over one causal LM: OpenAI's /v1/completions and "
        "/v1/chat/completions, continuously batched",
    )
    serve.add_argument("model", help=model_help)
    serve.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        metavar="[NAME=]DIR",
        help="peft or peftc adapter folders; the name is the folder's unless given as NAME=DIR",
    )
    serve.add_argument("--passes", default="", help='base pipeline before the adapters, e.g. "nf4"')
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--max-batch", type=int, default=32, help="requests in flight together (default 32)"
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("PEFTC_API_KEY"),
        help="require Authorization: Bearer KEY (default: $PEFTC_API_KEY; none: no key)",
    )
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name answered besides localhost (repeatable; '*' answers any)",
    )
    serve.add_argument(
        "--tokenizer", help="a folder with the tokenizer, where the model's folder has none"
    )
    serve.add_argument("--chat-template", help="a Jinja chat template file (else the tokenizer's)")
    serve.add_argument(
        "--allow-adapter-loading",
        action="store_true",
        help="answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    serve.set_defaults(run=_serve)


def _add_passes(sub: argparse._SubParsersAction) -> None:
    passes = sub.add_parser("passes", help="list the registered passes with their options")
    passes.add_argument(
        "--markdown", action="store_true", help="print the pass reference as Markdown"
    )
    passes.set_defaults(run=_passes)


def _show(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, trust_local_code=args.trust_local_code)
    gm = capture(loaded.model, loaded.args, loaded.kwargs)
    print(show(gm, args.targets, max_rows=args.max_rows, bookkeeping=args.all))
    return 0


def _apply(args: argparse.Namespace) -> int:
    if not args.passes.strip():
        raise PeftcError(
            '--passes is empty; give a pipeline, e.g. --passes "freeze, lora(r=8)" (peftc passes '
            "lists them)"
        )
    loaded = load_model(args.model, trust_local_code=args.trust_local_code)
    gm = capture(loaded.model, loaded.args, loaded.kwargs)
    result = Pipeline.parse(args.passes).run(
        gm, verify=not args.no_verify, check_numerics=args.check_numerics
    )
    rewritten = result.graph_module
    report = "\n\n".join(
        [
            f"model: {loaded.name}\npipeline: {args.passes}",
            str(result),
            str(diff(gm, rewritten)),
            str(summary(rewritten)),
        ]
    )
    print(report)
    if args.out:
        _save(rewritten, args.out, report)
        print(f"\nwrote {args.out}/")
    return 0


def _captured(args: argparse.Namespace) -> tuple[LoadedModel, torch.fx.GraphModule]:
    """The model `args.model`, captured and rewritten by `args.passes` (none when empty)."""
    loaded = load_model(args.model, trust_local_code=args.trust_local_code)
    gm = capture(loaded.model, loaded.args, loaded.kwargs)
    return loaded, apply(gm, args.passes) if args.passes.strip() else gm


def _plan(args: argparse.Namespace) -> int:
    loaded, gm = _captured(args)
    print(f"model: {loaded.name}\npipeline: {args.passes or '(none)'}")
    print(
        plan(
            gm,
            batch=args.batch,
            seq=args.seq,
            optimizer=args.optimizer,
            dtype=args.dtype,
            world_size=args.world_size,
        )
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from peftc.tools.engine import check_generates
    from peftc.tools.models import load_tokenizer
    from peftc.tools.server import ServerSettings, serve

    loaded, gm = _captured(args)
    check_generates(gm)
    for spec in args.adapters:
        name, _, folder = spec.rpartition("=")
        # multi_lora verifies
        gm = load_adapter(gm, folder, adapter=name or Path(folder).name, verify=False)
    gm = apply(gm, "multi_lora")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else loaded.tokenizer
    settings = ServerSettings(
        base_name=loaded.name,
        api_key=args.api_key,
        allowed_hosts=(*ServerSettings.allowed_hosts, *args.allow_host),
        allow_adapter_loading=args.allow_adapter_loading,
        chat_template=Path(args.chat_template).read_text() if args.chat_template else None,
    )
    names = peftc_meta(gm)["multi_lora"]["adapters"]
    print(
        f"serving {loaded.name} with adapters {', '.join(names)} at "
        f"http://{args.host}:{args.port}/v1 ({'API key required' if args.api_key else 'no key'})",
        flush=True,
    )
    serve(
        gm,
        tokenizer=tokenizer,
        settings=settings,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from peftc.tools.demo import PIPELINE, run_demo

    out = Path(args.out)
    created = not out.exists()
    try:
        run_demo(
            out,
            data=args.data,
            pipeline=args.pipeline or PIPELINE,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            dev_size=args.dev_size,
            seed=args.seed,
            compile=args.compile,
        )
    except KeyboardInterrupt:  # an empty folder of ours is no result to leave behind
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return 0


def _export(args: argparse.Namespace) -> int:
    from peftc.backends import onnx as peftc_onnx

    if not args.onnx and not args.transformers:
        raise PeftcError("export needs --onnx FILE, --transformers DIR, or both")
    if args.keep_nf4 and not args.transformers:
        raise PeftcError("--keep-nf4 writes the transformers folder 4-bit: give --transformers DIR")
    loaded, gm = _captured(args)
    if args.transformers:
        from peftc.tools.merged import save_merged

        save_merged(gm, args.transformers, tokenizer=loaded.tokenizer, nf4=args.keep_nf4)
        kind = "NF4 as bitsandbytes 4-bit" if args.keep_nf4 else "dense"
        print(f"wrote {args.transformers} (transformers, merged, {kind})")
    if not args.onnx:
        return 0
    if args.quant in ("nf4", "int4") and not any(
        n.target == torch.ops.peftc.nf4_linear.default for n in gm.graph.nodes
    ):
        raise PeftcError(
            f"--quant {args.quant} chooses how NF4 weights are written, and this pipeline "
            "quantizes none; "
            'add nf4 to --passes (e.g. --passes "nf4") or drop --quant'
        )
    quant = args.quant or "nf4"
    if args.adapters:
        print(peftc_onnx.export_adapters(gm, args.onnx, quant=quant))
    else:
        exported = peftc_onnx.export(
            gm,
            args.onnx,
            dtype=args.dtype,
            quant=quant,
            merged=args.merged,
            attention=args.attention,
        )
        print(exported)
    return 0


def _save(gm: torch.fx.GraphModule, out: Path, report: str) -> None:
    from safetensors.torch import save

    atomic_write(out / "report.txt", report + "\n")
    blocks = "*.layers.*|*.layer.*|*.h.*|*.block.*"
    save_graph(gm, out / "graph.dot", collapse=blocks)
    save_graph(
        gm, out / "graph.svg", collapse=blocks, title="the rewritten model (blocks collapsed)"
    )
    if peftc_meta(gm).get("example_inputs"):
        buffer = io.BytesIO()
        torch.export.save(export_program(gm), buffer)
        atomic_write(out / "program.pt2", buffer.getvalue())
    trainable = {
        name: p.detach().contiguous() for name, p in gm.named_parameters() if p.requires_grad
    }
    if trainable:
        atomic_write(out / "trainable.safetensors", save(trainable))


def _passes(args: argparse.Namespace) -> int:
    passes = registered_passes()
    if args.markdown:
        print(pass_reference_markdown(passes))
        return 0
    for info in passes.values():
        options = ", ".join(f"{f.name}={f.default!r}" for f in _fields(info))
        print(f"{info.name}({options})" if options else info.name)
        print("    " + (info.doc.splitlines() or ["(no description)"])[0])
    return 0


def pass_reference_markdown(passes: dict[str, PassInfo]) -> str:
    """The pass reference in docs/, generated from docstrings and the options' own declarations."""
    lines = [
        "# Pass reference",
        "",
        "Generated by `peftc passes --markdown`; do not edit by hand.",
        "",
    ]
    methods = techniques()
    lines += _methods_table(methods)
    for info in passes.values():
        lines += [f"## `{info.name}`", "", info.doc or "(no description)", ""]
        if info.preserves_outputs:
            lines += [
                "Preserves outputs: the numeric check compares outputs before and after it.",
                "",
            ]
        method = methods.get(info.name)
        if method is not None:
            saved = (
                f"HF peft's `{method.peft_type}`"
                if method.peft_type
                else "peftc's format (its options as JSON)"
            )
            lines += [
                f"A technique at {', '.join(f'`{k}`' for k in method.site_kinds)} sites; "
                f"checkpoints in {saved}.",
                "",
            ]
        rows = option_rows(info.options)
        if rows:
            peft = any(row[3] for row in rows)
            header = ["option", "type", "default"] + (["peft"] if peft else []) + ["meaning"]
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += [
                "| " + " | ".join(row[:3] + (row[3:4] if peft else ()) + row[4:]) + " |"
                for row in rows
            ]
            lines.append("")
    return "\n".join(lines)


def _methods_table(methods: dict) -> list[str]:
    """One row per technique, from its declaration: what it adapts, and what it composes with."""
    from peftc.technique.declaration import Technique

    lines = [
        "## Methods",
        "",
        "What each technique supports, read from its declaration. Merge: it folds into the base "
        "weight (`merge`), else merging refuses it by name. `multi_lora`: LoRA is served from "
        "low-rank stacks, every other technique that merges from its folded update (dense), the "
        "rest are refused by name. What each of peft's methods does over an NF4 base, in ONNX "
        "Runtime (merged and unmerged), under `multi_lora` and the Triton backend (which lowers "
        "LoRA sites only), measured: `docs/methods.md` (generated by `benchmarks/methods.py`).",
        "",
        "| technique | peft type | sites | stage | merge | `multi_lora` |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, method in sorted(methods.items()):
        kind = type(method)
        merges = kind.fold is not Technique.fold or kind.delta is not Technique.delta
        dense = merges and "linear" in method.site_kinds
        serving = "low-rank" if name == "lora" else "dense, linear sites" if dense else "refused"
        lines.append(
            f"| `{name}` | {method.peft_type or '(peftc format)'} | "
            f"{', '.join(method.site_kinds)} | {method.stage} | {'yes' if merges else 'no'} | "
            f"{serving} |"
        )
    return [*lines, ""]


def _fields(info: PassInfo) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(info.options) if f.init] if info.options else []
