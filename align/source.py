"""Where a post-training run starts: the newest checkpoint of a pretraining or post-training
workdir (SFT -> DPO -> RL), or Hugging Face weights; with the tokenizer that goes with them.

A workdir's `config.json` says how its checkpoint is laid out: a pretraining state holds the
model as `params`; a post-training state holds the trees of `align.trees` (LoRA adapters are
merged into their base). The policy's weights come back sharded on the mesh.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import jax
import ml_collections

import model
from align import trees
from data import pipeline
from data.tokenizer import Tokenizer
from train import workdir as workdir_lib
from train.checkpoint import Checkpointer
from train.optimizer import make_optimizer
from train.state import abstract_state, tree_shardings

TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass
class Start:
    model_config: model.ModelConfig
    tokenizer: Tokenizer
    load_params: Callable  # mesh -> the policy's weights, sharded by their logical axes
    description: str


def resolve(cfg) -> Start:
    if cfg.init.from_workdir:
        return from_workdir(cfg.init.from_workdir)
    return _from_hf(pathlib.Path(cfg.init.from_hf), cfg.init.tokenizer)


def from_workdir(workdir, setting: str = "init.from_workdir") -> Start:
    """The newest checkpoint of a run (a local or object-store workdir); errors name `setting`,
    where the workdir came from."""
    workdir, source, model_config, tokenizer = _run_of(workdir, setting)

    def load_params(mesh):
        state = _restored_state(workdir, source, model_config, mesh)
        return _policy_of(source, state, model_config, mesh) if "method" in source else state.params

    return Start(model_config, tokenizer, load_params, f"workdir {workdir}")


@dataclasses.dataclass
class RewardModel:
    model_config: model.ModelConfig
    tokenizer: Tokenizer
    params: dict  # {"model": the transformer (LoRA merged), "score": its head {"w": [D], "b": []}}
    normalization: dict  # {"mean", "std"}: of its raw rewards on its reference set


def reward_model(workdir, mesh, setting: str = "rl.reward_model") -> RewardModel:
    """The newest checkpoint of a reward-model run (`method` 'reward'), sharded on `mesh`."""
    workdir, source, model_config, tokenizer = _run_of(workdir, setting)
    if source.get("method") != "reward":
        raise ValueError(f"{setting}={str(workdir)!r}: a {source.get('method', 'pretraining')} run, not a reward model")
    state = _restored_state(workdir, source, model_config, mesh)
    # The normalization is computed when the run finishes, into its last checkpoint.
    if int(state.step) < source.train.steps:
        raise ValueError(
            f"{setting}={str(workdir)!r}: the reward run stopped at step {int(state.step)} of "
            f"{source.train.steps}, before its rewards were normalized; resume it first"
        )
    params = {"model": _policy_of(source, state, model_config, mesh), "score": state.params["score"]}
    return RewardModel(model_config, tokenizer, params, state.frozen["normalization"])


def _run_of(workdir, setting: str):
    """(workdir, its config, model config, tokenizer) of a run's workdir."""
    workdir = workdir_lib.resolve(workdir, setting)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{setting}={str(workdir)!r}: no config.json there (not a run's workdir)")
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{setting}={str(workdir)!r}: no checkpoints directory")
    source = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
    model_config = model.ModelConfig(**source.model.to_dict())
    tokenizer_file = workdir / TOKENIZER_FILE
    if tokenizer_file.is_file():
        tokenizer = Tokenizer.load(tokenizer_file)
    else:  # a pretraining run keeps its tokenizer in the data cache
        tokenizer = pipeline.open_corpus(source.data).tokenizer
    return workdir, source, model_config, tokenizer


def _policy_of(source, state, model_config, mesh):
    """The transformer of a post-training state: the trained model, or base + merged adapters."""
    params = trees.policy(source, state.params, state.frozen)
    if trees.uses_lora(source):  # merged on the host side of jit: re-place on the mesh
        params = jax.device_put(params, tree_shardings(model.abstract_params(model_config), mesh))
    return params


def _restored_state(workdir, source, model_config, mesh):
    optimizer = make_optimizer(source.optimizer, source.train.steps)
    if "method" in source:
        params_boxed, frozen_boxed = trees.boxed_trees(source, model_config)
    else:
        params_boxed, frozen_boxed = model.abstract_params(model_config), None
    abstract = abstract_state(optimizer, mesh, params_boxed, frozen_boxed)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=source.checkpoint.keep)
    state, _ = checkpointer.restore_state(abstract)
    checkpointer.close()
    return state


def _from_hf(directory: pathlib.Path, tokenizer_path: str) -> Start:
    tokenizer_file = pathlib.Path(tokenizer_path) if tokenizer_path else directory / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"init.from_hf={str(directory)!r}: no SentencePiece model at {tokenizer_file}; "
            "set init.tokenizer"
        )
    model_config, params = model.from_hf(directory)

    def load_params(mesh):
        return jax.device_put(params, tree_shardings(model.abstract_params(model_config), mesh))

    return Start(model_config, Tokenizer.load(tokenizer_file), load_params, f"Hugging Face {directory}")
