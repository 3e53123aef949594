"""Shared fixtures. Tests never reach the network: the hub is switched off before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import runpy  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# align's cache (where the embedded GGUF is converted to) is a directory made empty for this session: the embedded
# model is converted from scratch exactly once per session, whatever ~/.cache/align holds (tests/test_models.py
# checks that conversion), and commands run as subprocesses inherit it. Removed when the session ends.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="align-cache-"))
os.environ["ALIGN_CACHE"] = str(SESSION_CACHE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@dataclass
class Ran:
    """What a command left behind, as subprocess.run(..., capture_output=True, text=True) gives it."""

    returncode: int
    stdout: str
    stderr: str


def _in_process(call, stdin: str | bytes | None, cwd) -> Ran:
    """Runs `call()` the way a fresh process would run it, in this one (~7 s of torch/transformers imports saved
    per command on 2 cores): stdout and stderr captured, stdin given, in `cwd`; SystemExit (argparse's --help and
    errors) becomes the exit status, an exception escaping the command is printed as Python prints it (a
    "Traceback" on stderr, status 1), and align's logging goes to the captured stderr as `_setup_logging`
    configures it. Whatever the command changes of this process's logging and warnings filters is put back.

    The root logger's handlers (pytest's) are taken off for the call so that `_setup_logging`'s basicConfig really
    configures logging (it does nothing where the root logger has a handler), as in a fresh process."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
                    if isinstance(lg, logging.Logger)}
    saved_stdin = sys.stdin
    if stdin is not None:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    root.handlers = []
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                contextlib.chdir(cwd or Path.cwd()):
            try:
                code = call()
            except SystemExit as e:
                code = e.code
            except Exception:  # noqa: BLE001 - what the interpreter would do with it
                traceback.print_exc()
                code = 1
            if code is not None and not isinstance(code, int):  # sys.exit("message")
                print(code, file=sys.stderr)
                code = 1
            sys.stdout.flush()
    finally:
        sys.stdin = saved_stdin
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers, root.level = saved_handlers, saved_level
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
    return Ran(code or 0, out.getvalue(), err.getvalue())


def run_align(*argv: str, stdin: str | bytes | None = None, cwd=None) -> Ran:
    """`align ARGV...` run in this process (align.cli.main); tests/test_cli.py runs the real console script once."""
    from align.cli.main import main

    return _in_process(lambda: main([str(a) for a in argv]), stdin, cwd)


def run_recipe(stage: str, *argv: str, cwd=None) -> Ran:
    """`python recipes/STAGE.py ARGV...` run in this process: the script file itself runs as __main__ with that
    sys.argv (tests/test_cli.py runs one recipe script as a real process)."""
    script = str(ROOT / "recipes" / f"{stage}.py")

    def call():
        saved = sys.argv
        sys.argv = [script, *map(str, argv)]
        try:
            runpy.run_path(script, run_name="__main__")
        finally:
            sys.argv = saved

    return _in_process(call, None, cwd)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 model as a converted HF directory: converted here, from scratch, into this session's
    empty cache, then reused by every test (and every command) that asks for the default model."""
    from align.modeling.models import resolve_model
    from align.runtime.config import ModelConfig

    return Path(resolve_model(ModelConfig()).path)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from align.modeling.models import load_tokenizer

    return load_tokenizer(str(embedded_dir))


# SmolLM2's chat template: ChatML with a default system prompt (so tests see a template that adds a turn)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE of 512 tokens trained here on the first rows of the shipped data and the template's words,
    with SmolLM2's special tokens in SmolLM2's roles: <|im_start|> is BOS (written by the template, never added by
    the tokenizer), <|im_end|> is EOS and pad, <|endoftext|> is unk (the spare pad the reward stage scores with).
    Byte-level, so every text encodes (no unknown characters) and decodes back to itself; training takes well
    under a second, and the same texts give the same tokenizer every time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["You are a helpful AI assistant named SmolLM, trained by Hugging Face", "system user assistant"] * 100
    for name in ("sft/train.jsonl", "prefs/train.jsonl"):
        for line in (ROOT / "reward_data" / name).read_text().splitlines()[:200]:
            row = json.loads(line)
            texts += [m["content"] for m in row["messages"]] if "messages" in row else [
                row["prompt"], row["chosen"], row["rejected"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama with random weights and the tokenizer built at test time (SmolLM2's template and roles)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tok(tiny_model_dir):
    """The tiny models' tokenizer as align loads it."""
    from align.modeling.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path: Path, rows) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings/bytes (written as they are, for broken lines)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def pair_rows(numbers, start: int = 0) -> list[dict]:
    """An easily separable preference: a worked answer beats an unsure wrong one."""
    return [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}. The answer is {a + b}.",
             "rejected": f"Maybe {a * b + start}? I am not sure at all, sorry."} for a, b in numbers]


TRAIN_NUMBERS = [(a, b) for a in range(2, 12) for b in (3, 7)]
EVAL_NUMBERS = [(a, b) for a in range(13, 21) for b in (4, 9)]


def reward_overrides(tmp: Path, tiny: Path, train: Path, evals: Path) -> list[str]:
    return [f"model.name_or_path={tiny}", f"runs_dir={tmp / 'runs'}", "run=t", f"data.train={train}",
            f"data.eval={evals}", "training.learning_rate=5e-3", "training.batch_size=4", "training.max_steps=10",
            "training.logging_steps=2", "training.save_steps=5", "lora.r=8", "lora.dropout=0"]


@pytest.fixture(scope="session")
def reward_data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prefs")
    return (write_jsonl(d / "train.jsonl", pair_rows(TRAIN_NUMBERS)),
            write_jsonl(d / "eval.jsonl", pair_rows(EVAL_NUMBERS, start=1)))


@pytest.fixture(scope="session")
def tiny_reward_run(tmp_path_factory, tiny_model_dir, reward_data_files) -> Path:
    """A reward run on the tiny Llama, trained once per session (about 10 s)."""
    from align.runtime.config import RewardConfig, load_config
    from align.stages import reward

    tmp = tmp_path_factory.mktemp("rm")
    cfg = load_config(RewardConfig, None, reward_overrides(tmp, tiny_model_dir, *reward_data_files))
    return reward.run(cfg)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny SFT run (2 steps) for the stages that start from SFT."""
    from align.runtime.config import SFTConfig, load_config
    from align.stages import sft

    tmp = tmp_path_factory.mktemp("sft-run")
    data = write_jsonl(tmp / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                           for r in pair_rows([(2, 3), (4, 5), (6, 7), (8, 9)])])
    cfg = load_config(SFTConfig, None, [f"model.name_or_path={tiny_model_dir}", f"runs_dir={tmp / 'runs'}", "run=s",
                                        f"data.train={data}", "data.eval=", "training.max_steps=2",
                                        "training.batch_size=2", "lora.r=4", "lora.alpha=8", "samples=0"])
    return sft.run(cfg)


def count_tiled_backwards(monkeypatch) -> list[int]:
    """Counts backward passes of the tiled MLP (training.mlp_tiles), so a test knows the option really ran."""
    from align.modeling import tiled

    calls = [0]
    real = tiled._TiledMLP.backward

    def counted(ctx, grad):
        calls[0] += 1
        return real(ctx, grad)

    monkeypatch.setattr(tiled._TiledMLP, "backward", staticmethod(counted))
    return calls
