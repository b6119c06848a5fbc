"""ScienceQA (Lu et al., NeurIPS 2022), the paper's multi-modal benchmark: conversion to our records, and accuracy.

    # 1. records for llama-adapter finetune (and for evaluation), from the dataset's own files
    llama-adapter scienceqa convert --problems ScienceQA/data/scienceqa/problems.json \\
        --pid-splits ScienceQA/data/scienceqa/pid_splits.json --images ScienceQA/data/scienceqa/images \\
        --split train --out sqa/train.json
    llama-adapter scienceqa convert ... --split test --out sqa/test.json
    # 2. a multi-modal adapter (the records' image paths lead out of sqa/, the default --image-root, to the
    #    dataset's images/, which llama-adapter finetune reads only with --allow-external-files)
    llama-adapter finetune --checkpoint llama-7b/ --data sqa/train.json --out runs/sqa-7b --clip clip-vit-l-14/ \\
        --allow-external-files
    # 3. accuracy on the test split, by the dataset's categories
    llama-adapter scienceqa evaluate --checkpoint llama-7b/ --adapter runs/sqa-7b/adapter.safetensors \\
        --clip clip-vit-l-14/ --data sqa/test.json --out runs/sqa-7b/test-predictions.jsonl

A record is an Alpaca one ("<question>\nOptions: (A) ... (B) ...", the hint as its input, "The answer is <letter>.";
--explain puts the lecture and solution first), its image relative to the output file's folder, and the fields that
evaluation reads. Evaluation generates greedily, reads the letter after "The answer is" and reports accuracy overall
and by ScienceQA's categories (NAT, SOC, LAN; TXT, IMG, NO; G1-6, G7-12). The formats: docs/finetuning.md (ScienceQA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_adapter_triton.kernels.checks import check_int
from llama_adapter_triton.model.quantize import QUANTIZE_MODES, check_quantize

PROG = "llama-adapter scienceqa"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_RE = re.compile(r"The answer is \(?([A-Z])\)?")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


class ScienceQAError(ValueError):
    """A problem of the dataset's files, naming the file and the problem id."""


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def problem_record(pid: str, problem: dict, *, image: str | None, explain: bool = False) -> dict:
    """One ScienceQA problem as a record (see the module docstring); image: its path as the record should give it."""
    choices = problem["choices"]
    answer = LETTERS[problem["answer"]]
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    hint = (problem.get("hint") or "").strip()
    reasoning = " ".join(t.strip() for t in (problem.get("lecture") or "", problem.get("solution") or "") if t.strip())
    output = f"The answer is {answer}."
    if explain and reasoning:
        output = f"{reasoning} {output}"
    grade = problem.get("grade") or ""
    return {"instruction": f"{problem['question'].strip()}\nOptions: {options}",
            "input": f"Context: {hint}" if hint else "", "output": output, "image": image, "id": pid,
            "answer": answer, "n_choices": len(choices), "subject": problem.get("subject"), "grade": grade,
            "has_text": bool(hint), "has_image": problem.get("image") is not None}


def _check_problem(file: Path, pid: str, problem: object) -> dict:
    if not isinstance(problem, dict):
        raise ScienceQAError(f"{file}: problem {pid!r} is not an object")
    for key, kind in (("question", str), ("choices", list), ("answer", int)):
        if not isinstance(problem.get(key), kind) or isinstance(problem.get(key), bool):
            raise ScienceQAError(f"{file}: problem {pid!r} has no valid {key!r} ({kind.__name__}), got "
                                 f"{problem.get(key)!r}")
    n = len(problem["choices"])
    if not 2 <= n <= len(LETTERS) or not all(isinstance(c, str) for c in problem["choices"]):
        raise ScienceQAError(f"{file}: problem {pid!r}: choices must be 2 to {len(LETTERS)} strings, got "
                             f"{problem['choices']!r}")
    if not 0 <= problem["answer"] < n:
        raise ScienceQAError(f"{file}: problem {pid!r}: answer {problem['answer']} is not the index of one of its "
                             f"{n} choices")
    return problem


