"""Local tasks' documents longer than a model's window, refused before any model loads.

lm-evaluation-harness cuts a request longer than the model's window from the left (a warning in its
log): a multiple-choice request keeps its last ``window + 1`` tokens (context + choice), a generative
one its prompt's last ``window - max_gen_toks``. That is the harness's convention, and the OSP paper's
suite (hub tasks, ``downstream.SUITES``) is scored under it, unchecked. A local task is ours (written by
examples/downstream_local_tasks.py or a user for this evaluation): a passage whose beginning is cut off
is a question other than the one written, scored without a word, so every request of a local task
(``dataset_path: json`` ...) is built as the harness builds it (the same few-shot seed, shots and
``--limit``) and tokenized as the harness tokenizes it, with each model's tokenizer, and one that would
be cut is refused, naming the task, its file, the document and its length against the window.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["ModelWindow", "model_windows", "length_problems"]

MAX_PER_TASK = 5


class ModelWindow:
    """A model's tokenizer as the harness's HFLM encodes with it, and its window (``max_length``), without
    the model: HFLM's own encoding methods on an object that holds only what they read."""

    def __init__(self, path: str, tokenizer_dir: str, config_dir: str):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoConfig, AutoTokenizer

        class _Encoder(HFLM):
            def __init__(self, tokenizer, max_length):  # noqa: D401 - no model: HFLM.__init__ loads one
                self.tokenizer, self._max_length = tokenizer, max_length
                self.backend, self.add_bos_token, self.custom_prefix_token_id = "causal", None, None

        from lm_eval.models.huggingface import resolve_max_length

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True)
        window = resolve_max_length(AutoConfig.from_pretrained(config_dir), tokenizer, default=HFLM._DEFAULT_MAX_LENGTH)
        self.path, self.encoder, self.window = path, _Encoder(tokenizer, window), window

    def tokens(self, request) -> tuple[int, int]:
        """(the request's tokens, the most the harness keeps without cutting) for a harness Instance."""
        enc = self.encoder
        if request.request_type == "generate_until":
            from lm_eval.models.utils import normalize_gen_kwargs

            context, gen_kwargs = request.args[0], request.args[1]
            max_gen = normalize_gen_kwargs(dict(gen_kwargs), enc.max_gen_toks)["max_gen_toks"]
            return len(enc.tok_encode(context)), self.window - max_gen
        context, continuation = request.args[0], request.args[1]
        if context == "":
            return 1 + len(enc.tok_encode(continuation, add_special_tokens=False)), self.window + 1
        context_enc, continuation_enc = enc._encode_pair(context, continuation)
        return len(context_enc) + len(continuation_enc), self.window + 1


def model_windows(paths: list[str]) -> tuple[list[ModelWindow], list[tempfile.TemporaryDirectory]]:
    """Each model's ModelWindow; a Megatron checkpoint's tokenizer is written as its HF export writes it
    (into a temporary directory, returned to clean up) and its window is its sequence length. ValueError
    naming an HF directory whose tokenizer cannot be loaded (found at its load before)."""
    from megatron_osp.analysis.loading import config_facts

    out, tmps = [], []
    for path in paths:
        if (Path(path) / "config.json").exists():
            try:
                out.append(ModelWindow(path, path, path))
            except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' words for a damaged file
                raise ValueError(f"{path}: its tokenizer or config.json cannot be loaded ({type(e).__name__}: "
                                 f"{str(e).strip()[:300]}), which the harness needs") from None
            continue
        from transformers import LlamaConfig

        from megatron_osp.analysis.downstream import _run_tokenizer
        from megatron_osp.convert.hf_export import data_special_text
        from megatron_osp.convert.hf_tokenizer import save_tokenizer

        ckpt, run, tokenizer = _run_tokenizer(path)
        tmp = tempfile.TemporaryDirectory(prefix="osp-task-length-")
        tmps.append(tmp)
        save_tokenizer(tokenizer, tmp.name, eod_id=run.data.eod_id, log=lambda *_: None,
                       special_tokens_in_text=data_special_text(run, lambda *_: None, ckpt))
        LlamaConfig(max_position_embeddings=config_facts(path)[0]).to_json_file(str(Path(tmp.name) / "config.json"))
        out.append(ModelWindow(path, tmp.name, tmp.name))
    return out, tmps


def length_problems(name: str, task, num_fewshot: int | None, limit, windows: list[ModelWindow]) -> list[str]:
    """One line per document of local task ``task`` (built, not yet run) whose request would be cut by the
    harness for one of ``windows``' models (at most MAX_PER_TASK, then a count). Builds the task's requests
    as ``simple_evaluate`` does; call after anything that reads the task's configuration as given."""
    from lm_eval.evaluator import get_sample_size

    from megatron_osp.analysis.task_checks import _where

    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)  # simple_evaluate's fewshot_random_seed, which evaluate_task keeps
    task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
    shots = task.get_config("num_fewshot")
    problems, found = [], 0
    for w in windows:
        worst: dict[int, tuple[int, int, int, object]] = {}  # doc_id: (over, tokens, the most kept, request)
        for request in task.instances:
            if request.request_type not in ("loglikelihood", "generate_until"):
                continue  # loglikelihood_rolling is scored in windows, not cut
            tokens, keep = w.tokens(request)
            if tokens - keep > worst.get(request.doc_id, (0,))[0]:  # a document's longest request
                worst[request.doc_id] = (tokens - keep, tokens, keep, request)
        for doc_id in sorted(worst):
            found += 1
            if found > MAX_PER_TASK:
                continue
            _, tokens, keep, request = worst[doc_id]
            what = ("its prompt" if request.request_type == "generate_until"
                    else f"its prompt and choice {request.idx}" if task.config.output_type == "multiple_choice"
                    else "its prompt and answer") + (f", with {shots} few-shot examples," if shots else "")
            room = (f"the {keep} tokens the harness leaves for a prompt in {w.path}'s window of {w.window} "
                    f"(less {w.window - keep} to generate)" if request.request_type == "generate_until"
                    else f"{w.path}'s window of {w.window} (+1: the last token is only predicted)")
            problems.append(f"task {name}: {_where(task, doc_id)}: {what} is {tokens} tokens, more than {room}: the "
                            "harness would cut its beginning off and score what remains; shorten it, give fewer "
                            "shots, or evaluate a model of a longer window")
    if found > MAX_PER_TASK:
        problems.append(f"task {name}: ... {found - MAX_PER_TASK} more documents too long for a model's window")
    return problems
