"""The model card written beside a merge (`OUT/README.md`), as mergekit writes it, so that the output can be
uploaded to the Hugging Face Hub as is: front matter the Hub reads (`base_model`: the hub repositories the recipe
names; `tags: [merge, lazymerge]`; `library_name`), the method, the models and the recipe that produced it.

Only hub ids go into `base_model` (the Hub refuses local paths there), as mergekit does; local paths are listed in
the text. Nothing here touches the network: a reference is a hub id when it is not a local path and has the
`owner/name` form.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from .planner.recipe import Recipe

HUB_URL = "https://huggingface.co"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_KEYS = ("model", "base_model", "source_model")   # where a recipe (or a mergekit-moe config) names a model

CARD = """---
{front_matter}---
# {name}

This is a merge of pre-trained language models created with lazymerge, an out-of-core merge engine that reads
mergekit recipes.

## Merge Details
### Merge Method

This model was merged using the {method} merge method{base_text}.

### Models Merged

The following models were included in the merge:
{model_list}

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{recipe_yaml}
```
"""


def is_hub_id(ref: str) -> bool:
    """`owner/name` that is not a local path (no network check: the card is written offline)."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).exists()


def model_refs(recipe: Recipe) -> list[str]:
    """Every model the recipe names (each stage of a multi-stage recipe; a `base+adapter` reference gives both;
    references to another stage left out), in order of appearance, each once."""
    docs = recipe.documents or [recipe.raw]
    seen: dict[str, None] = {}
    for ref in (r for doc in docs for r in _walk(doc)):
        for part in ref.split("+"):
            part = part.strip()
            if part and part not in recipe.stage_names:
                seen.setdefault(part, None)
    return list(seen)


def _walk(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _MODEL_KEYS and isinstance(value, str):
                yield value
            else:
                yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _md(ref: str) -> str:
    return f"[{ref}]({HUB_URL}/{ref})" if is_hub_id(ref) else ref


def model_card(recipe: Recipe, recipe_yaml: str) -> str:
    """README.md for the merge of `recipe` (its YAML text `recipe_yaml`, as the user wrote it), titled with the
    recipe's `name:` if it has one. Nothing from the output's path goes in (mergekit titles the card with the
    directory's name): the same recipe and inputs give the same bytes wherever the output is written."""
    refs = model_refs(recipe)
    base = recipe.base_model
    for part in (base or "").split("+")[:1]:
        base = part.strip() or None
    # mergekit's reading of slerp: the base is one of the two endpoints, listed with the models, not "a base"
    shown_base = base if base and recipe.merge_method != "slerp" and base not in recipe.stage_names else None
    meta: dict[str, Any] = {}
    hub = [r for r in refs if is_hub_id(r)]
    if hub:
        meta["base_model"] = hub
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "lazymerge"]
    bullets = [f"* {_md(r)}" for r in refs if r != shown_base]
    return CARD.format(front_matter=yaml.safe_dump(meta, sort_keys=False), name=recipe.name or "Merged model",
                       method=recipe.merge_method,
                       base_text=f" using {_md(shown_base)} as a base" if shown_base else "",
                       model_list="\n".join(bullets) or "* (none)", recipe_yaml=recipe_yaml.strip())
