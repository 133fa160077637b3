"""lm-evaluation-harness on a run's newest checkpoint: the model `lmx` of `lm_eval`.

    python -m train.lm_eval_adapter --model lmx --model_args workdir=runs/quickstart \
        --tasks hellaswag,arc_easy --batch_size 16

Running this module registers the model and hands the command line to lm_eval's own (the
`lm_eval` command cannot see a model registered outside its package); in Python, import the
module and pass `LmxLM(workdir=...)` or `model="lmx"` to `lm_eval.simple_evaluate`. Needs the
optional extra: `pip install -e ".[eval]"`. Works for pretraining and post-training workdirs.

Texts go through the run's tokenizer, and every context starts with BOS, as the training
documents did. The window is the run's `train.seq_len`, the length the model was trained at
(`--model_args max_length=N` changes it, up to `model.max_seq_len`): longer contexts keep
their last tokens, and `loglikelihood_rolling` scores long documents in windows as lm_eval
defines them. Scoring sorts requests by length and runs `batch_size` rows at a time (a
multiple of the devices, split over them), right-padded to a power-of-two bucket length, so
each bucket compiles once. `generate_until` decodes with `model.generate`, greedy unless the
task asks for `do_sample` (then with its temperature, top_k, top_p, min_p), and cuts the text
at the first `until` string.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import model
from align import source
from model import sharding
from model.generate import Sampling, generate
from train.step import batch_sharding

log = logging.getLogger("train")

SMALLEST_BUCKET = 16


@functools.partial(jax.jit, static_argnames="config")
def _score(config, params, inputs_BT, targets_BT, scored_BT):
    """Per row: the summed log-probs of the scored targets (float32), and whether every
    scored target is the argmax of its logits."""
    logits_BTV = model.forward(config, params, inputs_BT)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return jnp.sum(jnp.where(scored_BT, logp_BT, 0.0), axis=-1), jnp.all(greedy_BT | ~scored_BT, axis=-1)


def bucket_length(length: int, window: int) -> int:
    """The padded length of a batch whose longest input is `length` tokens."""
    return min(window, max(SMALLEST_BUCKET, 1 << math.ceil(math.log2(max(length, 1)))))


@register_model("lmx")
class LmxLM(TemplateLM):
    """A run's newest checkpoint as an lm_eval model; `workdir` is the run's directory."""

    def __init__(
        self,
        workdir: str,
        batch_size: int | str = 16,
        max_length: int | str = 0,
        seed: int | str = 0,
        device: str | None = None,
        max_batch_size: int | None = None,
    ):
        super().__init__()
        del device, max_batch_size  # lm_eval's PyTorch settings: JAX uses all its devices
        start = source.from_workdir(workdir, setting="workdir")
        run = json.loads((epath.Path(workdir) / "config.json").read_text())  # local or gs://
        self.config = start.model_config
        self.tokenizer = start.tokenizer
        self.mesh = sharding.make_mesh((-1, 1, 1), model_config=self.config)
        self.params = start.load_params(self.mesh)
        self.max_length = min(int(max_length) or run["train"]["seq_len"], self.config.max_seq_len)
        # "auto" (lm_eval's batch-size search) has no meaning here: the default stands.
        rows = 16 if str(batch_size).startswith("auto") else int(batch_size)
        devices = self.mesh.shape["data"]
        self.batch_size = -(-rows // devices) * devices
        self._rng = jax.random.key(int(seed))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and each rolling document are conditioned on."""
        return self.tokenizer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`, after BOS unless `add_special_tokens` is False."""
        return self.tokenizer.encode([string], add_bos=add_special_tokens is not False)[0]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids)."""
        results = self._score_pairs([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1,
            )
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logp, _) in zip(owners, self._score_pairs(pairs, disable_tqdm)):
            totals[index] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy continuation) of each pair of
        token lists; a context beyond the window keeps its last tokens."""
        window = self.max_length
        for _, continuation in pairs:
            if len(continuation) > window:
                raise ValueError(f"lmx: a continuation of {len(continuation)} tokens exceeds the window of {window}")
        sequences = [(context + continuation)[-(window + 1):] for context, continuation in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(sequences[i]))
        results = [None] * len(pairs)
        rows = batch_sharding(self.mesh)
        batches = range(0, len(order), self.batch_size)
        for first in tqdm.tqdm(batches, desc="lmx: scoring", disable=disable_tqdm):
            members = order[first:first + self.batch_size]
            T = bucket_length(len(sequences[members[0]]) - 1, window)
            inputs_BT = np.zeros((self.batch_size, T), np.int32)
            targets_BT = np.zeros((self.batch_size, T), np.int32)
            scored_BT = np.zeros((self.batch_size, T), bool)
            for row, i in enumerate(members):
                sequence, n = sequences[i], len(sequences[i]) - 1
                inputs_BT[row, :n] = sequence[:-1]
                targets_BT[row, :n] = sequence[1:]
                scored_BT[row, n - len(pairs[i][1]):n] = True
            with jax.set_mesh(self.mesh):
                logp_B, greedy_B = jax.device_get(
                    _score(self.config, self.params, *jax.device_put((inputs_BT, targets_BT, scored_BT), rows))
                )
            for row, i in enumerate(members):
                results[i] = (float(logp_B[row]), bool(greedy_B[row]))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut before the first `until` string; requests with
        the same generation settings run together, `batch_size` at a time."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results = [None] * len(requests)
        progress = tqdm.tqdm(total=len(requests), desc="lmx: generating", disable=disable_tqdm)
        for indices in groups.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1])
            until = [s for s in settings.pop("until") if s]
            max_new_tokens = min(settings.pop("max_gen_toks"), self.max_length - 1)
            sampling = _sampling(settings) if settings.pop("do_sample") else Sampling()
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new_tokens):] for i in indices}
            indices = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths pad less
            for first in range(0, len(indices), self.batch_size):
                members = indices[first:first + self.batch_size]
                self._rng, rng = jax.random.split(self._rng)
                with jax.set_mesh(self.mesh):
                    outputs = generate(
                        self.config, self.params, [prompts[i] for i in members], max_new_tokens=max_new_tokens,
                        sampling=sampling, rng=rng, eos_id=self.tokenizer.eos_id,
                    )
                for i, text in zip(members, self.tokenizer.decode(outputs.tokens)):
                    results[i] = cut_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                progress.update(len(members))
        progress.close()
        return results


def _sampling(settings: dict) -> Sampling:
    """The sampler of lm_eval's generation settings; settings it has no field for are ignored
    with a warning."""
    fields = {f.name for f in dataclasses.fields(Sampling)}
    unsupported = sorted(set(settings) - fields)
    if unsupported:
        log.warning("lmx: generation settings %s are not supported and are ignored", unsupported)
    return Sampling(**{name: value for name, value in settings.items() if name in fields})


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any of the stop strings."""
    return text[: min([text.find(s) for s in until if s in text], default=len(text))]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