def convert(problems_file: Path, split: str, images_dir: Path, out: Path, *, pid_splits_file: Path | None = None,
            explain: bool = False, overwrite: bool = False) -> tuple[Path, int, int]:
    """Write the split's records to out (JSON); returns (out, number of records, how many have an image).
    The split comes from pid_splits.json when given, else from each problem's "split"."""
    from llama_adapter_triton.model.io import write_atomic

    problems = _read_json(problems_file)
    if not isinstance(problems, dict) or not problems:
        raise ScienceQAError(f"{problems_file}: must map problem ids to problems")
    if pid_splits_file is not None:
        splits = _read_json(pid_splits_file)
        if split not in splits:
            raise ScienceQAError(f"{pid_splits_file}: has no split {split!r}; it has {', '.join(sorted(splits))}")
        pids = [str(p) for p in splits[split]]
        unknown = [p for p in pids if p not in problems]
        if unknown:
            raise ScienceQAError(f"{pid_splits_file}: split {split!r} names {len(unknown)} id(s) that "
                                 f"{problems_file} lacks, e.g. {unknown[:3]}")
    else:
        pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
        if not pids:
            found = sorted({p.get("split") for p in problems.values() if isinstance(p, dict)} - {None})
            raise ScienceQAError(f"{problems_file}: no problem has split {split!r}; the splits are {found}")
    records, missing = [], []
    for pid in pids:
        problem = _check_problem(problems_file, pid, problems[pid])
        image = None
        if problem.get("image"):
            # images/<the problem's own split>/<id>/<file>: minitrain etc. hold problems of train, val, test
            path = images_dir / problem.get("split", split) / pid / problem["image"]
            if not path.is_file():
                missing.append(str(path))
            image = os.path.relpath(path.resolve(), out.parent.resolve())
        records.append(problem_record(pid, problem, image=image, explain=explain))
    if missing:
        raise ScienceQAError(f"{len(missing)} image file(s) of split {split!r} do not exist, e.g. {missing[:3]} "
                             f"(--images must be the folder holding train/, val/ and test/)")
    write_atomic(out, json.dumps(records, indent=1, ensure_ascii=False).encode(), overwrite=overwrite)
    return out, len(records), sum(r["image"] is not None for r in records)


