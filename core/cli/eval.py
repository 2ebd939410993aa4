"""``q eval``: perplexity, KL, top-1 agreement, per-layer error and a verdict (q.evaluate)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

import click
from rich.table import Table

from ..errors import OptionError
from .generate import engine_options, native_options_for, setup_logging
from .quantize import parse_extra_args
from .render import console

EXIT_FAIL = 3  # 2 is taken by usage errors and QError (bad input)
EXIT_WARN_STRICT = 4
CARD_HEADING = "## q eval"
log = logging.getLogger("q.eval")


def _num(v, fmt, scale=1.0) -> str:
    return "n/a" if v is None else format(scale * v, fmt)


def _short(text: str | None, n: int = 100, tail: bool = False) -> str:
    """One line of at most n characters (the JSON report has the whole text)."""
    text = (text or "").replace("\n", "\\n")
    if len(text) <= n:
        return text
    return "..." + text[-n:] if tail else text[:n] + "..."


def metrics_table(r) -> Table:
    num = _num
    table = Table(title=f"q eval: {r.model} ({r.format}) vs {r.reference or 'no reference'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("text", f"{r.text}: {r.windows} x {r.window_len} tokens")
    table.add_row("perplexity", f"{r.ppl:.3f}")
    table.add_row("reference perplexity", num(r.ref_ppl, ".3f"))
    table.add_row("perplexity increase", num(r.ppl_increase, "+.2f", 100) + "%")
    table.add_row("KL(ref || quant), mean / p95", f"{num(r.kl_mean, '.4f')} / "
                  f"{num(r.kl_p95, '.4f')}")
    table.add_row("top-1 agreement", num(r.top1_agreement, ".4f"))
    table.add_row("degenerate generations",
                  f"{sum(g.degenerate for g in r.generations)} of {len(r.generations)}")
    return table


def layers_table(r, n: int) -> Table:
    table = Table(title=f"worst {min(n, len(r.layers))} of {len(r.layers)} quantized Linears "
                  "(relative output error)")
    for col in ("layer", "isolated", "in model", "flag"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for e in r.worst(n):
        table.add_row(e.name, f"{e.isolated:.4f}",
                      "n/a" if e.in_model is None else f"{e.in_model:.4f}",
                      "[red]high[/red]" if e.flagged else "")
    return table


def generations_table(r) -> Table:
    table = Table(title="greedy generations (full text: --json)")
    for col in ("prompt", "quantized", "reference", "same prefix", "flags"):
        table.add_column(col, overflow="fold", ratio=3 if col in ("quantized", "reference")
                         else 1)
    for g in r.generations:
        flags = ", ".join(g.flags) or "-"
        if g.reference_flags:
            flags += f" (ref: {', '.join(g.reference_flags)})"
        table.add_row(_short(g.prompt, 60, tail=True), _short(g.text), _short(g.reference_text),
                      "n/a" if g.prefix_match is None else f"{100 * g.prefix_match:.0f}%",
                      f"[red]{flags}[/red]" if g.degenerate else flags)
    return table


def card_section(r) -> str:
    """The ``## q eval`` section of a model card (markdown) for an EvalReport."""
    from .. import __version__

    ref = f"`{Path(r.reference).name}`" if r.reference else "no reference"
    lines = [
        CARD_HEADING, "",
        (f"`q eval` (q {__version__}, format {r.format}) against {ref} on {r.windows} windows "
         f"x {r.window_len} tokens of {r.text}."), "",
        "| metric | value |", "|---|---|",
        (f"| perplexity | {r.ppl:.3f} (reference {_num(r.ref_ppl, '.3f')}, "
         f"{_num(r.ppl_increase, '+.2f', 100)}%) |"),
        f"| KL(reference \\|\\| quantized), mean per token | {_num(r.kl_mean, '.4f')} |",
        f"| top-1 agreement | {_num(r.top1_agreement, '.3f')} |",
        (f"| degenerate generations | {sum(g.degenerate for g in r.generations)} of "
         f"{len(r.generations)} |"), "",
        f"**Verdict: {r.verdict}**: {r.reason}", "",
    ]
    if r.layers:
        lines += [("Largest per-layer output errors (isolated: the layer alone on the "
                   "reference's input):"), "", "| layer | isolated | in model |", "|---|---|---|"]
        lines += [f"| {e.name} | {e.isolated:.4f} | {_num(e.in_model, '.4f')} |"
                  for e in r.worst(5)]
        lines.append("")
    return "\n".join(lines)


