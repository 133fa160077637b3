"""Continue prompts with a run's newest checkpoint and its tokenizer.

    python -m model.sample --workdir=runs/quickstart --prompt="The king" --prompt="Once"
    python -m model.sample --workdir=runs/quickstart --prompt="The king" --temperature=0.8 --top_p=0.95
    python -m model.sample --workdir=runs/quickstart --prompt="The king" --beams=4

Works for pretraining and post-training workdirs (model/generate.py has the strategies). Each
prompt starts with BOS, as training documents do; output stops at EOS or --max_new_tokens.
"""

from __future__ import annotations

import jax
from absl import flags

from align import source
from model import sharding
from model.generate import Sampling, beam_search, generate
from train.cli import given_flags, run_program

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir: its newest checkpoint samples.", required=True)
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "A prompt (repeat the flag for several).", required=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most.", lower_bound=1)
_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations per prompt.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: the smallest set with this much probability.", lower_bound=0.0, upper_bound=1.0)
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p times the top probability.", lower_bound=0.0, upper_bound=1.0)
_PRESENCE = flags.DEFINE_float("presence_penalty", 0.0, "Subtracted from the logits of tokens already generated.")
_FREQUENCY = flags.DEFINE_float("frequency_penalty", 0.0, "Subtracted per earlier occurrence in the output.")
_BEAMS = flags.DEFINE_integer("beams", 0, "Beam search with this many beams (0: sample).", lower_bound=0)
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "Beam scores are log-prob / length**penalty.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampler.")


def main(argv):
    del argv
    ignored = given_flags("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "seed")
    if _BEAMS.value and (ignored or _SAMPLES.value > 1):
        raise ValueError(f"--beams={_BEAMS.value} searches; it takes none of {ignored or ['--num_samples']}")
    start = source.from_workdir(_WORKDIR.value, setting="--workdir")
    tokenizer, config = start.tokenizer, start.model_config
    params = start.load_params(sharding.make_mesh((-1, 1, 1), model_config=config))
    texts = [text for text in _PROMPTS.value for _ in range(_SAMPLES.value)]
    prompts = [[tokenizer.bos_id] + ids for ids in tokenizer.encode(texts)]
    if _BEAMS.value:
        tokens, scores = beam_search(
            config, params, prompts, max_new_tokens=_MAX_NEW.value, beams=_BEAMS.value,
            length_penalty=_LENGTH_PENALTY.value, eos_id=tokenizer.eos_id,
        )
        labels = [f"score {score:.3f}" for score in scores]
    else:
        sampling = Sampling(
            temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, min_p=_MIN_P.value,
            presence_penalty=_PRESENCE.value, frequency_penalty=_FREQUENCY.value,
        )
        out = generate(
            config, params, prompts, max_new_tokens=_MAX_NEW.value, sampling=sampling,
            rng=jax.random.key(_SEED.value), eos_id=tokenizer.eos_id,
        )
        tokens = out.tokens
        labels = [f"log-prob {sum(row):.3f}" for row in out.logprobs]
    for text, continuation, label in zip(texts, tokenizer.decode(tokens), labels):
        print(f"--- {label}\n{text}{continuation}\n")


if __name__ == "__main__":
    run_program(main)
