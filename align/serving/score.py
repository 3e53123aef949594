"""Scoring text with a trained reward model — the engine behind `align score`, `align serve-rm` and evaluation.

A reward model is either a reward run (`runs/<run>/reward/`: LoRA adapter + score head over the base named in
its manifest) or a merged reward model directory (a plain …ForSequenceClassification with one output). Both
score through the training path: the tokenizer and chat template saved with the model, align's formatting
(BOS once, the answer's EOS), the max length it was trained with, and the score read at that EOS.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.data.pairs import _answer, parse_pair
from align.data.rows import _as_messages, char_bound, chars, jsonl_rows, keys_of, parse_row, read_rows
from align.modeling.formatting import Messages, encode_scored
from align.modeling.heads import pad_batch, sequence_scores
from align.modeling.models import load_base, load_tokenizer
from align.runtime.errors import DataError, ModelError, RowError
from align.runtime.runs import atomic_write_text
from align.serving.trained import model_config_for, open_run, pick_device

log = logging.getLogger(__name__)


def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int = 8, desc: str | None = None,
                    progress: bool = True) -> list[float]:
    """Scores of token sequences, in their order; batches are formed longest-first so padding stays small."""
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    try:
        with torch.no_grad(), tqdm(total=len(seqs), desc=desc, unit="seq", file=sys.stderr,
                                   disable=not progress or not seqs) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = pad_batch([seqs[i] for i in idx], pad_id, device=device)
                for i, s in zip(idx, sequence_scores(model, ids, mask).tolist()):
                    out[i] = s
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class ScoreRow:
    """One input row to score: an answer, or a pair of answers, to one prompt."""
    prompt: Messages
    answers: list[Messages]  # [response] or [chosen, rejected]

    @property
    def is_pair(self) -> bool:
        return len(self.answers) == 2


def parse_score_row(raw: Any) -> ScoreRow:
    """{"prompt", "response"}, {"messages"} (the last assistant message is scored) or {"prompt", "chosen",
    "rejected"} (and the implicit-prompt pair forms training accepts)."""

    if isinstance(raw, dict) and ("chosen" in raw or "rejected" in raw):
        prompt, chosen, rejected = parse_pair(raw)
        return ScoreRow(prompt, [chosen, rejected])
    answer_row = isinstance(raw, dict) and (
        "response" in raw or ("prompt" in raw and not ({"completion", "messages"} & raw.keys())))
    if answer_row:  # {"prompt", "response"}; a lone "prompt" is one whose 'response' is missing
        for key in ("prompt", "response"):
            if key not in raw:
                raise RowError(f"missing key '{key}' (a row to score needs 'prompt' + 'response', 'messages', or "
                               "'prompt' + 'chosen' + 'rejected')")
        prompt = _as_messages(raw["prompt"], "prompt", "user")
        if prompt[-1]["role"] != "user":
            raise RowError("'prompt' must end with a user message")
        return ScoreRow(prompt, [_answer(raw["response"], "response")])
    if isinstance(raw, dict) and not ({"messages", "prompt", "completion"} & raw.keys()):
        if "text" in raw:
            raise RowError("a reward model scores an answer to a prompt, not a plain 'text'; give 'prompt' + "
                           "'response' or 'messages'")
        raise RowError(f"missing key: a row to score needs 'prompt' + 'response', 'messages', or 'prompt' + "
                       f"'chosen' + 'rejected' (found: {keys_of(raw)})")
    prompt, completion, text = parse_row(raw)
    if text is not None or prompt is None or completion is None:
        raise RowError("a reward model scores an answer to a prompt; give 'prompt' + 'response' or 'messages'")
    return ScoreRow(prompt, [completion])


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class RewardModel:
    model: Any
    tokenizer: Any
    max_length: int
    source: str

    def encode(self, row: ScoreRow, max_length: int | None = None) -> list[list[int]]:
        """Token ids of each answer in the row, exactly as the reward stage encoded them in training."""
        limit = max_length or self.max_length
        out = []
        for key, a in zip(("'chosen': ", "'rejected': ") if row.is_pair else ("",), row.answers):
            if chars(row.prompt + a) > char_bound(self.tokenizer, limit):  # refused without tokenizing megabytes
                raise RowError(f"{key}prompt + answer is over the max length {limit} ({chars(row.prompt + a):,} "
                               "characters); the score is read at the answer's final EOS, so the whole answer must fit")
            try:
                out.append(encode_scored(self.tokenizer, row.prompt, a, limit))
            except ValueError as e:
                raise RowError(f"{key}{e}") from None
        return out

    def score(self, seqs: list[list[int]], batch_size: int = 8, progress: bool = False,
              desc: str | None = None) -> list[float]:
        return score_sequences(self.model, seqs, self.tokenizer.pad_token_id, batch_size, desc, progress)

    def score_answers(self, prompts: list[Messages], answers: list[str]) -> list[float | None]:
        """One score per (prompt, answer text), batched; None where the pair does not fit the max length."""
        seqs, slots = [], []
        for prompt, text in zip(prompts, answers):
            try:
                seqs += self.encode(ScoreRow(prompt, [[{"role": "assistant", "content": text or " "}]]))
                slots.append(len(seqs) - 1)
            except RowError:
                slots.append(None)
        scores = self.score(seqs) if seqs else []
        return [None if s is None else scores[s] for s in slots]


def load_reward_model(path: str | Path, device: str = "auto") -> RewardModel:
    """A reward run directory (adapter + head over its base) or a merged reward-model directory."""

    path = Path(path)
    dev = pick_device(device)
    is_run, is_merged = (path / "adapter_config.json").is_file(), (path / "config.json").is_file()
    if not (is_run or is_merged):
        raise ModelError(f"{path} is neither a reward run (runs/<run>/reward/ with adapter_config.json) nor a "
                         "merged reward model directory (config.json)")
    tokenizer = load_tokenizer(str(path))  # saved with the model: its chat template and pad token
    if is_run:
        model, max_length = _load_reward_run(path, dev, tokenizer.pad_token_id)
    else:
        model, max_length = _load_merged(path, dev)
    return RewardModel(model, tokenizer, max_length, str(path))


def _load_reward_run(path: Path, dev: torch.device, pad_token_id: int | None):
    from peft import PeftModel

    manifest, cfg, ref = open_run(path, ("reward",), "--model")
    model_cfg = model_config_for(cfg, manifest, dev)
    base = load_base(ref.path, model_cfg, task="score", pad_token_id=pad_token_id)
    model = PeftModel.from_pretrained(base, str(path))
    if model_cfg.quantization == "none":
        model.to(dev)
    return model.eval(), cfg.data.max_length


def _load_merged(path: Path, dev: torch.device):
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=torch.float32 if dev.type == "cpu" else "auto", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load {path} as a reward model: {e}") from None
    if model.config.num_labels != 1:
        raise ModelError(f"{path} has {model.config.num_labels} outputs; a reward model has exactly one")
    max_length = getattr(model.config, "align_max_length", None) or 512
    return model.to(dev).eval(), max_length


# ---------------------------------------------------------------------------------------------- files


@dataclass
class ScoreSummary:
    rows: int
    failed: int
    pairs: int
    accuracy: float | None
    mean_margin: float | None


def encode_rows(rm: RewardModel, rows: list[tuple[int, Any]], max_length: int | None = None
                ) -> tuple[list[dict[str, Any]], list[list[int] | None], list[list[int]]]:
    """Parse and encode rows: a result dict per row (with "error" when it failed), each row's slots in `seqs`."""
    results: list[dict[str, Any]] = []
    slots: list[list[int] | None] = []
    seqs: list[list[int]] = []
    for row_no, raw in rows:
        try:
            if isinstance(raw, RowError):
                raise raw
            ids = rm.encode(parse_score_row(raw), max_length)
        except RowError as e:
            results.append({"row": row_no, "error": str(e)})
            slots.append(None)
            continue
        results.append({"row": row_no})
        slots.append(list(range(len(seqs), len(seqs) + len(ids))))
        seqs.extend(ids)
    return results, slots, seqs