def write_card(model_dir, r) -> str | None:
    """Put the ``## q eval`` section into MODEL/README.md (replacing an older one) atomically.

    Returns the path written, or None with a warning when MODEL is not writable. No other
    file of MODEL is touched: the new README is a temporary file in MODEL, then os.replace.
    """
    readme = Path(model_dir) / "README.md"
    if not os.access(model_dir, os.W_OK) or (readme.exists() and not os.access(readme, os.W_OK)):
        log.warning("not writing the model card: %s is not writable", readme)
        return None
    try:
        old = readme.read_text(encoding="utf-8") if readme.exists() else ""
        mode = readme.stat().st_mode & 0o777 if readme.exists() else 0o644
        lines = old.splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip() == CARD_HEADING), None)
        head, tail = lines, []
        if start is not None:  # the old section ends at the next heading of level 1 or 2
            end = next((i for i in range(start + 1, len(lines))
                        if lines[i].startswith(("# ", "## "))), len(lines))
            head, tail = lines[:start], lines[end:]
        parts = ["\n".join(head).rstrip(), card_section(r), "\n".join(tail)]
        new = "\n\n".join(p for p in parts if p).rstrip("\n") + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".README.md.q-eval-", dir=model_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(new)
            os.chmod(tmp, mode)
            os.replace(tmp, readme)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("not writing the model card: %s: %s", readme, exc)
        return None
    return str(readme)


