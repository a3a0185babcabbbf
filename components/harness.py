"""An lm-evaluation-harness model for archflow models: any preset (MoE, MoA, hybrid, looped,
DenseFormer: also those transformers cannot load), scored with TransformerLM itself.

    pip install -e '.[eval]'
    python -m components.harness --model archflow --model_args path=models/serial \\
        --tasks archflow_tiny_mc --include_path tests/data/lm_eval --batch_size 16 --device cpu
    python -m components.harness ls tasks          # any lm-eval subcommand and option works

`python -m components.harness <lm-eval arguments>` registers the model name `archflow`, then runs
lm-eval's own command line. A plain `lm_eval --model archflow` cannot find it: lm-eval 0.4 (up to
0.4.13, which this was written against) builds its model registry from its own table
(lm_eval/models/__init__.py) and never reads a plugin entry-point group, so a third-party model is
known only to a process that has imported the module that registers it.

Model args (`--model_args k=v,k=v`): path (a model directory, load_model_dir), tokenizer (default
data/prepared/tokenizer.json, the study's), seed (for sampled generation). lm-eval's own options
set the rest: `--device` (its default is cuda:0; without a GPU this runs on the CPU, with a
warning) and `--batch_size`, sequences per forward pass (lm-eval's default 1; "auto": 16). From
Python, `ArchflowLM(model=<TransformerLM>, tokenizer=<Tokenizer>)` wraps a loaded model (on its
device).

Requests, as lm-eval's `hf` model scores them:
- loglikelihood: context + continuation, left-truncated to the last block_size + 1 tokens; the
  sum of the continuation's log-probabilities and whether greedy decoding yields it. Batched:
  rows sorted by length, right-padded (the model is causal, so padding never changes a score);
  requests with the same input (one-token choices after one context) share a row, as in `hf`.
- loglikelihood_rolling: the text's log-likelihood over lm-eval's non-overlapping windows of
  block_size tokens (lm_eval.utils.get_rolling_token_windows, context_len 1), windows of all
  requests batched together; the first token is predicted from <|endoftext|>.
- generate_until: greedy (temperature > 0 with do_sample: sampled), with the model's KV cache,
  stopping at any `until` string, <|endoftext|> or max_gen_toks; to fit block_size, max_gen_toks
  is lowered (not below block_size // 2), then the prompt is left-truncated. TransformerLM has no
  attention mask and one position for a whole batch, so left padding is impossible: requests are
  batched only with others of the same prompt length and generation settings; the rest run one at
  a time (each with its own cache).
"""
from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs

from components.artifacts import PREPARED, load_model_dir
from components.errors import ParamsError, cli
from components.model import TransformerLM, sample
from components.tokenizer import EOT, Tokenizer

NAME = "archflow"
DEFAULT_BATCH_SIZE = 16
log = logging.getLogger(__name__)


def register() -> None:
    """Make `archflow` an lm-eval model name in this process. Registered lazily, as a path, so
    the same class is found however this module was started (also as `python -m`)."""
    import lm_eval.models  # noqa: F401  lm-eval's own models first: get_model imports them only into an empty registry
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target="components.harness:ArchflowLM")


