"""Tokenize JSONL into megatron `.bin/.idx` datasets (read by megatron-core's IndexedDataset and Megatron-LM).

One dataset from files and/or directories:

    megamoe-preprocess --input data/en_cc/ data/extra.jsonl --output-prefix out/cc \\
        --tokenizer /path/to/hf_tokenizer_dir --workers 8

    -> out/cc_text_document.bin / .idx   (megatron's naming: <prefix>_<json-key>_document)

One dataset per domain directory (SlimPajama layout, or `megamoe-corpus local` output):

    megamoe-preprocess --per-domain corpus/ --output-dir tokenized/ --tokenizer tok.model --workers 8

    -> tokenized/<domain>/train_text_document.{bin,idx}, tokenized/<domain>/valid_text_document.{bin,idx}
       (files named valid*/val*/validation*/dev* are held out) and tokenized/manifest.json

Chat data (`--format chat`): JSONL of `{"messages": [{"role", "content"}, ...]}` or `{"instruction", "input"?,
"output"}` records, rendered with the tokenizer's chat template (or `--chat-template FILE`, a Jinja file):

    megamoe-preprocess --format chat --input sft.jsonl --output-prefix out/sft --tokenizer <hf dir>

    -> out/sft_chat_document.bin/.idx (tokens) and out/sft_chat_document_loss_mask.bin/.idx (uint8, 1 = assistant
       token), same document boundaries; with --per-domain: <domain>/{train,valid}_chat_document[_loss_mask]
       and a manifest.json for megamoe.data.sft.SFTMixture.from_manifest

Text data: EOS is appended to every document; `--append-bos` also prepends BOS. Bad lines (malformed JSON, missing key,
non-UTF-8 bytes, empty documents, ...) are reported as file:line; `--on-error fail` stops at the first one and writes
nothing, `--on-error skip` (default) counts them and goes on. Output is renamed into place only when complete.
The library code is `megamoe.data.preprocess`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megamoe.cli.args import positive_float, positive_int
from megamoe.cli.exit import run_command
from megamoe.console import add_log_level, setup_logging
from megamoe.data.chat import read_chat_template
from megamoe.data.preprocess import PreprocessConfig, dataset_name, preprocess, preprocess_domains
from megamoe.data.tokenizers import load_tokenizer


__all__ = ["main", "parse_args", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe-preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="JSONL files and/or directories (searched recursively, sorted)")
    src.add_argument("--per-domain", metavar="ROOT", help="a directory with one subdirectory of JSONL per domain")
    p.add_argument("--output-prefix", help="with --input: output prefix; '_<json-key>_document' is appended "
                                           "('_chat_document' with --format chat)")
    p.add_argument("--output-dir", help="with --per-domain: output directory")
    p.add_argument("--out", dest="output_dir", help=argparse.SUPPRESS)  # the other commands' spelling
    p.add_argument("--domains", nargs="+", help="with --per-domain: only these domain subdirectories")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory or sentencepiece .model file")
    p.add_argument("--format", choices=("text", "chat"), default="text",
                   help="text: one document per line under --json-key; chat: chat records (messages or "
                        "instruction/input/output) with a loss mask on the assistant tokens")
    p.add_argument("--chat-template", metavar="FILE",
                   help="with --format chat: a Jinja chat template to use instead of the tokenizer's own")
    p.add_argument("--json-key", default="text", help="the JSON key holding the document text (default: text)")
    p.add_argument("--append-bos", action="store_true", help="prepend BOS to every document")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS (megatron expects it; rarely wanted)")
    p.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1)),
                   help="cores that tokenize (default: all). Up to --max-threads of them run as the tokenizer's "
                        "native threads in one process, more as that many processes")
    p.add_argument("--max-threads", type=positive_int, default=4,
                   help="largest --workers served by native tokenizer threads in one process (shared merge cache, "
                        "no fork); 1 = always worker processes, Megatron-LM style (default: 4)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="what a bad input line does")
    p.add_argument("--chunk-mb", type=positive_float, default=8.0, help="input bytes per work item")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same prefix")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", help="also write the summary as JSON here")
    add_log_level(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.input and not a.output_prefix:
        p.error("--input needs --output-prefix")
    if a.per_domain and not a.output_dir:
        p.error("--per-domain needs --output-dir")
    if a.chat_template and a.format != "chat":
        p.error("--chat-template needs --format chat")
    if a.format == "chat" and (a.append_bos or a.no_eos or a.json_key != "text"):
        p.error("--append-bos, --no-eos and --json-key apply to text data; with --format chat the chat template "
                "decides BOS and end-of-turn tokens, and records are read from 'messages' or instruction/output")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    setup_logging(a.log_level)

    def go():
        template = read_chat_template(a.chat_template) if a.chat_template else None
        cfg = PreprocessConfig(json_key=a.json_key, append_eos=not a.no_eos, prepend_bos=a.append_bos,
                               workers=a.workers, max_threads=a.max_threads, on_error=a.on_error,
                               chunk_bytes=int(a.chunk_mb * (1 << 20)), overwrite=a.overwrite, progress=not a.quiet,
                               format=a.format, chat_template=template, chat_template_source=a.chat_template)
        tok = load_tokenizer(a.tokenizer)
        if a.input:
            s = preprocess(a.input, dataset_name(a.output_prefix, cfg), tok, cfg)
            print(s.format())
            result = s.to_dict()
        else:
            result = preprocess_domains(a.per_domain, a.output_dir, tok, cfg, domains=a.domains)
            print(f"wrote {os.path.join(a.output_dir, 'manifest.json')}: "
                  + ", ".join(f"{d} ({e.get('train_tokens', 0):,} train tokens)"
                              for d, e in result["domains"].items()))
        if a.summary_json:
            with open(a.summary_json, "w") as f:
                json.dump(result, f, indent=2)

    # exit 2 for bad input (the message names the file and line), 3 for an unwritable output, 130 on Ctrl-C
    # (nothing is published for the dataset in progress): megamoe/errors.py
    return run_command("megamoe-preprocess", go, outputs=[a.output_prefix or a.output_dir])


if __name__ == "__main__":
    sys.exit(main())
