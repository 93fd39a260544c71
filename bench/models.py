"""Your own model's gradient set: `--model MODULE:FACTORY` (a callable returning an nn.Module) or
`--hf-config NAME_OR_JSON` (a transformers architecture with its default config, such as `gpt2`
or `llama`, or a config.json). Models are built on the meta device, so no weight is allocated
and nothing is downloaded; the benchmark then makes gradients of the trainable parameters'
shapes and dtypes on the benchmark device.
"""

from __future__ import annotations

import importlib
import json
import os

import torch

from bench.workloads import Workload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gradient_set(name: str, module: torch.nn.Module, dtype: torch.dtype | None) -> Workload:
    # parameters() lists a tied weight (an embedding shared with the output head) once, as the
    # optimizer and clip_grad_norm_ see it.
    shapes = [
        (tuple(parameter.shape), dtype or parameter.dtype)
        for parameter in module.parameters()
        if parameter.requires_grad
    ]
    if not shapes:
        raise ValueError(f"{name}: the model has no trainable parameters")
    unsupported = {str(d) for _, d in shapes if not d.is_floating_point}
    if unsupported:
        raise ValueError(f"{name}: parameters of dtype {sorted(unsupported)} have no gradients")
    return Workload(name, shapes)


def from_factory(spec: str, dtype: torch.dtype | None = None) -> Workload:
    """`package.module:factory`: factory() must return an nn.Module; it is called under the meta
    device, so its parameters take no memory."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"--model expects MODULE:FACTORY (e.g. torchvision.models:resnet18), got {spec!r}"
        )
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {module_name} has no callable {attribute!r}")
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"--model {spec}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return _gradient_set(attribute, model, dtype)


def hf_config(name_or_path: str):
    """A transformers config: a config.json (its model_type names the architecture) or the
    default config of an architecture named by its model_type."""
    from transformers import AutoConfig

    if os.path.isfile(name_or_path):
        with open(name_or_path) as handle:
            fields = json.load(handle)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"--hf-config {name_or_path}: the JSON has no model_type")
        return AutoConfig.for_model(model_type, **fields)
    try:
        return AutoConfig.for_model(name_or_path)
    except ValueError as error:
        raise ValueError(
            f"--hf-config {name_or_path!r} is neither a file nor a transformers model_type "
            "(such as gpt2, llama, bert, t5)"
        ) from error


def from_hf_config(name_or_path: str, dtype: torch.dtype | None = None) -> Workload:
    from transformers import AutoModel, AutoModelForCausalLM

    config = hf_config(name_or_path)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # an encoder-only or other architecture without a causal-LM head
            model = AutoModel.from_config(config)
    label = os.path.splitext(os.path.basename(name_or_path))[0]
    return _gradient_set(f"hf-{label}", model, dtype)