def fill_scores(results: list[dict[str, Any]], slots: list[list[int] | None], scores: list[float]) -> None:
    for result, slot in zip(results, slots):
        if slot is None:
            continue
        if len(slot) == 1:
            result["score"] = scores[slot[0]]
        else:
            chosen, rejected = scores[slot[0]], scores[slot[1]]
            result.update(chosen_score=chosen, rejected_score=rejected, margin=chosen - rejected,
                          correct=chosen > rejected)


def score_rows(rm: RewardModel, rows: list[tuple[int, Any]], batch_size: int = 8, max_length: int | None = None,
               progress: bool = False) -> list[dict[str, Any]]:
    """(row number, raw row) → one result dict per row, in order: scores, or the row's error."""
    results, slots, seqs = encode_rows(rm, rows, max_length)
    fill_scores(results, slots, rm.score(seqs, batch_size, progress, desc="scoring"))
    return results


def summarize(results: list[dict[str, Any]]) -> ScoreSummary:
    pairs = [r for r in results if "margin" in r]
    return ScoreSummary(
        rows=len(results), failed=sum("error" in r for r in results), pairs=len(pairs),
        accuracy=sum(r["correct"] for r in pairs) / len(pairs) if pairs else None,
        mean_margin=sum(r["margin"] for r in pairs) / len(pairs) if pairs else None)


def read_input(spec: str) -> list[tuple[int, Any]]:
    """Rows of a file (JSONL, JSON, CSV, Parquet, saved dataset) or of JSONL on stdin ("-")."""

    if spec == "-":
        rows = [(n, raw) for _, n, raw in jsonl_rows(sys.stdin.buffer, "<stdin>")]
    else:
        rows = [(n, raw) for _, n, raw in read_rows(spec)]
    if not rows:
        raise DataError(f"{'stdin' if spec == '-' else spec}: no rows to score (the input is empty)")
    return rows


OUTPUT_COLUMNS = ["row", "score", "chosen_score", "rejected_score", "margin", "correct", "error"]


def write_output(results: list[dict[str, Any]], spec: str) -> None:
    """JSONL to stdout ("-") or a .jsonl file; .csv and .parquet files get one column per field."""
    import json

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if spec == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
        return
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ""):
        atomic_write_text(path, lines)
    elif suffix == ".csv":
        atomic_write_text(path, _csv_text(results))
    elif suffix == ".parquet":
        _write_parquet(results, path)
    else:
        raise ModelError(f"--output {spec}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def _csv_text(results: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=OUTPUT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    return buf.getvalue()


def _write_parquet(results: list[dict[str, Any]], path: Path) -> None:
    import os
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: r.get(c) for c in OUTPUT_COLUMNS} for r in results])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