class ArchflowLM(TemplateLM):
    """lm-eval's LM over a TransformerLM and the project's Tokenizer (see the module docstring)."""

    def __init__(self, path: str | None = None, tokenizer: str | Tokenizer | None = None, device: str | None = None,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None, seed: int = 1234,
                 model: TransformerLM | None = None):
        super().__init__()
        self.batch_size = parse_batch_size(batch_size)
        if (path is None) == (model is None):
            raise ParamsError("archflow: give the model as --model_args path=models/<name> (or model= from Python)")
        if model is None:
            model, _ = load_model_dir(path)
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ParamsError(f"archflow: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.cfg.vocab_size}: pass the tokenizer it was trained with (tokenizer=<path>)")
        if device is None:
            device = model.wte.weight.device if path is None else "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():   # lm-eval's CLI default is cuda:0
            log.warning("archflow: device %s requested but torch finds no GPU: running on the CPU", device)
            device = "cpu"
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    # --- what TemplateLM needs: tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # --- scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (sum log p(continuation), is greedy).
        Requests with the same input (a multiple-choice question's one-token choices) share one row."""
        T = self.max_length
        inputs, users = {}, defaultdict(list)   # input ids -> its row's requests, with their targets
        for i, (_, context, continuation) in enumerate(requests):
            whole = (context + continuation)[-(T + 1):]
            n = min(len(continuation), T)
            if n < len(continuation):
                utils.warning_once(log, f"archflow: a continuation longer than block_size {T}: only its last {T} "
                                        f"tokens are scored")
            key = tuple(whole[:-1])
            inputs.setdefault(key, len(inputs))
            users[key].append((i, whole[-n:]))
        rows = sorted(inputs, key=len, reverse=True)    # similar lengths share a batch
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            x = torch.full((len(batch), len(batch[0])), self.eot_token_id, dtype=torch.long)
            for r, row in enumerate(batch):
                x[r, :len(row)] = torch.tensor(row)
            logits = self.model(x.to(self._device))                          # (B, width, vocab)
            for r, row in enumerate(batch):
                for i, target in users[row]:
                    logprobs = F.log_softmax(logits[r, len(row) - len(target):len(row)].float(), dim=-1)  # (n, vocab)
                    target = torch.tensor(target, device=self._device)
                    out[i] = (logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all()))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []                 # every request's windows, scored in one batched pass
        for r, (text,) in enumerate(req.args for req in requests):
            for context, target in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)              # same prompt length and settings: one batch, no padding
        prompts = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
            until = [u for u in kw["until"] if u] + ([EOT] if EOT not in kw["until"] else [])
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids, max_new = fit(self.tok_encode(context) or [self.eot_token_id], kw["max_gen_toks"], self.max_length)
            prompts.append(ids)
            groups[(len(ids), max_new, tuple(until), temperature)].append(i)
        out: list[str | None] = [None] * len(requests)
        for (_, max_new, until, temperature), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = self.generate([prompts[i] for i in batch], max_new, list(until), temperature)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new: int, until: list[str], temperature: float = 0.0) -> list[str]:
        """Continue equal-length prompts together with one KV cache until each has produced an
        `until` string or max_new tokens; each text is cut before its first stop string."""
        x = torch.tensor(prompts, dtype=torch.long, device=self._device)    # (B, P)
        cache = self.model.new_cache(len(prompts), x.size(1) + max_new - 1)
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits = self.model(x, cache)
        for step in range(max_new):
            token = sample(logits[:, -1], temperature, None, self.generator)  # (B, 1)
            for r, t in enumerate(token[:, 0].tolist()):
                if not done[r]:
                    new[r].append(t)
                    done[r] = any(u in self.tok_decode(new[r]) for u in until)
            if all(done) or step == max_new - 1:
                break
            logits = self.model(token, cache)
        return [cut(self.tok_decode(ids), until) for ids in new]


def cut(text: str, until: list[str]) -> str:
    """text up to its first stop string."""
    for u in until:
        text = text.split(u)[0]
    return text


def fit(ids: list[int], max_new: int, block_size: int) -> tuple[list[int], int]:
    """(prompt, tokens to generate) with prompt + max_new <= block_size: max_new is first lowered so the
    prompt fits, but not below block_size // 2 (lm-eval's default 256 would leave a 128-token model
    no prompt), then the prompt (not empty) is left-truncated."""
    max_new = max(1, min(max_new, max(block_size - len(ids), block_size // 2)))
    if len(ids) + max_new > block_size:
        utils.warning_once(log, f"archflow: prompts longer than block_size {block_size} - max_gen_toks are "
                                f"left-truncated")
    return ids[-(block_size - max_new):], max_new


def parse_batch_size(batch_size) -> int:
    """An int, a digit string, or lm-eval's "auto"/"auto:N" (no memory probing here: DEFAULT_BATCH_SIZE)."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ParamsError(f"archflow: batch_size must be a positive integer or auto, not {batch_size!r}")
    return value


def load_tokenizer(path: str | None) -> Tokenizer:
    path = Path(path) if path else PREPARED / "tokenizer.json"
    if not path.exists():
        study = " (the study's tokenizer, which `dvc repro prepare` writes)" if path == PREPARED / "tokenizer.json" else ""
        raise ParamsError(f"archflow: no tokenizer at {path}{study}: run it from the project root after "
                          f"`dvc repro prepare`, or pass tokenizer=<path to tokenizer.json> in --model_args")
    return Tokenizer.load(path)


def main(argv: list[str]) -> None:
    """lm-eval's command line, with `archflow` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    cli(main)