def _read_json(file: Path):
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} does not exist") from None
    except json.JSONDecodeError as e:
        raise ScienceQAError(f"{file}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Accuracy


def parse_answer(text: str, n_choices: int) -> str | None:
    """The letter after "The answer is" (the last such phrase), or None; a letter beyond the choices is None."""
    found = ANSWER_RE.findall(text)
    if not found or LETTERS.index(found[-1]) >= n_choices:
        return None
    return found[-1]


def categories(record: dict) -> list[str]:
    """ScienceQA's categories of a record: its subject, its context (TXT / IMG / NO) and its grade band."""
    out = [SUBJECTS[record["subject"]]] if record.get("subject") in SUBJECTS else []
    if record["has_text"]:
        out.append("TXT")
    if record["has_image"]:
        out.append("IMG")
    if not record["has_text"] and not record["has_image"]:
        out.append("NO")
    grade = re.fullmatch(r"grade(\d+)", record.get("grade") or "")
    if grade:
        out.append("G1-6" if int(grade.group(1)) <= 6 else "G7-12")
    return out


def accuracy_table(predictions: Sequence[dict]) -> dict[str, tuple[int, int]]:
    """{category: (right, total)} with "Avg" for all; predictions hold "correct" and the record's fields."""
    table = {name: [0, 0] for name in ("Avg", *CATEGORIES)}
    for p in predictions:
        for name in ("Avg", *categories(p)):
            table[name][0] += int(p["correct"])
            table[name][1] += 1
    return {k: (right, total) for k, (right, total) in table.items()}


@dataclass
class EvalArgs:
    checkpoint: Path = field(metadata={"help": "base model: a Meta or Hugging Face checkpoint folder"})
    data: Path = field(metadata={"help": "records written by `convert` (their image paths relative to this file)"})
    out: Path = field(metadata={"help": "predictions (JSON Lines); the summary goes beside it (.summary.json)"})
    adapter: Path | None = field(default=None, metadata={"help": "the adapter (a multi-modal one reads the images)"})
    clip: Path | None = field(default=None, metadata={"help": "the CLIP folder the multi-modal adapter was trained "
                                                             "with"})
    tokenizer: Path | None = field(default=None, metadata={"help": "default: the checkpoint folder"})
    batch_size: int = field(default=16, metadata={"help": "prompts generated together"})
    max_new_tokens: int = field(default=16, metadata={"help": "enough for the answer (more with --explain data)"})
    limit: int = field(default=0, metadata={"help": "the first N records only (0: all)"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cuda or cpu"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on a GPU, fp32 on the CPU",
                                                 "choices": ("auto", "bfloat16", "float16", "float32")})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})
    quantize: str | None = field(default=None, metadata={
        "help": "the base's linear weights in nf4 or int8 (bitsandbytes, model/quantize.py); --dtype computes",
        "choices": QUANTIZE_MODES})
    quantize_output: bool = field(default=False, metadata={"help": "with --quantize: the output layer too"})

    def __post_init__(self) -> None:
        check_quantize(self.quantize, argument="--quantize")
        if self.quantize_output and self.quantize is None:
            raise ValueError("--quantize-output goes with --quantize nf4|int8")
        for name, minimum in (("batch_size", 1), ("max_new_tokens", 1), ("limit", 0)):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum, what=f"an integer >= {minimum}")
        for name in ("checkpoint", "data", "out", "adapter", "clip", "tokenizer"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device != "cpu":
            from llama_adapter_triton.model.cli import check_cuda_device

            check_cuda_device(self.device)


def _load_eval_records(file: Path) -> list[dict]:
    records = _read_json(file)
    keys = ("instruction", "input", "id", "answer", "n_choices", "has_text", "has_image")
    if not isinstance(records, list) or not records:
        raise ScienceQAError(f"{file}: must be a non-empty JSON list of records written by `{PROG} convert`")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or any(k not in r for k in keys):
            raise ScienceQAError(f"{file}: record {i} lacks {[k for k in keys if k not in (r or {})]}: evaluation "
                                 f"needs records written by `{PROG} convert`")
    return records


def evaluate(args: EvalArgs) -> dict:
    """Generate an answer for each record, score it; writes the predictions and the summary; returns the summary."""
    from llama_adapter_triton.model.adapters.formats import load_adapter, read_adapter_config
    from llama_adapter_triton.model.checkpoint import load_checkpoint, load_config
    from llama_adapter_triton.model.generate import generate
    from llama_adapter_triton.model.io import write_atomic
    from llama_adapter_triton.model.prompt import alpaca_prompt
    from llama_adapter_triton.model.tokenizer import Tokenizer
    from llama_adapter_triton.model.visual import CLIPImageEncoder

    summary_file = args.out.with_name(args.out.name + ".summary.json")
    for f in (args.out, summary_file):
        if f.exists() and not args.overwrite:
            raise FileExistsError(f"{f} exists; pass --overwrite to replace it")
    records = _load_eval_records(args.data)
    if args.limit:
        records = records[:args.limit]
    adapter = read_adapter_config(args.adapter, model=load_config(args.checkpoint)) if args.adapter else None
    multimodal = adapter is not None and adapter.visual_dim > 0
    if multimodal and args.clip is None:
        raise ScienceQAError("--adapter is multi-modal: give --clip, the CLIP folder it was trained with")
    if args.clip is not None and not multimodal:
        raise ScienceQAError("--clip goes with a multi-modal --adapter (this one reads no images)")
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    dtype = dtypes.get(args.dtype, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = load_checkpoint(args.checkpoint, adapter=adapter, dtype=dtype, device=args.device, quantize=args.quantize,
                            quantize_output=args.quantize_output).eval()
    if args.adapter:
        load_adapter(model, args.adapter)
    encoder = None
    if multimodal:
        try:
            encoder = CLIPImageEncoder.for_adapter(args.clip, adapter, device=args.device, dtype=dtype)
        except ValueError as e:
            raise ScienceQAError(f"--clip {e}") from None
    tokenizer = Tokenizer(args.tokenizer or args.checkpoint)
    root = args.data.parent
    predictions = []
    for start in range(0, len(records), args.batch_size):
        batch = records[start:start + args.batch_size]
        prompts = [tokenizer.encode(alpaca_prompt(r["instruction"], r["input"]), bos=True, eos=False) for r in batch]
        images = {}
        if encoder is not None:  # rows without an image get no visual input (image_mask)
            rows = [i for i, r in enumerate(batch) if r.get("image")]
            if rows:
                features = encoder.encode_files([root / batch[i]["image"] for i in rows])
                mask = torch.zeros(len(batch), dtype=torch.bool, device=args.device)
                mask[rows] = True
                all_rows = features.new_zeros(len(batch), *features.shape[1:])
                all_rows[rows] = features
                images = dict(image_features=all_rows, image_mask=mask)
        answers = generate(model, prompts, max_new_tokens=args.max_new_tokens, stop_ids=tokenizer.stop_ids,
                           pad_id=tokenizer.eos_id, **images)
        for r, ids in zip(batch, answers, strict=True):
            text = tokenizer.decode(ids)
            predicted = parse_answer(text, r["n_choices"])
            predictions.append({**{k: r[k] for k in ("id", "answer", "subject", "grade", "has_text", "has_image")
                                   if k in r}, "generated": text, "predicted": predicted,
                                "correct": predicted == r["answer"]})
        print(f"{len(predictions)}/{len(records)} answered, "
              f"{sum(p['correct'] for p in predictions) / len(predictions):.2%} right so far", file=sys.stderr)
    table = accuracy_table(predictions)
    summary = {"data": str(args.data), "checkpoint": str(args.checkpoint),
               "adapter": str(args.adapter) if args.adapter else None, "records": len(predictions),
               "unparsed": sum(p["predicted"] is None for p in predictions),
               "accuracy": {k: (right / total if total else None) for k, (right, total) in table.items()},
               "counts": {k: list(v) for k, v in table.items()}}
    write_atomic(args.out, "".join(json.dumps(p) + "\n" for p in predictions).encode(), overwrite=args.overwrite)
    write_atomic(summary_file, json.dumps(summary, indent=1).encode(), overwrite=args.overwrite)
    return summary


def format_table(summary: dict) -> str:
    names = [k for k in ("Avg", *CATEGORIES) if summary["counts"][k][1]]
    head = " ".join(f"{n:>7}" for n in names)
    row = " ".join(f"{100 * summary['accuracy'][n]:7.2f}" for n in names)
    count = " ".join(f"{summary['counts'][n][1]:7d}" for n in names)
    return f"{head}\n{row}   (accuracy, %)\n{count}   (problems)"


def main(argv: Sequence[str] | None = None) -> None:
    from llama_adapter_triton.model.cli import build_parser, cli_message
    from llama_adapter_triton.model.io import CheckpointError

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="ScienceQA's files -> records for llama-adapter finetune and evaluate")
    c.add_argument("--problems", type=Path, required=True, help="problems.json")
    c.add_argument("--split", required=True, help="train, val, test, minitrain, minival or minitest")
    c.add_argument("--images", type=Path, required=True, help="the folder holding train/, val/ and test/ images")
    c.add_argument("--out", type=Path, required=True, help="the records' JSON file")
    c.add_argument("--pid-splits", type=Path, help="pid_splits.json (default: each problem's own 'split')")
    c.add_argument("--explain", action="store_true", help="the lecture and solution before the answer")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    evaluate_parser = build_parser(EvalArgs, prog=f"{PROG} evaluate", description="accuracy of a model on records")
    commands.add_parser("evaluate", parents=[evaluate_parser], add_help=False, help=evaluate_parser.description)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            out, n, with_image = convert(args.problems, args.split, args.images, args.out,
                                         pid_splits_file=args.pid_splits, explain=args.explain,
                                         overwrite=args.overwrite)
            outside = not args.images.resolve().is_relative_to(out.parent.resolve())
            print(f"wrote {n} records ({with_image} with an image) to {out}; their image paths start at "
                  f"{out.parent} (llama-adapter finetune's default --image-root for it)"
                  + ("; they lead out of it, to --images: llama-adapter finetune reads them only with "
                     "--allow-external-files" if outside and with_image else ""))
        else:
            try:
                eval_args = EvalArgs(**{k: v for k, v in vars(args).items() if k != "command"})
            except ValueError as e:
                evaluate_parser.error(str(e))
            summary = evaluate(eval_args)
            print(format_table(summary))
            print(f"predictions: {args.out}; summary: {args.out}.summary.json")
    except (ScienceQAError, CheckpointError, OSError) as e:  # a file that cannot be used: one line, no traceback
        print(f"{PROG}: error: {cli_message(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
