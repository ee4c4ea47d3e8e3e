"""Makes plain `lm_eval --model megamoe` work: installed as `megamoe-lm-eval.pth` (one line, `import
megamoe.eval.lm_eval_hook`), it runs at every interpreter start and costs one entry in sys.meta_path.

lm_eval 0.4.x fills its model registry when `lm_eval.models` is first imported (`get_model` imports it into an empty
registry) and has no plugin entry points. Registering `megamoe` earlier would leave the registry non-empty, so lm_eval
would never import its own models (`hf` would vanish). The hook therefore waits for `lm_eval.models` to be imported,
lets it run, then registers `megamoe` as a lazy placeholder ("megamoe.eval.lm_eval_backend:MegamoeLM"): neither
lm_eval nor torch is imported because of this file, and megamoe's backend only when `--model megamoe` is asked for.
The hook removes itself after that one import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "lm_eval.models"
NAME, PLACEHOLDER = "megamoe", "megamoe.eval.lm_eval_backend:MegamoeLM"


def register(registry) -> None:
    if NAME not in registry:
        registry.register(NAME, target=PLACEHOLDER)


class _AfterLmEvalModels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                from lm_eval.api.registry import model_registry
                register(model_registry)
            except Exception:  # noqa: BLE001 - an lm_eval without this registry API: megamoe-lm-eval still works
                pass

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:  # lm_eval's models already imported: register now
        from lm_eval.api.registry import model_registry
        register(model_registry)
    elif not any(isinstance(f, _AfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLmEvalModels())


install()