def add_commands(cli: click.Group) -> None:
    @cli.command("eval")
    @click.argument("model", type=click.Path(file_okay=False))
    @click.option("--reference", "-r", type=click.Path(file_okay=False),
                  help="the unquantized model (default: MODEL with --scheme, else the source "
                  "in MODEL's q_manifest.json)")
    @click.option("--text", type=click.Path(dir_okay=False),
                  help="held-out UTF-8 .txt (default: the Lee news corpus)")
    @click.option("--windows", default=8, show_default=True, help="text windows evaluated")
    @click.option("--window-len", default=256, show_default=True, help="tokens per window")
    @click.option("--generations", default=3, show_default=True,
                  help="greedy generations checked for degenerate output")
    @click.option("--gen-tokens", default=48, show_default=True, help="tokens per generation")
    @click.option("--prompt", "-p", "prompts", multiple=True,
                  help="generation prompt (repeatable; default: starts of text windows)")
    @click.option("--ignore", multiple=True, help="with --scheme: module to keep unquantized")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False),
                  help="write the whole report as JSON here ('-' = stdout)")
    @click.option("--no-card", is_flag=True, help="do not write the results into MODEL/README.md")
    @click.option("--top", default=5, show_default=True, help="worst layers shown")
    @click.option("--fail-ppl", default=25.0, show_default=True,
                  help="FAIL above this perplexity increase, in %")
    @click.option("--warn-ppl", default=5.0, show_default=True, help="WARN above, in %")
    @click.option("--fail-agreement", default=0.80, show_default=True,
                  help="FAIL below this top-1 agreement")
    @click.option("--warn-agreement", default=0.90, show_default=True, help="WARN below")
    @click.option("--layer-error", default=0.25, show_default=True,
                  help="flag layers whose isolated relative error is above this")
    @click.option("--strict", is_flag=True, help="exit 4 on WARN too")
    @click.option("--progress/--no-progress", default=None,
                  help="progress bars (default: on a terminal)")
    @engine_options
    @click.option("--vllm-python", envvar="Q_VLLM_PYTHON", show_envvar=True,
                  type=click.Path(dir_okay=False),
                  help="Python interpreter that has vLLM (--engine vllm; default: q's own)")
    def eval_(model, reference, text, windows, window_len, generations, gen_tokens, prompts,
              ignore, json_path, no_card, top, fail_ppl, warn_ppl, fail_agreement,
              warn_agreement, layer_error, strict, progress, engine, scheme, args, ragged,
              device, impl, verbose, native_options, vllm_python):
        """Compare MODEL (a checkpoint, or a bf16 model + --scheme) with its reference.

        Runs both through q's engine on held-out text: perplexity of each, KL divergence
        and top-1 agreement of the next-token distributions, each quantized Linear's output
        error (which layers to --ignore), greedy generations checked for degenerate output,
        and a verdict. Results also go into MODEL/README.md (a `## q eval` section).

        \b
        q eval OUT --reference MODEL_DIR
        q eval OUT --reference MODEL_DIR --text my.txt --json report.json
        q eval MODEL_DIR --scheme wint4 --arg group_size=64
        q eval OUT --reference MODEL_DIR --engine vllm   # as vLLM runs it (no KL, no layers)

        \b
        Exit codes: 0 PASS or WARN, 3 FAIL, 4 WARN with --strict,
        2 bad input (missing model, unreadable text, ...), 130 interrupted.
        """
        from ..evaluate import Thresholds, evaluate

        if json_path not in (None, "-") and not Path(json_path).resolve().parent.is_dir():
            raise OptionError(f"--json {json_path}: its directory does not exist")
        setup_logging(verbose)
        thresholds = Thresholds(warn_ppl=warn_ppl / 100, fail_ppl=fail_ppl / 100,
                                warn_agreement=warn_agreement, fail_agreement=fail_agreement,
                                layer_error=layer_error)
        report = evaluate(model, reference, text=text, windows=windows, window_len=window_len,
                          generations=generations, gen_tokens=gen_tokens,
                          prompts=list(prompts) or None, scheme=scheme,
                          args=parse_extra_args(args), ragged=ragged, ignore=ignore,
                          device=device, impl=impl, thresholds=thresholds, progress=progress,
                          engine=engine, engine_options={"vllm_python": vllm_python}
                          if engine == "vllm" else native_options_for(engine, native_options))
        if not no_card and scheme:  # MODEL is the bf16 model: its card is not about this run
            click.echo("note: no model card written (MODEL was quantized online)", err=True)
        elif not no_card:
            report.card = write_card(model, report)
        data = json.dumps(report.to_dict(), indent=1)
        if json_path == "-":
            click.echo(data)
        else:
            out = console()
            out.print(metrics_table(report))
            if report.layers:
                out.print(layers_table(report, top))
            if report.generations:
                out.print(generations_table(report))
            for note in report.notes:
                click.echo(f"note: {note}")
            if report.suggested_ignore:
                # quoted: MoE experts are named by a glob the shell would expand
                flags = " ".join(f"--ignore {shlex.quote(n)}" for n in report.suggested_ignore)
                click.echo(f"to keep the worst layers unquantized: q quantize ... {flags}")
            if json_path:
                try:
                    Path(json_path).write_text(data + "\n")
                except OSError as exc:
                    raise OptionError(f"--json {json_path}: cannot write ({exc.strerror})") \
                        from None
                click.echo(f"wrote {json_path}")
            if report.card:
                click.echo(f"wrote the `## q eval` section of {report.card}")
            color = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}[report.verdict]
            click.secho(f"verdict: {report.verdict}: {report.reason}", fg=color, bold=True)
        if report.verdict == "FAIL":
            sys.exit(EXIT_FAIL)
        if report.verdict == "WARN" and strict:
            sys.exit(EXIT_WARN_STRICT)
